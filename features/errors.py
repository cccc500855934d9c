"""The liftrec error hierarchy.

Every error the engine raises on purpose derives from :class:`LiftrecError`, so
an entry point can catch one class and turn it into a clear message (CLI) or a
4xx/5xx answer (HTTP API)::

    LiftrecError
    ├── ConfigError            settings that cannot work (bad URL, missing value)
    ├── StackUnavailable       no broker / Redis to talk to (not started, not reachable)
    ├── InvalidEvent           a clickstream or catalog record failed validation
    ├── InvalidData            an input file that cannot be used (corrupt, empty, unknown columns)
    ├── UnknownUser            a user id the store has never seen (serving falls back, never 500s)
    ├── UnknownItem            an item id outside the current catalog / model
    ├── InvalidBundle          a model bundle that failed validation (never switched to)
    └── StoreUnavailable       Redis failed after bounded retries

Each class carries the HTTP status an API should answer with.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "InvalidBundle",
    "InvalidData",
    "InvalidEvent",
    "LiftrecError",
    "StackUnavailable",
    "StoreUnavailable",
    "UnknownItem",
    "UnknownUser",
]


class LiftrecError(Exception):
    """Base class of every error liftrec raises on purpose."""

    http_status: int = 500

    def to_detail(self) -> dict[str, str]:
        """The error as a JSON-able detail for API answers."""
        return {"error": type(self).__name__, "message": str(self)}


class ConfigError(LiftrecError):
    """Settings that cannot work."""

    http_status = 500


class StackUnavailable(LiftrecError):
    """No broker or Redis to talk to."""

    http_status = 503


class InvalidEvent(LiftrecError):
    """A record failed validation.

    Parameters
    ----------
    reason : str
        Short machine-readable code such as ``"bad_json"`` or ``"missing_field"``.
    message : str
        Human-readable explanation saying what was expected.
    """

    http_status = 422

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def to_detail(self) -> dict[str, str]:
        return {"error": "InvalidEvent", "reason": self.reason, "message": self.message}


class InvalidData(LiftrecError):
    """An input file or table that cannot be used."""

    http_status = 400


class UnknownUser(LiftrecError):
    """A user id the store has never seen."""

    http_status = 404


class UnknownItem(LiftrecError):
    """An item id outside the current catalog or model."""

    http_status = 404


class InvalidBundle(LiftrecError):
    """A model bundle that failed validation; it is never made current."""

    http_status = 500


class StoreUnavailable(LiftrecError):
    """Redis failed after bounded retries."""

    http_status = 503
