"""Where model weights come from: a local folder, or a hub repo fetched once into `model.cache_dir`."""

from __future__ import annotations

import logging
from pathlib import Path

from depthq.config import ModelConfig
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
            f"model.path: {model.path} is neither a local folder nor a hub id like apple/DepthPro-hf"
        )
    target = local_dir_for(model.path, model.cache_dir)
    if (target / "config.json").is_file():
        return target
    # The fix first: the library's own words, long and about HTTP, come last.
    fetch_hint = (
        f"model.path: {model.path} is not in {target}. On a machine with internet, run "
        f"`hf download {model.path} --local-dir {target}` and copy {target} here, or set model.path "
        "to a local folder that holds the model"
    )
    if model.offline:
        raise ModelUnavailableError(f"{fetch_hint} (model.offline is on, so nothing is downloaded)")
    from huggingface_hub import snapshot_download

    log.info("downloading %s into %s", model.path, target)
    try:
        snapshot_download(
            repo_id=model.path,
            local_dir=target,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.md"],
        )
    except Exception as exc:
        raise ModelUnavailableError(f"{fetch_hint}. Fetching it here failed: {type(exc).__name__}: {exc}") from None
    # Said once, at the download: the weights' terms matter to anyone deploying a fleet.
    log.warning("downloaded %s into %s; its licence: %s", model.path, target, licence_of(target))
    return target


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
