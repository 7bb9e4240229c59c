"""The environment a depthq process is started with in a test: none of the caller's DEPTHQ_ settings,
which would override the test's (the config file and DEPTHQ_* variables both feed `load_config`)."""

from __future__ import annotations

import os
from pathlib import Path

from depthq.config import Config


def worker_env(config: Config, redis_url: str, model: Path, **more: str) -> dict[str, str]:
    """A `python -m worker` on the test's Redis, folders and tiny model, on the CPU, plus `more`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHQ_")}
    env.update(
        DEPTHQ_REDIS_URL=redis_url,
        DEPTHQ_PRODUCER_WATCH=str(config.producer.watch),
        DEPTHQ_OUTPUT_DIR=str(config.output.dir),
        DEPTHQ_MODEL_PATH=str(model),
        DEPTHQ_MODEL_DEVICE="cpu",
        **more,
    )
    return env
