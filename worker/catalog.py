"""`depthq models download` / `depthq models list`: the published Core ML DepthPro exports, by name.

The Mac minis run DepthPro as a Core ML `.mlpackage`. The exports live on the Hugging Face hub in
repos that have moved and been renamed: the sample app's `KeighBee/DepthPro-CoreML` is empty now, and
the same models sit in `KeighBee/coreml-DepthPro` and the `coreml-projects/DepthPro-coreml*` repos
under other folder names. So each model is one catalog entry with an ordered list of places to get it
from, and the folder rename from the repo's name to ours is data, not code. A model lands in
`models/<name>.mlpackage` through a staging folder and one rename, so a half-finished download is
never mistaken for a model, and a second call finds it there and touches no network.

Only the meters exports give metric depth; the normalized-inverse-depth ones are relative (0 to 1)
and the Core ML backend refuses them for metric output. They are listed so `list` can name them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from worker.coreml_spec import (
    MANIFEST,
    CoreMLContract,
    FeatureInfo,
    OutputKind,
    detect_contract,
    feature_info,
    read_spec,
)
from worker.errors import ModelUnavailableError

log = logging.getLogger(__name__)

PackageFormat = Literal["mlpackage", "mlmodelc", "mlmodel"]

STAGING_PREFIX = ".staging-"
# huggingface_hub's own switch; read at call time (its constants module reads it once, at import).
HF_OFFLINE_ENV = "HF_HUB_OFFLINE"
_TRUE = {"1", "ON", "YES", "TRUE"}
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


@dataclass(frozen=True)
class Source:
    """One place a model can come from: a hub repo, the files to take from it, and its folder name there."""

    repo_id: str
    folder: str
    allow_patterns: tuple[str, ...]
    revision: str | None = None

    @classmethod
    def of(cls, repo_id: str, folder: str, revision: str | None = None) -> Source:
        """The usual source: every file of one `.mlpackage` folder (hub patterns let `*` cross `/`)."""
        return cls(repo_id=repo_id, folder=folder, allow_patterns=(f"{folder}/*",), revision=revision)


@dataclass(frozen=True)
class CatalogEntry:
    """A Core ML DepthPro export users can name; `sources` are tried in order until one delivers."""

    name: str
    kind: OutputKind
    approx_size_mb: int
    sources: tuple[Source, ...]
    description: str

    @property
    def local_name(self) -> str:
        """The folder under models/ (our name, whatever the repo calls it)."""
        return f"{self.name}.mlpackage"

    @property
    def metric(self) -> bool:
        """True when the model outputs meters; normalized inverse depth has no scale at all."""
        return self.kind == "meters"


_CP = "coreml-projects"
_KB = "KeighBee/coreml-DepthPro"
_SEED = "KeighBee/DepthPro-CoreML"  # named by huggingface/coreml-examples' DepthProSample; now empty

# The seed app's names are these models under other names: same sources, after the seed repo itself.
_PRUNED_METERS = (
    Source.of(f"{_CP}/DepthPro-coreml-pruned-10-quantized-linear", "DepthProPruned10QuantizedLinear.mlpackage"),
    Source.of(_KB, "DepthProPruned10QuantizedLinear.mlpackage"),
)
_PRUNED_NID = (
    Source.of(
        f"{_CP}/DepthPro-coreml-normalized-inverse-depth-pruned-10-quantized-linear",
        "DepthProNormalizedInverseDepthPruned10QuantizedLinear.mlpackage",
    ),
    Source.of(_KB, "DepthProNormalizedInverseDepthPruned10QuantizedLinear.mlpackage"),
)

CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="DepthPro",
        kind="meters",
        approx_size_mb=1900,
        sources=(Source.of(f"{_CP}/DepthPro-coreml", "DepthPro.mlpackage"), Source.of(_KB, "DepthPro.mlpackage")),
        description="full DepthPro, depth in meters (float16 weights)",
    ),
    CatalogEntry(
        name="DepthProPruned10QuantizedLinear",
        kind="meters",
        approx_size_mb=1100,
        sources=_PRUNED_METERS,
        description="10% pruned, then linearly quantized weights; depth in meters",
    ),
    CatalogEntry(
        name="DepthProMetersPrunedQuantized",
        kind="meters",
        approx_size_mb=1100,
        sources=(Source.of(_SEED, "depthpro_pruned_quantized.mlpackage"), *_PRUNED_METERS),
        description="the DepthProSample app's name for the pruned + quantized meters model",
    ),
    CatalogEntry(
        name="DepthProNormalizedInverseDepth",
        kind="normalized_inverse_depth",
        approx_size_mb=1290,
        sources=(
            Source.of(f"{_CP}/DepthPro-coreml-normalized-inverse-depth", "DepthProNormalizedInverseDepth.mlpackage"),
            Source.of(_KB, "DepthProNormalizedInverseDepth.mlpackage"),
        ),
        description="relative depth only (0 far .. 1 near), never meters",
    ),
    CatalogEntry(
        name="DepthProNormalizedInverseDepthPruned10QuantizedLinear",
        kind="normalized_inverse_depth",
        approx_size_mb=745,
        sources=_PRUNED_NID,
        description="relative depth only, pruned + quantized",
    ),
    CatalogEntry(
        name="DepthProNIDPrunedQuantized",
        kind="normalized_inverse_depth",
        approx_size_mb=745,
        sources=(Source.of(_SEED, "depthpro_pruned_quantized_inverse_depth_normalized.mlpackage"), *_PRUNED_NID),
        description="the DepthProSample app's name for the pruned + quantized relative model",
    ),
)

# Full precision gives the best meters; the pruned one is the smaller, faster choice for a Mac mini.
DEFAULT_MODEL = "DepthPro"


def known_names() -> list[str]:
    return [e.name for e in CATALOG]


def get_entry(name: str) -> CatalogEntry:
    """The entry for a typed name; case and a trailing `.mlpackage` are forgiven, since people paste folders."""
    wanted = name.strip().removesuffix("/").removesuffix(".mlpackage").lower()
    for entry in CATALOG:
        if entry.name.lower() == wanted:
            return entry
    raise ModelUnavailableError(
        f"unknown Core ML model {name!r}; known models: {', '.join(known_names())} "
        "(or make your own with `depthq models convert`)"
    )


def entry_for_folder(folder_name: str) -> CatalogEntry | None:
    """The entry whose local folder (or any repo folder) is `folder_name`, so a hand-copied model is named too."""
    for entry in CATALOG:
        if folder_name == entry.local_name:
            return entry
    for entry in CATALOG:
        if any(folder_name == s.folder for s in entry.sources):
            return entry
    return None


def hub_offline(offline: bool = False) -> bool:
    """The caller's setting (model.offline, --offline) or huggingface_hub's HF_HUB_OFFLINE."""
    return offline or os.environ.get(HF_OFFLINE_ENV, "").strip().upper() in _TRUE


def is_installed(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _fetch_hint(entry: CatalogEntry, models_dir: Path) -> str:
    return (
        f"on a machine with internet run `depthq models download {entry.name}` and copy its "
        f"models/{entry.local_name} folder to {models_dir / entry.local_name}, or copy the hub repo "
        f"{entry.sources[-1].repo_id} from there and run `depthq models download {entry.name} --from <that folder>`"
    )


def download(
    name: str,
    models_dir: Path,
    *,
    offline: bool = False,
    from_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """`models_dir/<name>.mlpackage`, fetched from the entry's sources (or `from_dir`) only if not there yet.

    `from_dir` is a folder laid out like the hub repo (or a models/ folder that already holds ours), for
    machines without internet; it is read with the same patterns and renames as the hub.
    """
    entry = get_entry(name)
    models_dir = Path(models_dir)
    target = models_dir / entry.local_name
    if is_installed(target):
        log.debug("%s already in %s", entry.name, target)
        return target
    if from_dir is None and hub_offline(offline):
        why = "offline mode is on (model.offline)" if offline else f"{HF_OFFLINE_ENV} is set"
        raise ModelUnavailableError(
            f"Core ML model {entry.name} is not in {target} (no {MANIFEST} there) and {why}, so it cannot "
            f"be downloaded; {_fetch_hint(entry, models_dir)}"
        )
    if from_dir is not None:
        from_dir = Path(from_dir).expanduser()
        if not from_dir.is_dir():
            raise ModelUnavailableError(
                f"--from {from_dir}: no such folder; point it at a copy of the hub repo "
                f"{entry.sources[-1].repo_id} (holding {entry.sources[-1].folder}/{MANIFEST})"
            )

    models_dir.mkdir(parents=True, exist_ok=True)
    # One staging folder per call, inside models_dir so the final move is a rename on one filesystem,
    # and unique so two workers fetching at once do not write into each other's files.
    staging = Path(tempfile.mkdtemp(dir=models_dir, prefix=f"{STAGING_PREFIX}{entry.name}-"))
    tried: list[str] = []
    try:
        for i, source in enumerate(_sources(entry, from_dir)):
            where = f"{from_dir / source.folder}" if from_dir is not None else f"{source.repo_id}/{source.folder}"
            dest = staging / f"source-{i}"
            try:
                if from_dir is not None:
                    count = _copy_matching(from_dir, source, dest, progress=progress)
                    if count == 0:
                        tried.append(f"{where}: not there")
                        continue
                else:
                    log.info("downloading %s from %s (about %d MB)", entry.name, source.repo_id, entry.approx_size_mb)
                    _snapshot(source, dest, progress=progress)
            except Exception as exc:  # a dead repo or network error only means: try the next source
                tried.append(f"{where}: {type(exc).__name__}: {exc}")
                log.info("%s: %s: %s; trying the next source", where, type(exc).__name__, exc)
                continue
            problem = _package_problem(dest / source.folder)
            if problem is not None:
                tried.append(f"{where}: {problem}")
                log.info("%s: %s; trying the next source", where, problem)
                continue
            if is_installed(target):  # someone else finished first; theirs is as good as ours
                return target
            _install(dest / source.folder, target, staging)
            log.info("%s ready in %s (from %s)", entry.name, target, where)
            return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    origin = f"--from {from_dir}" if from_dir is not None else "the hub"
    raise ModelUnavailableError(
        f"could not get Core ML model {entry.name} into {target} from {origin}; tried: {'; '.join(tried)}. "
        f"{_fetch_hint(entry, models_dir)}"
    )


def _sources(entry: CatalogEntry, from_dir: Path | None) -> list[Source]:
    """The hub sources; for a local folder, each repo layout once, then our own models/ layout."""
    if from_dir is None:
        return list(entry.sources)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    out: list[Source] = []
    for source in (*entry.sources, Source.of("local", entry.local_name)):
        key = (source.folder, source.allow_patterns)
        if key not in seen:
            seen.add(key)
            out.append(source)
    return out


def _snapshot(source: Source, dest: Path, *, progress: bool) -> None:
    """One hub repo's matching files into `dest`, with the hub's own progress bar unless told not to."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        snapshot_download(
            repo_id=source.repo_id,
            revision=source.revision,
            allow_patterns=list(source.allow_patterns),
            local_dir=dest,
        )
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()


def _copy_matching(root: Path, source: Source, dest: Path, *, progress: bool) -> int:
    """Copy the files of `root` that the source's patterns allow, keeping repo-relative paths; returns the count.

    Only the source's own folder is walked (its patterns name nothing else), so pointing --from at a big
    folder stays quick.
    """
    from huggingface_hub.utils import filter_repo_objects

    top = root / source.folder
    if not top.is_dir():
        return 0
    relative = sorted(p.relative_to(root).as_posix() for p in top.rglob("*") if p.is_file())
    chosen = list(filter_repo_objects(relative, allow_patterns=list(source.allow_patterns)))
    total = sum((root / rel).stat().st_size for rel in chosen)
    with _bar(total, f"copying {source.folder}", enabled=progress) as bar:
        for rel in chosen:
            src, out = root / rel, dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as fin, open(out, "wb") as fout:
                while chunk := fin.read(16 << 20):
                    fout.write(chunk)
                    bar.update(len(chunk))
            shutil.copystat(src, out)
    return len(chosen)


@contextmanager
def _bar(total: int, desc: str, *, enabled: bool) -> Iterator[Any]:
    """A tqdm byte counter (tqdm comes with huggingface_hub), or a silent stand-in when progress is off."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)
    try:
        yield bar
    finally:
        bar.close()


def _package_problem(package: Path) -> str | None:
    """Why `package` is not a usable .mlpackage, or None. Catches the usual copy mistakes early.

    Git and the hub keep no empty folders, so an empty `weights` folder (a model with no large weights)
    is lost on the way; folder items the manifest names are re-created rather than called missing.
    """
    if not package.is_dir():
        return f"no {package.name} folder (no file matched)"
    manifest = package / MANIFEST
    if not manifest.is_file():
        return f"{package.name} has no {MANIFEST}"
    try:
        items = json.loads(manifest.read_text(encoding="utf-8"))["itemInfoEntries"].values()
        paths = [package / "Data" / str(item["path"]) for item in items]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{package.name}/{MANIFEST} is not a Core ML package manifest ({type(exc).__name__}: {exc})"
    for path in paths:
        if path.exists():
            continue
        if path.suffix:
            return f"{path.relative_to(package.parent)} is missing (an incomplete copy?)"
        path.mkdir(parents=True)
    for item in package.rglob("*"):
        if item.is_file() and item.stat().st_size < 512 and item.read_bytes().startswith(_LFS_POINTER):
            rel = item.relative_to(package.parent)
            return f"{rel} is a Git LFS pointer, not the file (run `git lfs pull` in the copied repo)"
    return None


def _install(fetched: Path, target: Path, staging: Path) -> None:
    """Put `fetched` at `target` with one rename; an incomplete leftover there is moved aside first."""
    if target.exists() or target.is_symlink():
        os.replace(target, staging / "previous")
    os.replace(fetched, target)


# --- listing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """A Core ML model found under models/: what it is, how big, and its I/O (or why that is unknown)."""

    path: Path
    format: PackageFormat
    size_bytes: int
    entry: CatalogEntry | None
    inputs: tuple[FeatureInfo, ...] | None
    outputs: tuple[FeatureInfo, ...] | None
    io_error: str | None = None
    # What the backend would make of it, read from the same spec; None with why in `contract_error`.
    contract: CoreMLContract | None = None
    contract_error: str | None = None

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def metric(self) -> bool | None:
        """From the catalog; None for a model the catalog does not know (the backend reads its spec)."""
        return self.entry.metric if self.entry is not None else None


_SUFFIXES: dict[str, PackageFormat] = {".mlpackage": "mlpackage", ".mlmodelc": "mlmodelc", ".mlmodel": "mlmodel"}


def list_models(models_dir: Path) -> list[ModelInfo]:
    """Every Core ML model under `models_dir`, sorted by path; hidden folders (staging, .compiled) are skipped."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    return [_describe(path) for path in sorted(_find_packages(models_dir))]


def _find_packages(root: Path) -> Iterator[Path]:
    for current, dirs, files in os.walk(root):
        here = Path(current)
        for d in list(dirs):
            if d.startswith("."):
                dirs.remove(d)
            elif Path(d).suffix in _SUFFIXES:
                dirs.remove(d)  # a package is one model; do not look inside it
                yield here / d
        for f in files:
            if not f.startswith(".") and Path(f).suffix == ".mlmodel":
                yield here / f


def _describe(path: Path) -> ModelInfo:
    info = ModelInfo(
        path=path,
        format=_SUFFIXES[path.suffix],
        size_bytes=_size_on_disk(path),
        entry=entry_for_folder(path.name),
        inputs=None,
        outputs=None,
    )
    if path.suffix == ".mlmodelc":
        why = "unknown: a compiled .mlmodelc holds no readable spec; keep the .mlpackage next to it"
        return replace(info, io_error=why)
    try:
        spec = read_spec(path)
        inputs = tuple(feature_info(f) for f in spec.description.input)
        outputs = tuple(feature_info(f) for f in spec.description.output)
    except Exception as exc:
        return replace(info, io_error=f"unreadable: {type(exc).__name__}: {exc}")
    info = replace(info, inputs=inputs, outputs=outputs)
    try:
        return replace(info, contract=detect_contract(spec, str(path)))
    except ModelUnavailableError as exc:
        return replace(info, contract_error=str(exc))


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def format_size(size_bytes: int) -> str:
    """1.9 GB, 745 MB: the way the hub shows sizes, so the two can be compared at a glance."""
    size, unit = float(size_bytes), "B"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            break
        size /= 1000
    return f"{size:.1f} {unit}" if unit in ("MB", "GB") and size < 100 else f"{size:.0f} {unit}"
