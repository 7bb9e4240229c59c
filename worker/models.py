"""Where model weights come from: a local folder, or a hub repo fetched once into `model.cache_dir`."""

from __future__ import annotations

import logging
from pathlib import Path

from depthq.config import ModelConfig
from worker.catalog import HF_OFFLINE_ENV, hub_offline
from worker.errors import ModelUnavailableError

log = logging.getLogger(__name__)


def local_dir_for(repo_id: str, cache_dir: Path) -> Path:
    """models/apple__DepthPro-hf: a plain folder people can see, copy to another host, or delete."""
    return cache_dir / repo_id.replace("/", "__")


def resolve_model_dir(model: ModelConfig) -> Path:
    """A folder with the weights. Downloads (with a progress bar) only if not already present."""
    as_path = Path(model.path).expanduser()
    if as_path.is_dir():
        return as_path
    if as_path.is_absolute() or model.path.startswith((".", "~")) or model.path.count("/") != 1:
        raise ModelUnavailableError(
            f"model.path: {model.path} is neither a local folder nor a hub id like apple/DepthPro-hf. {_POINT_AT}"
        )
    target = local_dir_for(model.path, model.cache_dir)
    if (target / "config.json").is_file():
        return target
    if model.offline:
        raise ModelUnavailableError(_missing(model.path, target, "model.offline is on, so nothing is downloaded"))
    if hub_offline():
        raise ModelUnavailableError(_missing(model.path, target, f"{HF_OFFLINE_ENV} is set, so nothing is downloaded"))
    from huggingface_hub import snapshot_download

    log.info("downloading %s into %s", model.path, target)
    try:
        snapshot_download(
            repo_id=model.path,
            local_dir=target,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.md"],
        )
    except Exception as exc:
        raise ModelUnavailableError(
            _missing(model.path, target, f"the download failed: {why_not_fetched(exc)}")
        ) from None
    # Said once, at the download: the weights' terms matter to anyone deploying a fleet.
    log.warning("downloaded %s into %s; its licence: %s", model.path, target, licence_of(target))
    return target


# The three ways to set model.path, the flag first: a newcomer at `depthq up` knows flags before config keys.
_POINT_AT = (
    "Point depthq at a folder that holds a DepthPro checkpoint: `depthq up --model DIR` (or `depthq work "
    "--model DIR`), DEPTHQ_MODEL_PATH=DIR, or model.path: DIR in config.yaml"
)


def _missing(path: str, target: Path, why: str) -> str:
    """What to do when the weights are not here, in depthq's words only: why this machine did not
    fetch them, kept short; how to point at a local copy; how to get one. huggingface_hub's own text
    is left out: it speaks of `HF_HUB_OFFLINE=0` and "check your internet connection", which a user
    who is offline on purpose cannot act on."""
    return (
        f"model.path: {path} is not in {target} ({why}). {_POINT_AT}. To get one, run on a machine with "
        f"internet `hf download {path} --local-dir {target}` and copy {target} here, where it is found by itself"
    )


def why_not_fetched(exc: BaseException) -> str:
    """The reason a hub download failed, in a few words: the cause the hub library wraps (a refused
    connection, a 404), never its paragraph of advice."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for error in chain:
        if isinstance(error, OfflineModeIsEnabled):
            return f"{HF_OFFLINE_ENV} is set"
        if isinstance(error, GatedRepoError):
            return "the repo is gated: accept its terms on huggingface.co and log in with `hf auth login`"
        if isinstance(error, RepositoryNotFoundError):
            return "the hub has no such repo, or it is private"
        if isinstance(error, RevisionNotFoundError):
            return "the hub has no such revision"
        if isinstance(error, HfHubHTTPError) and error.response is not None:
            return f"the hub answered HTTP {error.response.status_code}"
    for error in chain:
        name = type(error).__name__
        if "Timeout" in name:
            return "no network (the hub did not answer in time)"
        if name in ("ConnectError", "ConnectionError", "NetworkError", "ProxyError") or "Connect" in name:
            return "no network"
        if isinstance(error, OSError) and error.strerror:
            return error.strerror  # the disk: "No space left on device", "Permission denied"
    return type(exc).__name__


def licence_of(folder: Path) -> str:
    """The licence the checkpoint's model card states (its README's `license:` line), for the user
    deploying a fleet to see: DepthPro's hub weights say apple-amlr, Apple's research licence."""
    try:
        lines = (folder / "README.md").read_text(encoding="utf-8").splitlines()
    except OSError:
        return "not stated in the checkpoint (see its model card)"
    if lines and lines[0].strip() == "---":
        for line in lines[1:]:
            if line.strip() == "---":
                break
            key, _, value = line.partition(":")
            if key.strip() == "license" and value.strip():
                return value.strip()
    return "not stated in the checkpoint (see its model card)"
