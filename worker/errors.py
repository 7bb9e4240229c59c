"""Failure types. Expected ones (a bad photo) are recorded once and never retried; the rest are retried."""

from __future__ import annotations


class ExpectedError(Exception):
    """The job cannot succeed however often it runs; rq must not retry it."""

    kind = "expected"


class BadInputError(ExpectedError):
    """The photo itself is unusable. The message names the file and what would fix it."""

    kind = "bad_input"


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


class OutputUnavailableError(RuntimeError):
    """The output folder refused a write for a reason of its own (full, over quota, read-only, I/O
    error): a failure of the environment, not of the photo. Retried with back-off, never recorded
    against the photo, so it is done by itself once the folder takes writes again."""

    def __init__(self, root: str, free: str, cause: OSError):
        super().__init__(
            f"output.dir {root}: {cause.strerror or cause} ({free}); photos wait and are retried with "
            "back-off: free space there (or fix the mount or quota) and they finish by themselves"
        )
        self.cause = cause


class ModelUnavailableError(RuntimeError):
    """The model cannot be loaded here; the message says how to fetch or point to it."""


class BackendUnavailableError(RuntimeError):
    """The configured backend cannot run on this machine; the message names the setting to change."""
