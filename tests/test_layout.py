"""The package layout's promises: imports run one way, and the watcher's commands stay light.

`producer/` (folder -> queue) and `worker/` (queue -> depth) both import `depthq/` and never each
other. `depthq/` reaches into them only from the CLI and the supervisor, inside the function of the
command that needs them. So a watcher host never loads numpy, torch or coremltools, nor any module of
the worker's: that is checked by running the real commands against a real Redis and reading
`sys.modules` in the running process.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from redis import Redis

from depthq.config import Config
from depthq.contract import make_queues
from depthq.redis_server import free_port
from testkit.clips import write_audio_only_clip, write_clip
from testkit.photos import write_jpeg
from testkit.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("depthq", "producer", "worker")
HEAVY = ("numpy", "torch", "coremltools")
# The only modules of depthq/ that may import producer/ or worker/, and only inside a function: the
# CLI, the supervisor, and the commands that load a model (models, doctor).
REACHES_UP = {"depthq/cli.py", "depthq/supervisor.py", "depthq/model_commands.py", "depthq/doctor.py"}


def _imports(path: Path) -> Iterator[tuple[str, bool]]:
    """(top-level package imported, whether the import sits at module level) for every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], id(node) in top_level
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], id(node) in top_level


def _cross_imports() -> dict[str, list[tuple[str, bool]]]:
    found: dict[str, list[tuple[str, bool]]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = path.relative_to(REPO).as_posix()
            others = [(top, at_top) for top, at_top in _imports(path) if top in PACKAGES and top != package]
            if others:
                found[name] = others
    return found


def test_producer_and_worker_never_import_each_other() -> None:
    crossing = {
        name: [top for top, _ in imports if top in ("producer", "worker")]
        for name, imports in _cross_imports().items()
        if not name.startswith("depthq/")
    }
    offenders = {name: tops for name, tops in crossing.items() if tops}
    assert offenders == {}


def test_depthq_reaches_up_only_from_the_cli_and_supervisor_and_lazily() -> None:
    up = {name: imports for name, imports in _cross_imports().items() if name.startswith("depthq/")}
    assert set(up) <= REACHES_UP, f"depthq modules that import producer/worker: {sorted(set(up) - REACHES_UP)}"
    # None at the top, model_commands included, though only the CLI imports it, inside `depthq models`.
    eager = {name for name, imports in up.items() if any(t for _, t in imports)}
    assert eager == set()
    cli_imports = list(_imports(REPO / "depthq" / "cli.py"))
    assert ("depthq", True) in cli_imports  # its own core, eagerly: the config it parses for every command
    model_commands_users = [
        path.relative_to(REPO).as_posix()
        for folder in (*PACKAGES, "bench")
        for path in sorted((REPO / folder).rglob("*.py"))
        if "depthq.model_commands" in path.read_text()
    ]
    assert model_commands_users == ["depthq/cli.py"]
    tree = ast.parse((REPO / "depthq" / "cli.py").read_text())
    assert not any(isinstance(node, ast.ImportFrom) and node.module == "depthq.model_commands" for node in tree.body), (
        "the CLI imports depthq.model_commands at module level"
    )


def _importers(folder: str, package: str) -> list[str]:
    """The files under `folder` that import `package`, at any level."""
    return [
        path.relative_to(REPO).as_posix()
        for path in sorted((REPO / folder).rglob("*.py"))
        if any(top == package for top, _ in _imports(path))
    ]


def test_tests_and_bench_share_testkit_and_import_each_other_only_to_test_bench() -> None:
    # What both need lives in testkit/, so neither is tied to the other's layout; tests/ imports bench/
    # only in the tests of the benchmarks themselves.
    assert _importers("bench", "tests") == []
    assert _importers("tests", "bench") == ["tests/test_bench.py", "tests/test_soak.py"]
    assert {name for other in ("tests", "bench") for name in _importers("testkit", other)} == set()
    # testkit/ is not installed: the service never imports it, nor the tests or the benchmarks.
    shipped = {
        name for package in PACKAGES for other in ("testkit", "tests", "bench") for name in _importers(package, other)
    }
    assert shipped == set()


# --- the watcher's commands, run for real ------------------------------------------------------------

# Runs the CLI, and prints which heavy modules, and which of the worker's, are loaded on SIGUSR1 and at the end.
_PROBE = f"""
import signal, sys
def report(*_):
    loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)
    print("HEAVY:" + (",".join(loaded) or "none"), flush=True)
    workers = sorted(m for m in sys.modules if m == "worker" or m.startswith("worker."))
    print("WORKER:" + (",".join(workers) or "none"), flush=True)
signal.signal(signal.SIGUSR1, report)
from depthq.cli import main
code = main(sys.argv[1:])
report()
sys.exit(code)
"""


@pytest.fixture
def light_config(make_config: Callable[..., Config], write_config_file: Callable[..., Path]) -> Path:
    return write_config_file(make_config(), "light.yaml", producer={"settle_ms": 100}, dashboard={"port": free_port()})


def _probe(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", _PROBE, *args], cwd=REPO, env=env, stdout=out, stderr=out)


def _reported(log: Path, kind: str) -> list[str]:
    """Each report of the probe's, for `kind` (HEAVY or WORKER): the modules loaded, or "none"."""
    prefix = f"{kind}:"
    return [line.removeprefix(prefix) for line in log.read_text().splitlines() if line.startswith(prefix)]


def _heavy(log: Path) -> list[str]:
    return _reported(log, "HEAVY")


def _worker(log: Path) -> list[str]:
    return _reported(log, "WORKER")


@pytest.mark.parametrize(("command", "code"), [("enqueue", 0), ("status", 0), ("audit", 1), ("failed list", 0)])
def test_one_shot_commands_never_import_numpy_torch_coremltools_or_the_worker(
    command: str, code: int, light_config: Path, tmp_path: Path
) -> None:
    config = yaml.safe_load(light_config.read_text())
    photo = write_jpeg(Path(config["producer"]["watch"]) / "a.jpg")
    args = [*command.split(), "--config", str(light_config)] + ([str(photo)] if command == "enqueue" else [])
    log = tmp_path / f"{command.replace(' ', '-')}.log"
    proc = _probe(args, log)
    assert proc.wait(timeout=120) == code, log.read_text()  # the audit: a.jpg has no job, so it is lost
    assert _heavy(log) == ["none"], log.read_text()
    assert _worker(log) == ["none"], log.read_text()


def test_watch_and_dashboard_never_import_numpy_torch_coremltools_or_the_worker(
    light_config: Path, make_config: Callable[..., Config], redis_client: Redis, tmp_path: Path
) -> None:
    config = yaml.safe_load(light_config.read_text())
    lanes = make_queues(redis_client, make_config())  # dropped while the start-up scan runs: either lane
    watch_log, dash_log = tmp_path / "watch.log", tmp_path / "dashboard.log"
    watch = _probe(["watch", "--config", str(light_config)], watch_log)
    dashboard = _probe(["dashboard", "--config", str(light_config)], dash_log)
    base = f"http://127.0.0.1:{config['dashboard']['port']}"

    def answers(path: str) -> bool:
        try:
            with urllib.request.urlopen(base + path, timeout=10) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        # The watcher has hashed and enqueued a photo; the dashboard has served its pages and the gallery.
        write_jpeg(Path(config["producer"]["watch"]) / "dropped.jpg")
        wait_for(
            lambda: sum(q.count for q in lanes) == 1 or watch.poll() is not None,
            f"the watcher to enqueue (log: {watch_log})",
        )
        wait_for(lambda: answers("/0/data/queues.json") or dashboard.poll() is not None, "the dashboard")
        assert watch.poll() is None and dashboard.poll() is None, watch_log.read_text() + dash_log.read_text()
        assert answers("/gallery/") and answers("/gallery/results.json")
        # A stored result (written here, with numpy, as a worker writes one) measured by the dashboard.
        output = Path(config["output"]["dir"])
        output.mkdir(parents=True, exist_ok=True)
        np.save(output / "m.jpg.depth.npy", np.full((30, 40), 2.0, dtype=np.float32))
        camera = {"model": "pinhole", "fx": 40.0, "fy": 40.0, "cx": 19.5, "cy": 14.5, "width": 40, "height": 30}
        (output / "m.jpg.json").write_text(json.dumps({"source": "m.jpg", "camera": camera}))
        assert answers("/gallery/result/m.jpg") and answers("/gallery/depth/m.jpg")
        assert answers("/gallery/measure/m.jpg?a=0,0&b=39,29")
        for proc in (watch, dashboard):
            proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: _worker(watch_log) and _worker(dash_log), "both to report their modules")
        assert _heavy(watch_log) == ["none"], watch_log.read_text()
        assert _heavy(dash_log) == ["none"], dash_log.read_text()
        assert _worker(watch_log) == ["none"], watch_log.read_text()
        assert _worker(dash_log) == ["none"], dash_log.read_text()
    finally:
        for proc in (watch, dashboard):
            proc.terminate()
            proc.wait(timeout=60)


# Probes each clip given and slices a chunk of each one it takes, as the watcher will (issue 25), and
# prints which heavy and worker modules that loaded.
_CLIP_PROBE = f"""
import sys
from producer.clip_probe import ClipError, probe
from producer.clip_slicer import slice_chunk
for clip in sys.argv[1:]:
    try:
        print("PROBED:" + repr(probe(clip)), flush=True)
    except ClipError as exc:
        print("REFUSED:" + str(exc), flush=True)
        continue
    print("SLICED:" + str(len(slice_chunk(clip, 4, 4, 2).data)), flush=True)
print("HEAVY:" + (",".join(sorted(m for m in {HEAVY!r} if m in sys.modules)) or "none"))
print("WORKER:" + (",".join(sorted(m for m in sys.modules if m == "worker" or m.startswith("worker."))) or "none"))
"""


def test_probing_and_slicing_a_clip_never_import_numpy_torch_coremltools_or_the_worker(tmp_path: Path) -> None:
    # PyAV itself loads numpy only to turn a frame into an array, which neither the probe nor the slicer
    # does; this holds them to that, for a clip the probe decodes the first frame of and the slicer cuts,
    # and for one the probe refuses.
    clip = write_clip(tmp_path / "portrait.mov", rotation=270, focal_35mm=26)
    voice_memo = write_audio_only_clip(tmp_path / "memo.mp4")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    run = subprocess.run(
        [sys.executable, "-c", _CLIP_PROBE, str(clip), str(voice_memo)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    log = tmp_path / "probe.log"
    log.write_text(run.stdout)
    lines = [line.split(":", 1)[0] for line in run.stdout.splitlines()]
    assert lines == ["PROBED", "SLICED", "REFUSED", "HEAVY", "WORKER"]
    assert "rotation=270" in run.stdout
    assert _heavy(log) == ["none"], run.stdout
    assert _worker(log) == ["none"], run.stdout
