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


class ModelUnavailableError(RuntimeError):
    """The model cannot be loaded here; the message says how to fetch or point to it."""


class BackendUnavailableError(RuntimeError):
    """The configured backend cannot run on this machine; the message names the setting to change."""
