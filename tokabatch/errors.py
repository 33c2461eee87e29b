"""The error tree: every failure a user, a file, a model folder or the GPU can cause is one of these.

The HTTP layer renders any `TokabatchError` once, as OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}` with `status` as the HTTP status; the CLI prints
`message` as one line. Imports nothing but the stdlib.
"""

from __future__ import annotations


class TokabatchError(Exception):
    """Base class. `status` is the HTTP status it maps to; `type` is OpenAI's error type."""

    status: int = 400
    type: str = "invalid_request_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def to_dict(self) -> dict:
        """The OpenAI error envelope for this error."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(TokabatchError):
    """A request the endpoint rejects (bad parameter, prompt too long, malformed body)."""

    status = 400


class AuthenticationFailed(TokabatchError):
    status = 401
    default_code = "invalid_api_key"


class NotFound(TokabatchError):
    status = 404


class MethodNotAllowed(TokabatchError):
    status = 405


class Conflict(TokabatchError):
    """A state conflict (cancel a finished batch, delete an in-use file); never worth retrying."""

    status = 409


class PayloadTooLarge(TokabatchError):
    status = 413


class InternalError(TokabatchError):
    status = 500
    type = "server_error"


class InsufficientStorage(TokabatchError):
    """The disk (or the database's) is full: nothing was stored; retry once space is freed."""

    status = 507
    type = "server_error"
    default_code = "insufficient_storage"


class EngineUnavailable(TokabatchError):
    """The engine process is not running or died; the work is retried or re-queued."""

    status = 503
    type = "server_error"
    default_code = "engine_unavailable"


class ConfigError(TokabatchError):
    """A bad setting (flag, environment variable, config file)."""


class ModelLoadError(TokabatchError):
    """A model folder that cannot be served: unknown architecture, missing weight, shape mismatch."""

    type = "model_error"


class ModelFetchError(TokabatchError):
    """The demo model could not be fetched or converted (no network, checksum mismatch)."""

    type = "model_error"
