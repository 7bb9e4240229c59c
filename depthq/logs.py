"""One log format for every depthq process, so interleaved `depthq up` output stays readable."""

from __future__ import annotations

import logging
import os

from depthq.config import LOG_LEVEL_ENV


def configure_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper(),
        format="%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s",
    )
