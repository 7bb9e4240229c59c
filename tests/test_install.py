"""install.sh: the README's first command, which picks the torch build this machine can use.

A real install takes minutes here (2.5 with a cold pip cache, most of it pip retrying PyTorch's CPU
index, which this machine cannot reach), so these run its --dry-run on stand-ins: `uname` and
`nvidia-smi` on a PATH that holds only them and the few tools the script runs, so the machine's
own GPU, or its lack, never decides. What the script reads from a venv (is it there, which torch
does it hold) it reads from real venvs made here without pip.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from depthq.config import load_config

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "install.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"
# What install.sh runs besides bash's builtins and the stand-ins (and mkdir and cp, which they run).
TOOLS = ("bash", "dirname", "basename", "grep", "head", "tail", "wc", "tr", "timeout", "cat", "mkdir", "cp")

LIST_GPUS = """#!/bin/sh
echo "nvidia-smi $*" >> "@LOG@"
case $1 in
  -L) printf 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\\n' ;;
  --query-gpu=driver_version) printf '@DRIVER@\\n@DRIVER@\\n' ;;
  *) exit 2 ;;
esac
"""
# What nvidia-smi says where the driver is there but unusable, and where it sees no device.
NO_DRIVER = """#!/bin/sh
echo "nvidia-smi $*" >> "@LOG@"
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the \
latest NVIDIA driver is installed and running."
exit 9
"""
NO_DEVICE = """#!/bin/sh
echo "nvidia-smi $*" >> "@LOG@"
echo "No devices found."
exit 6
"""
UNAME = """#!/bin/sh
case $1 in -s) echo @OS@ ;; -m) echo @ARCH@ ;; esac
"""


def torch_version() -> str:
    found = re.search(r"^TORCH_VERSION=(\S+)$", INSTALL.read_text(), re.MULTILINE)
    assert found, "install.sh names no TORCH_VERSION"
    return found.group(1)


TORCH = f"torch=={torch_version()}"


class Box:
    """A machine as install.sh sees it: its uname, its nvidia-smi (or none), and a venv to install into."""

    def __init__(self, root: Path, os_name: str = "Linux", arch: str = "x86_64") -> None:
        self.root = root
        self.bin = root / "bin"
        self.calls_file = root / "calls.log"
        self.venv = root / "venv"
        tools = root / "tools"
        for directory in (self.bin, tools):
            directory.mkdir(parents=True)
        for name in TOOLS:
            path = shutil.which(name)
            assert path, f"{name} is not installed"
            (tools / name).symlink_to(path)
        self._write("uname", UNAME.replace("@OS@", os_name).replace("@ARCH@", arch))
        self.path = f"{self.bin}:{tools}"

    def _write(self, name: str, text: str) -> None:
        path = self.bin / name
        path.write_text(text.replace("@LOG@", str(self.calls_file)))
        path.chmod(0o755)

    def nvidia_smi(self, text: str, driver: str = "580.82.07") -> None:
        self._write("nvidia-smi", text.replace("@DRIVER@", driver))

    def install(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environ = {"HOME": str(self.root), "PATH": self.path, "LC_ALL": "C", "PYTHON": sys.executable, **(env or {})}
        return subprocess.run(
            ["bash", str(INSTALL), "--venv", str(self.venv), *args],
            capture_output=True,
            text=True,
            env=environ,
            cwd=self.root,
            timeout=60,
        )

    def plan(self, *args: str, env: dict[str, str] | None = None) -> tuple[str, list[list[str]]]:
        """What a dry run says, and the commands it would run, each as the shell would split it."""
        result = self.install("--dry-run", *args, env=env)
        assert result.returncode == 0, result.stderr
        assert "dry run: nothing was changed" in result.stdout
        commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
        return result.stdout, commands

    def calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines() if self.calls_file.exists() else []

    def pip(self, *args: str) -> list[str]:
        return [str(self.venv / "bin" / "python"), "-m", "pip", *args]


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


def fresh_venv_plan(box: Box, *torch_args: str) -> list[list[str]]:
    """A new venv, then torch from where `torch_args` say, then depthq from the checkout."""
    return [
        [sys.executable, "-m", "venv", str(box.venv)],
        box.pip("install", *torch_args),
        box.pip("install", "-e", ".[torch]"),
    ]


# ------------------------------------------------------------------------------- the choice


def test_cpu_only_linux_gets_the_cpu_build_from_the_cpu_index(box: Box) -> None:
    said, commands = box.plan()
    assert commands == fresh_venv_plan(box, TORCH, "--index-url", CPU_INDEX, "--extra-index-url", PYPI)
    assert "the CPU build" in said and "no usable NVIDIA GPU (nvidia-smi not found)" in said
    assert "DEPTHQ_TORCH=cpu|cuda|none" in said  # how to choose otherwise
    assert not box.venv.exists()


@pytest.mark.parametrize(
    ("stand_in", "why"),
    [
        (NO_DRIVER, "nvidia-smi -L failed: NVIDIA-SMI has failed because it couldn't communicate"),
        (NO_DEVICE, "nvidia-smi -L failed: No devices found."),
    ],
    ids=["driver-unusable", "no-device"],
)
def test_an_nvidia_smi_that_sees_no_usable_gpu_gives_the_cpu_build(box: Box, stand_in: str, why: str) -> None:
    box.nvidia_smi(stand_in)
    said, commands = box.plan()
    assert commands[1] == box.pip("install", TORCH, "--index-url", CPU_INDEX, "--extra-index-url", PYPI)
    assert why in said
    assert box.calls() == ["nvidia-smi -L"]


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_linux_with_a_gpu_gets_pypis_cuda_build(tmp_path: Path, arch: str) -> None:
    box = Box(tmp_path, arch=arch)
    box.nvidia_smi(LIST_GPUS)
    said, commands = box.plan()
    assert commands == fresh_venv_plan(box, TORCH)
    assert "the CUDA build from PyPI" in said
    assert "nvidia-smi lists 2 GPU(s): GPU 0: NVIDIA H100 80GB HBM3" in said
    assert "warning" not in said


def test_a_driver_too_old_for_pypis_cuda_build_is_warned_about(box: Box) -> None:
    box.nvidia_smi(LIST_GPUS, driver="550.54.15")
    said, commands = box.plan()
    assert commands == fresh_venv_plan(box, TORCH)
    assert "warning: NVIDIA driver 550.54.15" in said and "needs driver 580 or newer" in said


def test_macos_gets_pypis_torch_and_never_asks_nvidia_smi(tmp_path: Path) -> None:
    box = Box(tmp_path, os_name="Darwin", arch="arm64")
    box.nvidia_smi(LIST_GPUS)
    said, commands = box.plan()
    assert commands == fresh_venv_plan(box, TORCH)
    assert "from PyPI (CPU and MPS): macOS (arm64)" in said
    assert box.calls() == []


# ----------------------------------------------------------------------------- the override


def test_the_override_wins_over_what_the_box_has(box: Box) -> None:
    box.nvidia_smi(LIST_GPUS)
    said, commands = box.plan(env={"DEPTHQ_TORCH": "cpu"})
    assert commands[1] == box.pip("install", TORCH, "--index-url", CPU_INDEX, "--extra-index-url", PYPI)
    assert "the CPU build" in said and ": DEPTHQ_TORCH=cpu" in said
    assert box.calls() == []  # nothing to detect

    box.bin.joinpath("nvidia-smi").unlink()
    said, commands = box.plan(env={"DEPTHQ_TORCH": "cuda"})
    assert commands == fresh_venv_plan(box, TORCH)
    assert "the CUDA build from PyPI" in said and ": DEPTHQ_TORCH=cuda" in said

    # The option beats the variable.
    said, commands = box.plan("--torch", "cpu", env={"DEPTHQ_TORCH": "cuda"})
    assert "--index-url" in commands[1] and ": --torch cpu" in said


def test_none_installs_depthq_without_torch(box: Box) -> None:
    said, commands = box.plan("--torch=none")
    assert commands == [[sys.executable, "-m", "venv", str(box.venv)], box.pip("install", "-e", ".")]
    assert "no torch" in said


def test_a_wrong_override_is_refused_with_what_it_accepts(tmp_path: Path) -> None:
    box = Box(tmp_path)
    result = box.install("--dry-run", env={"DEPTHQ_TORCH": "rocm"})
    assert result.returncode == 1
    assert "DEPTHQ_TORCH=rocm: expected cpu, cuda or none" in result.stderr

    mac = Box(tmp_path / "mac", os_name="Darwin", arch="arm64")
    result = mac.install("--dry-run", "--torch", "cuda")
    assert result.returncode == 1
    assert "--torch cuda: there is no CUDA torch for macOS" in result.stderr
    _, commands = mac.plan("--torch", "cpu")
    assert commands == fresh_venv_plan(mac, TORCH)  # a Mac's CPU torch is PyPI's


def test_an_exported_override_does_not_stop_depthq() -> None:
    # The README's command runs depthq right after install.sh, in the same environment.
    load_config(environ={"DEPTHQ_TORCH": "cpu"})


def test_help_documents_the_override_and_the_dry_run(box: Box) -> None:
    result = box.install("--help")
    assert result.returncode == 0
    for text in ("DEPTHQ_TORCH", "--torch cpu|cuda|none", "--dry-run", "--venv DIR", CPU_INDEX):
        assert text in result.stdout
    assert box.install("--bogus").returncode == 1


# -------------------------------------------------------------------------------- re-running


def site_packages(box: Box) -> Path:
    [site] = box.venv.glob("lib/python*/site-packages")
    return site


def make_venv(box: Box, pip: bool = True) -> None:
    """A real venv, with a stand-in pip that only answers --version (a real one takes seconds)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(box.venv)], check=True, timeout=60)
    if pip:
        (site_packages(box) / "pip").mkdir()
        (site_packages(box) / "pip" / "__init__.py").touch()
        (site_packages(box) / "pip" / "__main__.py").write_text("print('pip 0 (a stand-in)')\n")


def fake_dist(box: Box, name: str, version: str, cuda: bool = False) -> None:
    """A distribution as pip leaves it in site-packages: its metadata and, for a CUDA torch, the file
    that only a CUDA build ships, which is all install.sh reads."""
    site = site_packages(box)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if cuda:
        (site / "torch" / "lib").mkdir(parents=True)
        (site / "torch" / "lib" / "libtorch_cuda.so").touch()


def test_a_rerun_reuses_the_venv(box: Box) -> None:
    make_venv(box)
    fake_dist(box, "torch", "2.13.0+cpu")
    said, commands = box.plan()
    assert f"reusing {box.venv}" in said
    assert commands == fresh_venv_plan(box, TORCH, "--index-url", CPU_INDEX, "--extra-index-url", PYPI)[1:]


def test_a_cuda_build_on_a_cpu_only_box_is_removed_with_its_nvidia_libraries(box: Box) -> None:
    # The README's old command on a box with no GPU: pip alone would keep it, since 2.13.0 is the pin.
    make_venv(box)
    fake_dist(box, "torch", "2.13.0", cuda=True)
    # Some of what PyPI's torch 2.13.0 for Linux requires.
    for name, version in [("nvidia-cudnn-cu13", "9.20.0.48"), ("cuda-toolkit", "13.0.3"), ("triton", "3.7.1")]:
        fake_dist(box, name, version)
    fake_dist(box, "numpy", "2.3.5")  # not torch's to remove
    said, commands = box.plan()
    assert "holds another build of torch" in said
    assert commands == [
        box.pip("uninstall", "-y", "cuda-toolkit", "nvidia-cudnn-cu13", "torch", "triton"),
        box.pip("install", TORCH, "--index-url", CPU_INDEX, "--extra-index-url", PYPI),
        box.pip("install", "-e", ".[torch]"),
    ]


def test_a_cpu_build_on_a_gpu_box_is_replaced(box: Box) -> None:
    make_venv(box)
    fake_dist(box, "torch", "2.13.0+cpu")
    box.nvidia_smi(LIST_GPUS)
    _, commands = box.plan()
    assert commands == [
        box.pip("uninstall", "-y", "torch"),
        box.pip("install", TORCH),
        box.pip("install", "-e", ".[torch]"),
    ]
    # ...and the right build is left alone.
    box.nvidia_smi(NO_DEVICE)
    _, commands = box.plan()
    assert commands[0] == box.pip("install", TORCH, "--index-url", CPU_INDEX, "--extra-index-url", PYPI)


def test_a_venv_whose_python_is_gone_or_too_old_is_named_with_the_fix(box: Box) -> None:
    (box.venv / "bin").mkdir(parents=True)
    python = box.venv / "bin" / "python"
    python.write_text("#!/bin/sh\nexit 127\n")
    python.chmod(0o755)
    result = box.install("--dry-run")
    assert result.returncode == 1
    assert f"{python} does not run as a Python" in result.stderr

    old = box.root / "python3.10"
    old.write_text("#!/bin/sh\ncase $2 in *print*) echo 3.10 ;; *) exit 1 ;; esac\n")
    old.chmod(0o755)
    shutil.rmtree(box.venv)
    result = box.install("--dry-run", env={"PYTHON": str(old)})
    assert result.returncode == 1
    assert f"{old} is Python 3.10; depthq needs 3.11 or newer" in result.stderr


def test_a_venv_left_without_pip_is_not_taken_for_a_good_one(box: Box) -> None:
    # What `python3 -m venv` leaves on Debian without python3-venv: a Python, and no pip.
    make_venv(box, pip=False)
    result = box.install("--dry-run")
    assert result.returncode == 1
    assert f"{box.venv} has no pip" in result.stderr and "apt install python3-venv" in result.stderr


def test_a_venv_named_from_elsewhere_stays_where_it_was_named(box: Box) -> None:
    # pip runs from the checkout: a relative --venv is taken from where the script was started.
    _, commands = box.plan("--venv", "here")
    assert commands[0] == [sys.executable, "-m", "venv", str(box.root / "here")]
    assert commands[1][0] == str(box.root / "here" / "bin" / "python")


def test_the_printed_plan_can_be_pasted(tmp_path: Path) -> None:
    box = Box(tmp_path)
    box.venv = tmp_path / "a venv's 'odd' name"
    _, commands = box.plan()
    assert commands[0] == [sys.executable, "-m", "venv", str(box.venv)]


# A Python stand-in for a run that is not dry: it answers install.sh's version probes, `-m venv DIR`
# makes a venv of itself, pip records its calls, and the question put to torch gets @SEES@'s answer.
FAKE_PYTHON = """#!/bin/sh
case $1 in
  -c)
    case $2 in
      *'version_info[:2]'*) echo 3.12 ;;
      *'sys.version_info <'*) exit 0 ;;
      *torch.cuda*) echo "python -c <does torch see a GPU>" >> "@LOG@"; @SEES@ ;;
      *) exit 3 ;;
    esac ;;
  -m)
    echo "python $*" >> "@LOG@"
    if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi ;;
  -) cat > /dev/null ;;
esac
"""
SEES_TWO = "echo 'torch 2.13.0 sees 2 GPU(s)'"
SEES_NONE = "echo 'torch 2.13.0+cpu (CUDA none: a CPU build) sees no GPU'; exit 1"


def fake_python(box: Box, path: Path, sees: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_PYTHON.replace("@LOG@", str(box.calls_file)).replace("@SEES@", sees))
    path.chmod(0o755)
    return path


def test_a_run_runs_its_plan_then_asks_torch_whether_it_sees_the_gpu(box: Box) -> None:
    box.nvidia_smi(LIST_GPUS)
    python = fake_python(box, box.root / "python3.12", SEES_TWO)
    result = box.install(env={"PYTHON": str(python)})
    assert result.returncode == 0, result.stderr
    ran = [call for call in box.calls() if call.startswith("python")]
    assert ran == [
        f"python -m venv {box.venv}",
        f"python -m pip install {TORCH}",
        "python -m pip install -e .[torch]",
        "python -c <does torch see a GPU>",
    ]
    assert "torch 2.13.0 sees 2 GPU(s)" in result.stdout and "done:" in result.stdout

    # A torch that sees no GPU (a driver too old for it, say) is said, and the install still stands.
    fake_python(box, box.venv / "bin" / "python", SEES_NONE)
    box.calls_file.unlink()
    rerun = box.install()
    assert rerun.returncode == 0, rerun.stderr
    assert not any("-m venv" in call for call in box.calls())
    assert "warning: torch 2.13.0+cpu (CUDA none: a CPU build) sees no GPU; the worker would run on the CPU" in (
        rerun.stdout
    )


def test_a_cpu_run_puts_no_question_to_torch(box: Box) -> None:
    python = fake_python(box, box.root / "python3.12", "exit 99")
    result = box.install(env={"PYTHON": str(python)})
    assert result.returncode == 0, result.stderr
    assert not any("torch see" in call for call in box.calls())
    assert f"python -m pip install {TORCH} --index-url {CPU_INDEX} --extra-index-url {PYPI}" in box.calls()


# ----------------------------------------------------------------------------------- the pin


def test_the_pin_is_the_one_ci_tests_and_the_readme_names() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'pip install -q "{TORCH}"' in ci
    readme = (ROOT / "README.md").read_text()
    assert "bash install.sh && .venv/bin/depthq up --watch inbox --output depth-out" in readme
    pins = re.findall(r"torch(?:==| )([0-9]+\.[0-9]+\.[0-9]+)", readme)
    assert pins, "the README names no torch version"
    for pin in pins:
        assert pin == torch_version(), f"README names torch {pin}, install.sh installs {TORCH}"
    assert os.access(INSTALL, os.X_OK)
