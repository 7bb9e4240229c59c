"""Failure types. Expected ones (a bad photo) are recorded once and never retried; the rest are retried."""

from __future__ import annotations


class ExpectedError(Exception):
    """The job cannot succeed however often it runs; rq must not retry it."""

    kind = "expected"


class BadInputError(ExpectedError):
    """The photo itself is unusable. The message names the file and what would fix it."""

    kind = "bad_input"


class SourceUnreadableError(BadInputError):
    """The photo's file cannot be read at its name (moved or deleted, not a file, no permission, a
    link out of the root): a fact about the name, not the content. A byte-identical copy queued as an
    alias of the same job is read instead, and the name only gets an error file if none can be."""


class SourceGoneError(SourceUnreadableError):
    """The photo no longer exists at its name: moved or deleted before its turn. Not recorded against
    it (there is nothing to record it against); the job ends, and the photo is sent again if it returns."""


class BadClipError(BadInputError):
    """A video clip, or the part of it a chunk job needs, cannot be decoded: damaged, over the pixel
    limit, or without timestamps. Like a bad photo, every worker would fail it alike, so it is recorded
    once; the message names the clip, the frame, and the fix."""


class ClipEndedError(BadClipError):
    """A chunk job's frames all lie past where the clip ends: the file was cut short after its header,
    or its frame count was overstated. Only a chunk with no frame at all fails; one the clip ends inside
    returns the frames it has and reports the rest (`worker.clip_frames.Shortfall`)."""


class RefusedJobError(ExpectedError):
    """A job this worker will not run: a foreign function or a payload outside the contract."""

    kind = "refused"


class WorkerDiedError(ExpectedError):
    """The photo's last attempts each ended with their worker dead (a crash in native code, or past the
    hard time limit): recorded instead of run once more, so one photo cannot take a fleet down."""

    kind = "worker_crashed"


class TimedOutError(WorkerDiedError):
    """Every such attempt ran past queue.job_timeout_s and was ended from outside the stuck thread."""

    kind = "timed_out"


class ModelOutputError(RuntimeError):
    """The model answered something no photo can have (a negative or absurd field of view): the
    fault is in the model's output, not the photo. Retried like any unexpected error, since another
    worker's model may answer well; the last attempt's error file says which it was."""

    kind = "model_output"


class EnvironmentUnavailableError(RuntimeError):
    """A folder refused a read or a write for a reason of its own (full, over quota, read-only, an I/O
    error, a share gone): a failure of the environment, not of the photo. The job is put back with
    back-off without spending a retry (`DepthWorker._postpone`), never recorded against the photo, so it
    is done by itself once the folder works again (`depthq.environment` says which failures these are)."""

    setting = "a folder"
    fix = "fix the folder"

    def __init__(self, root: str, free: str, cause: BaseException):
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        detail = f" ({free})" if free else ""
        super().__init__(
            f"{self.setting} {root}: {reason}{detail}; photos wait and are retried with back-off: "
            f"{self.fix}, and they finish by themselves"
        )
        self.cause = cause


class OutputUnavailableError(EnvironmentUnavailableError):
    """The output folder refused a write: full, over quota, read-only, an I/O error."""

    setting = "output.dir"
    fix = "free space there (or fix the mount or quota)"


class SourceUnavailableError(EnvironmentUnavailableError):
    """The photo's folder failed a read for a reason of the mount's (an I/O error, a share gone), not
    the photo's: a missing or unreadable file is a `SourceUnreadableError` instead."""

    setting = "the photo's folder"
    fix = "check the share or disk the photos are on"


class ModelUnavailableError(RuntimeError):
    """The model cannot be loaded here; the message says how to fetch or point to it."""


class BackendUnavailableError(RuntimeError):
    """The configured backend cannot run on this machine; the message names the setting to change."""


class BackendNotReadyError(RuntimeError):
    """The model could not load for a reason that may pass by itself (a full disk under the compile,
    Core ML's compiler service busy or gone, memory pressure): `depthq work` exits 75 (EX_TEMPFAIL),
    and its service manager starts it again, instead of the final exit of a model that never loads."""
