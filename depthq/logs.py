"""One log format for every depthq process, so interleaved `depthq up` output stays readable.

The lines go to stderr, or, with `logging.file` set, to a file that depthq rotates itself: launchd
appends a service's stdout to one file for ever, so a Mac mini worker writes its own, rotated log.
"""

from __future__ import annotations

import logging
import os
from logging.handlers import RotatingFileHandler

from depthq.config import LOG_LEVEL_ENV, ConfigError, LoggingConfig

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s"
# The name of the one root handler depthq installs, so a second call replaces it instead of adding one.
HANDLER_NAME = "depthq"


def configure_logging(level: str | None = None, settings: LoggingConfig | None = None) -> None:
    """Send depthq's log lines to stderr, or to `settings.file`, rotated at `settings.max_bytes`.

    Called twice by the CLI: once at start, to stderr, so that reading the config can report; then
    with the config's `logging` section, which moves the lines to the file. A root logger that
    already has someone else's handler (a test harness, a program embedding depthq) is left alone,
    as `logging.basicConfig` leaves it.
    """
    root = logging.getLogger()
    if any(handler.get_name() != HANDLER_NAME for handler in root.handlers):
        return
    handler = _file_handler(settings) if settings is not None and settings.file is not None else logging.StreamHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(logging.Formatter(FORMAT))
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel((level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper())


def _file_handler(settings: LoggingConfig) -> RotatingFileHandler:
    """The rotating file, its folder created; an unusable path names the key instead of a traceback."""
    assert settings.file is not None
    try:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        return RotatingFileHandler(
            settings.file, maxBytes=settings.max_bytes, backupCount=settings.backups, encoding="utf-8"
        )
    except OSError as exc:
        raise ConfigError(
            f"logging.file: cannot write {settings.file} ({exc.strerror or exc}); "
            "point logging.file at a writable file, or null for stderr"
        ) from None
