"""depthq/logs.py: the rotating log file a Mac mini's worker writes, since launchd rotates nothing.

Each check runs a real process: pytest's own log handlers sit on the root logger in this one, and
configure_logging leaves a root logger that someone else configured alone, as basicConfig does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from depthq.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"line (\d{5}) ")


def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter, from the repository root so that depthq imports."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_a_process_rotates_its_log_at_max_bytes_and_keeps_backups(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "depthq-worker.log"  # its folder is created too
    config = tmp_path / "config.yaml"
    max_bytes, backups, lines = 4000, 3, 400
    config.write_text(yaml.safe_dump({"logging": {"file": str(log_file), "max_bytes": max_bytes, "backups": backups}}))
    result = run_python(
        """
        import logging, sys
        from depthq.config import load_config
        from depthq.logs import configure_logging

        configure_logging("INFO", load_config(sys.argv[1], environ={}).logging)
        for i in range(int(sys.argv[2])):
            logging.getLogger("depthq.test").info("line %05d %s", i, "x" * 40)
        """,
        str(config),
        str(lines),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # every line went to the file

    names = sorted(p.name for p in log_file.parent.iterdir())
    assert names == ["depthq-worker.log", *[f"depthq-worker.log.{n}" for n in range(1, backups + 1)]]
    oldest_first = [log_file.with_name(f"{log_file.name}.{n}") for n in range(backups, 0, -1)] + [log_file]
    sizes = [p.stat().st_size for p in oldest_first]
    line_bytes = len(log_file.read_text().splitlines()[0]) + 1
    assert all(size <= max_bytes for size in sizes), sizes
    # A file rotates when the next line would not fit: each rotated one is full to within a line.
    assert all(size > max_bytes - line_bytes for size in sizes[:-1]), sizes
    # The newest lines survive, in order and with none missing; the oldest were dropped.
    numbers = [int(m.group(1)) for p in oldest_first for m in LINE.finditer(p.read_text())]
    assert numbers == list(range(numbers[0], lines))
    assert numbers[0] > 0
    assert " INFO    " in log_file.read_text() and "depthq.test: line" in log_file.read_text()


def test_the_cli_writes_to_the_file_that_the_mac_agent_names(tmp_path: Path, redis_url: str) -> None:
    """As launchd runs it: DEPTHQ_LOGGING_FILE from the plist, the rest from the config file."""
    log_file = tmp_path / "Logs: #1" / "depthq-worker.log"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "redis": {"url": redis_url},
                "producer": {"watch": str(tmp_path / "in")},
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    missing = tmp_path / "missing.jpg"
    # Quoted for YAML, as install-worker.sh renders it: a DEPTHQ_* value is read as YAML.
    env = {"DEPTHQ_LOGGING_FILE": f'"{log_file}"'}
    result = run_python(
        "import sys; from depthq.cli import main; sys.exit(main(sys.argv[1:]))",
        *("enqueue", str(missing), "--config", str(config)),
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert f"{missing}: no such file or folder" in log_file.read_text()
    assert "no such file or folder" not in result.stderr


def test_an_unwritable_log_file_names_the_key(tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"logging": {"file": str(blocker / "depthq.log")}}))
    result = run_python(
        "import sys; from depthq.cli import main; sys.exit(main(sys.argv[1:]))",
        *("status", "--config", str(config)),
    )
    assert result.returncode == 2
    assert f"logging.file: cannot write {blocker / 'depthq.log'}" in result.stderr


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_bytes", 0, "greater than 0"),
        ("backups", 0, "greater than or equal to 1"),
        ("rotate", "daily", "unknown key"),
    ],
)
def test_bad_logging_settings_name_the_key(tmp_path: Path, key: str, value: object, message: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"logging": {key: value}}))
    with pytest.raises(ConfigError, match=rf"logging\.{key}: .*{message}"):
        load_config(config, environ={})
    with pytest.raises(ConfigError, match=rf"logging\.{key}: .*{message}"):
        load_config(environ={f"DEPTHQ_LOGGING_{key.upper()}": str(value)})
