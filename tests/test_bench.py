"""The benchmarks stay runnable: every one the runner names imports and has a `run`. No timings here."""

from __future__ import annotations

import importlib

import pytest

from bench.__main__ import BENCHMARKS, main


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_imports_and_runs_by_name(name: str) -> None:
    module = importlib.import_module(BENCHMARKS[name])
    assert callable(module.run)


def test_an_unknown_benchmark_is_refused_naming_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["nope"])
    assert "overhead" in capsys.readouterr().err


def test_the_stand_in_model_is_not_a_configurable_backend() -> None:
    from depthq.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"worker\.backend"):
        load_config(environ={"DEPTHQ_WORKER_BACKEND": "standin"})
