"""The depthq job: one photo in, its depth set out. This is the only function a depthq worker runs.

Data flows one way: payload -> source bytes -> backend -> metric depth -> store. The worker process
builds a `Runtime` (loaded backend, transports, settings) once at start, and its `DepthJob` hands it
to every job as arq hands `ctx`: `process(runtime, payload)`. Nothing here is module state.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np
from redis.exceptions import RedisError
from rq import get_current_job
from rq.job import Job
from rq.timeouts import JobTimeoutException

from depthq import attempts
from depthq.camera import Camera
from depthq.clip_jobs import ClipPart
from depthq.contract import (
    Completion,
    JobPayload,
    PayloadError,
    alert_key,
    aliases_key,
    done_key,
    error_record,
    record_completion,
    record_recent,
)
from depthq.sidecar import Sidecar
from worker import clip_job
from worker.backends.base import Prediction, describe_model
from worker.depth import MetricDepth, depth_stats, metric_depth_of
from worker.errors import (
    BadInputError,
    EnvironmentUnavailableError,
    ExpectedError,
    OutputUnavailableError,
    RefusedJobError,
    SourceGoneError,
    SourceUnreadableError,
    TimedOutError,
    WorkerDiedError,
)
from worker.formats import Scene
from worker.images import LoadedImage, load_image
from worker.preview import preview_png
from worker.runtime import Runtime, ms, queue_wait_s, stage
from worker.store import HandedOverError, SupersededError
from worker.transport import AlreadyDoneError, Copies, Photo, PhotoGoneError, Transport

# The job's result, as rq stores it: the photo it was computed for (a byte-identical copy's name, when
# the job's own photo was gone), the copies that got the same result, and the timings.
JobResult = dict[str, Any]

log = logging.getLogger(__name__)


def _drain_aliases(rt: Runtime, jid: str, source: str) -> list[str]:
    """Take the copies that arrived while this job was pending, and mark the job done, in one step."""
    q = rt.config.queue
    with rt.connection.pipeline(transaction=True) as pipe:
        pipe.smembers(aliases_key(q.name, jid))
        pipe.delete(aliases_key(q.name, jid))
        pipe.set(done_key(q.name, jid), source, ex=max(q.result_ttl_s, 60))
        members, _, _ = pipe.execute()
    return _names(members, source)


def _take_aliases(rt: Runtime, jid: str) -> list[str]:
    """Take the copies queued as aliases without marking the job done: for a job whose own photo is gone
    or cannot be used, each copy is then computed instead, or recorded with the same error."""
    q = rt.config.queue
    with rt.connection.pipeline(transaction=True) as pipe:
        pipe.smembers(aliases_key(q.name, jid))
        pipe.delete(aliases_key(q.name, jid))
        members, _ = pipe.execute()
    return _names(members, None)


def _close_aliases(rt: Runtime, jid: str) -> list[str]:
    """Take the copies queued as aliases and mark the job as ended with no result to copy (an empty done
    marker), in one step: a copy the producer finds after this gets a job of its own at once, instead
    of waiting in a set that no one will take it from until the next rescan."""
    return _drain_aliases(rt, jid, "")


def _return_aliases(rt: Runtime, jid: str, aliases: list[str]) -> None:
    """Put back copies taken by `_take_aliases`: the job's result is written for them when it is done."""
    q = rt.config.queue
    with rt.connection.pipeline(transaction=True) as pipe:
        pipe.sadd(aliases_key(q.name, jid), *aliases)
        pipe.expire(aliases_key(q.name, jid), max(q.result_ttl_s, 60))
        pipe.execute()


def _names(members: Any, source: str | None) -> list[str]:
    """The alias set's names, without the job's own photo (a job enqueued again for a copy that had
    been its alias finds itself in the set: it is no copy of itself)."""
    names = (m.decode() if isinstance(m, bytes) else str(m) for m in members if m)
    return sorted(name for name in names if name != source)


def _scene(rt: Runtime, rgb: np.ndarray, camera: Camera) -> Scene:
    out = rt.config.output
    return Scene(rgb, camera, rt.backend.input_size, out.ply_max_points, out.ply_max_depth_m)


def _try_copy(
    rt: Runtime, copies: Copies, p: JobPayload, job_id: str, photo: Photo, t0: float, queue_wait: float
) -> JobResult | None:
    """A byte-identical photo was already computed: reuse its stored result instead of the model."""
    assert p.same_as is not None
    if p.same_as == p.source:
        return None  # its own earlier result: that is no copy, and the photo is computed
    stored = copies.stored_result(p.same_as)
    sha = hashlib.sha256(photo.data).hexdigest()
    if stored is None or stored.sidecar.sha256 != sha or stored.sidecar.requested_model != p.model:
        return None
    depth, preview, sidecar = stored.depth, stored.preview, stored.sidecar
    t_write = time.perf_counter()
    timings = {"queue_wait": ms(queue_wait), "decode": 0.0, "inference": 0.0, "postprocess": 0.0}
    camera = sidecar.camera
    scene = None
    if "ply" in p.outputs and camera is not None:
        # The point cloud's colours: a decode, still far cheaper than the model.
        image = load_image(photo.data, p.source, rt.config.worker.max_image_pixels)
        scene = _scene(rt, image.rgb, camera)
    copies.output.write_data(p.source, depth, preview, p.outputs, scene)
    timings["write"] = ms(time.perf_counter() - t_write)
    timings["total"] = ms(time.perf_counter() - t0 + queue_wait)
    copies.output.write_sidecar(p.source, sidecar.for_photo(p.source, job_id, timings, photo.stamp, p.same_as))
    log.info("%s: depth copied from %s, %s ms (job %s)", p.source, p.same_as, timings, job_id)
    return {"source": p.source, "copied_from": p.same_as, "aliases": [], "timings_ms": timings}


def _read_photo(rt: Runtime, transport: Transport, p: JobPayload, job: Job | None) -> tuple[JobPayload, Photo]:
    """The job's photo; if it is no longer at its name (moved or deleted while queued), a byte-identical
    copy queued as its alias is read instead, and the job is that copy's: a photo moved inside the
    folder gets its depth under its new name at once, not at the next rescan."""
    job_id = job.id if job else "local"
    try:
        return p, transport.read(p, job_id)
    except SourceGoneError:
        # Only a name with no file: a photo there that cannot be read gets its own error file.
        copies = transport.copies
        if job is None or copies is None or p.same_as is not None:
            raise
        # First the copies queued so far; then, closing the set (an empty done marker, so a copy arriving
        # from now on gets a job of its own at once), the ones that came meanwhile.
        for take in (_take_aliases, _close_aliases):
            aliases = take(rt, job_id)
            for i, alias in enumerate(aliases):
                try:
                    photo = copies.read_copy(p.root, alias)
                except SourceUnreadableError:
                    continue
                if hashlib.sha256(photo.data).hexdigest() != p.sha256:
                    continue  # changed since it was queued: it is new content, and gets its own job
                if aliases[i + 1 :]:
                    _return_aliases(rt, job_id, aliases[i + 1 :])
                log.info("%s is no longer at its name; computing its byte-identical copy %s instead", p.source, alias)
                return replace(p, source=alias), photo
        raise


def _describe(
    rt: Runtime,
    p: JobPayload,
    photo: Photo,
    sha: str,
    image: LoadedImage,
    prediction: Prediction,
    md: MetricDepth,
    stats: dict[str, Any],
) -> Sidecar:
    """What the result says of itself: the photo, its camera, the depth, the model that ran and any
    warning the user should read (`Sidecar.for_photo` then names it for each photo it is written for)."""
    ran = describe_model(rt.backend)
    # The model the job asked for (the producer's model.path), when this worker ran another.
    requested = p.model if ran.get("source", ran["name"]) != p.model else None
    model = {**ran, "backend": rt.backend.name, "device": rt.backend.device}
    warnings = list(rt.backend.warnings)
    if requested is not None:
        model["requested"] = requested
        warnings.append(f"the job asked for model {requested}; this worker ran {ran['name']} ({rt.backend.name})")
    if "ply" in p.outputs and md.camera is None:
        warnings.append("no point cloud: neither the model nor the photo's EXIF gives a focal length")
    if p.sha256 and sha != p.sha256:
        # The file changed after it was enqueued; this describes what was actually read.
        warnings.append("the photo changed after it was enqueued; this result is for its current content")
    return Sidecar(
        source=p.source,
        sha256=sha,
        source_stat=photo.stamp,
        width=image.width,
        height=image.height,
        fov_deg=md.fov_deg,
        fov_vertical_deg=md.fov_vertical_deg,
        focal_length_px=md.focal_length_px,
        focal_length_source=md.focal_length_source,
        focal_length_35mm=image.focal_length_35mm,
        fov_model_deg=prediction.fov_deg,
        camera=md.camera,
        depth=stats,
        model=model,
        worker={"host": rt.host, "name": rt.worker_name},
        warnings=tuple(warnings),
    )


def _compute(rt: Runtime, p: JobPayload, job: Job | None) -> JobResult:
    t0 = time.perf_counter()
    queue_wait = queue_wait_s(job)
    job_id = job.id if job else "local"
    stage(rt, job, "decoding")
    transport = rt.transports[p.transport]
    copies = transport.copies
    p, photo = _read_photo(rt, transport, p, job)
    if p.same_as is not None and copies is not None:
        copied = _try_copy(rt, copies, p, job_id, photo, t0, queue_wait)
        if copied is not None:
            return copied
    sha = hashlib.sha256(photo.data).hexdigest()
    # By default the model sees exactly the reference's input: the full decode, resized bilinearly.
    reduce_to = rt.backend.input_size if rt.config.worker.fast_decode else None
    image = load_image(photo.data, p.source, rt.config.worker.max_image_pixels, min_side=reduce_to)
    t_decoded = time.perf_counter()
    stage(rt, job, "inferring", {"queue_wait": ms(queue_wait), "decode": ms(t_decoded - t0)})
    with rt.predicting():
        prediction = rt.backend.predict(image.rgb)
    t_inferred = time.perf_counter()
    stage(
        rt,
        job,
        "writing",
        {"queue_wait": ms(queue_wait), "decode": ms(t_decoded - t0), "inference": ms(t_inferred - t_decoded)},
    )
    md = metric_depth_of(p.source, prediction, image.width, image.height, image.focal_length_35mm)
    preview = preview_png(md.depth, rt.backend.input_size)
    depth = md.depth
    camera = md.camera
    scene = _scene(rt, image.rgb, camera) if camera is not None and "ply" in p.outputs else None
    stats = depth_stats(depth, rt.backend.input_size)
    t_post = time.perf_counter()
    timings = {
        "queue_wait": ms(queue_wait),
        "decode": ms(t_decoded - t0),
        "inference": ms(t_inferred - t_decoded),
        "postprocess": ms(t_post - t_inferred),
    }
    result = _describe(rt, p, photo, sha, image, prediction, md, stats)
    store = transport.store(job_id, p, photo)
    store.write_data(p.source, depth, preview, p.outputs, scene)
    timings["write"] = ms(time.perf_counter() - t_post)
    timings["total"] = ms(time.perf_counter() - t0 + queue_wait)
    store.write_sidecar(p.source, result.for_photo(p.source, job_id, timings, photo.stamp))
    # Copies queued as aliases get this result only if it is of the content they were queued with;
    # otherwise they stay in the set and the producer gives them their own job on its next look.
    # (The redis transport queues none: a worker there cannot read a copy's file.)
    aliases = _drain_aliases(rt, job_id, p.source) if job and sha == p.sha256 else []
    for alias in aliases if copies is not None else []:
        _write_alias(copies, alias, sha, depth, preview, result, job_id, timings, p, scene)
    log.info("%s: depth %.2f-%.2f m, %s ms (job %s)", p.source, stats["min"], stats["max"], timings, job_id)
    return {"source": p.source, "aliases": aliases, "timings_ms": timings}


def _write_alias(
    copies: Copies,
    alias: str,
    sha: str,
    depth: np.ndarray,
    preview: bytes,
    result: Sidecar,
    job_id: str,
    timings: dict[str, float],
    p: JobPayload,
    scene: Scene | None,
) -> None:
    """Outputs for a byte-identical copy, stamped with the copy's own stat, if it still holds that content."""
    try:
        photo = copies.read_copy(p.root, alias)
    except BadInputError as exc:
        log.warning("not writing the copy's result: %s", exc)
        return
    if hashlib.sha256(photo.data).hexdigest() != sha:
        log.info("%s changed since it was queued as a copy of %s; it gets its own job", alias, p.source)
        return
    sidecar = result.for_photo(alias, job_id, timings, photo.stamp, copied_from=p.source)
    copies.output.write_result(alias, depth, preview, sidecar, p.outputs, scene)


def _record_failure(rt: Runtime, p: JobPayload, job: Job | None, exc: BaseException) -> None:
    """The error file of the job's photo. Copies queued as aliases have the same content, so the same
    fate: each gets the error too, naming the photo it is a copy of, at once rather than at the next
    rescan (zero-byte files, which all share one hash, are the common case). Not for a photo that could
    not be read at its name: that says nothing of the content, and `_read_photo` tried the copies."""
    kind = "timed_out" if isinstance(exc, JobTimeoutException) else getattr(exc, "kind", type(exc).__name__)
    transport = rt.transports[p.transport]
    copies = transport.copies
    job_id = job.id if job else "local"
    store = transport.store(job_id)
    store.write_error(p.source, error_record(p.source, job_id, kind, str(exc), transport.stamp(p)))
    named = [p.source]
    same_content = not isinstance(exc, SourceUnreadableError)
    if job is not None and copies is not None and p.same_as is None and same_content:
        for alias in _close_aliases(rt, job_id):
            try:
                photo = copies.read_copy(p.root, alias)
            except BadInputError:
                continue
            if hashlib.sha256(photo.data).hexdigest() != p.sha256:
                continue  # changed since it was queued: it gets its own job
            message = f"{alias}: the same content as {p.source}, which failed: {exc}"
            store.write_error(alias, error_record(alias, job_id, kind, message, photo.stamp))
            named.append(alias)
    _recent(rt, named)


def _recent(rt: Runtime, sources: list[str]) -> None:
    """Name the photos with new outputs for the gallery, which shows the newest without listing the tree."""
    try:
        with rt.connection.pipeline(transaction=False) as pipe:
            for source in sources:
                record_recent(pipe, rt.config.queue.name, source)
            pipe.execute()
    except RedisError as exc:
        log.warning("could not list %s among the newest results (%s)", ", ".join(sources), exc)


def _finish(rt: Runtime, job: Job | None, timings: dict[str, float]) -> None:
    """Final timings on the job, a completion for `depthq status`, and the Prometheus figures."""
    stage(rt, job, "done", timings)
    if rt.metrics is not None:
        rt.metrics.observe_done(timings)
    if job is None:
        return
    completion = Completion(
        job_id=job.id,
        host=rt.host,
        backend=rt.backend.name,
        ended_at=time.time(),
        queue_wait_s=timings.get("queue_wait", 0.0) / 1000.0,
        total_s=timings.get("total", 0.0) / 1000.0,
    )
    try:
        with rt.connection.pipeline(transaction=False) as pipe:
            record_completion(pipe, rt.config.queue.name, completion)
            # A result was written, so the output folder takes writes: whichever worker (perhaps one
            # since restarted) said it was full, `depthq status` must not say so any longer.
            pipe.delete(alert_key(rt.config.queue.name, "output"))
            pipe.execute()
    except RedisError as exc:
        log.warning("job %s: could not record its completion for `depthq status` (%s)", job.id, exc)


# How long `depthq status` shows the alert after the last failed write; each failure renews it, and any
# worker's next successful write clears it (`_finish`).
_ALERT_TTL_S = 900


def _output_trouble(rt: Runtime, exc: OutputUnavailableError | None) -> None:
    """Say once that the output folder refuses writes (and once that it takes them again), and keep
    the condition in Redis for `depthq status` while it lasts."""
    if exc is not None:
        try:
            message = f"output disk full or unwritable: {exc}"
            rt.connection.set(alert_key(rt.config.queue.name, "output"), message, ex=_ALERT_TTL_S)
        except RedisError as redis_exc:
            log.warning("could not record the output folder's state for depthq status (%s)", redis_exc)
    if exc is not None and rt.output_failing.begins():
        log.error("%s", exc)
    elif exc is None and rt.output_failing.ends():
        log.warning("output.dir %s takes writes again; the photos held back follow", rt.config.output.dir)


def _failed(rt: Runtime) -> None:
    if rt.metrics is not None:
        rt.metrics.observe_failed()


def _judge_deaths(rt: Runtime, p: JobPayload, before: attempts.Attempts, part: ClipPart | None) -> None:
    """After `worker.retries` attempts that each died with their worker, record the photo, never run it.
    For a clip's chunk the messages name its frames, and the clip's error file records them."""
    what = p.source if part is None or part.part != "chunk" else f"{p.source} (frames {part.start}-{part.last})"
    if before.died < max(1, rt.config.worker.retries):
        if before.died:
            log.warning(
                "%s: the worker died in %d earlier attempt(s) (%s); trying again",
                what,
                before.died,
                before.describe(),
            )
        return
    if before.timed_out:
        raise TimedOutError(
            f"{what}: ran past queue.job_timeout_s ({rt.config.queue.job_timeout_s} s) in {before.died} "
            f"attempts ({before.describe()}); each was ended from outside the stuck thread. depthq will not "
            "send it again until the file changes; if the file is fine elsewhere, raise queue.job_timeout_s"
        )
    raise WorkerDiedError(
        f"{what}: the worker died in {before.died} attempts at it ({before.describe()}); depthq "
        "will not send it again until the file changes. Check that it opens elsewhere; if it does, report it "
        "with the worker's log"
    )


def process(rt: Runtime, payload: dict[str, Any]) -> JobResult:
    """The job function (`depthq.contract.JOB_FUNCTION`). `DepthJob` passes `rt` before the payload
    the producer enqueued; rq's own workers are refused it (they have no runtime to pass)."""
    job = get_current_job()
    try:
        p = JobPayload.from_dict(payload)
        part = ClipPart.from_dict(p.clip) if p.clip is not None else None
    except PayloadError as exc:
        _failed(rt)
        raise RefusedJobError(f"job {job.id if job else '?'}: {exc}") from None
    counted = job is not None
    if counted:
        # Before the photo is touched: if it kills this process, the next attempt knows.
        # The running marker outlives the hard time limit, so whoever sees this process die can still read it.
        marker_ttl_s = 2 * rt.config.queue.job_timeout_s + 3 * rt.config.worker.dead_after_s
        before = attempts.begin(rt.connection, rt.config.queue.name, job.id, rt.host, os.getpid(), marker_ttl_s)
    environment_failed = False
    try:
        if counted:
            _judge_deaths(rt, p, before, part)
        result = clip_job.run(rt, p, part, job) if part is not None else _compute(rt, p, job)
    except HandedOverError:
        raise  # the worker it was handed to owns it now; DepthWorker leaves the job alone
    except AlreadyDoneError as exc:
        log.info("%s", exc)
        return {"source": p.source, "already_done": True}
    except SupersededError as exc:
        log.info("%s", exc)
        return {"source": p.source, "superseded": True}
    except SourceGoneError as exc:
        # Moved or deleted before its turn, with no copy to compute instead: nothing to do, and no error
        # file for a photo that is not there. Should it come back, the watcher sees it and sends it again.
        log.info("%s; nothing to compute", exc)
        return {"source": p.source, "gone": True}
    except EnvironmentUnavailableError as exc:
        # The folder's fault, not the photo's: no error file, no attempt spent; DepthWorker puts the job
        # back with back-off.
        environment_failed = True
        _failed(rt)
        if isinstance(exc, OutputUnavailableError):
            _output_trouble(rt, exc)
        else:
            log.error("%s", exc)
        raise
    except PhotoGoneError as exc:
        # Not the photo's fault: no error file, so the producer's next look gives it a new job.
        _failed(rt)
        log.warning("%s", exc)
        raise
    except ExpectedError as exc:
        _failed(rt)
        _record_failure(rt, p, job, exc)
        log.warning("%s", exc)
        raise
    except Exception as exc:
        _failed(rt)
        # Unexpected: rq retries with backoff. Only the last attempt leaves an error file behind. The
        # retries left are depthq's own count, not rq's: a process that is not a depthq worker (a
        # plain `rq worker` on the queue) may have spent rq's without ever running this function.
        if job is not None:
            job.retries_left = max(0, rt.config.worker.retries - before.started)
        if job is None or not job.retries_left:
            _record_failure(rt, p, job, exc)
        raise
    finally:
        if counted:
            # Redis gone: the attempt then reads as died, and is retried.
            with contextlib.suppress(RedisError):
                end = attempts.cancel if environment_failed else attempts.end
                end(rt.connection, rt.config.queue.name, job.id, rt.host, os.getpid())
    _output_trouble(rt, None)
    _finish(rt, job, result["timings_ms"])
    if not result.get("staged"):  # a clip's chunk has no result to show until its clip is assembled
        _recent(rt, [result["source"], *result["aliases"]])
    return result
