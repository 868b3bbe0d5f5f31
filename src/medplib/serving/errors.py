"""Errors the server adds to medplib's own, and the HTTP status of every MedplibError.

Bodies follow OpenAI's shape, `{"error": {"message", "type", "code"}}`, so any OpenAI client
shows the message."""

from __future__ import annotations

from medplib.errors import CheckpointError, ConfigError, DataValidationError, InputError, MedplibError


class PayloadTooLarge(InputError):
    """An upload over the byte limit or an image over the pixel limit."""


class Unauthorized(MedplibError):
    """A missing or wrong API key."""


class UnknownModel(InputError):
    """A request that names a model this server does not serve."""


class PromptTooLong(InputError):
    """A prompt over the server's limits (characters, messages, regions) or the model's context."""


class ClientClosed(MedplibError):
    """The client went away before its request body arrived; nobody is left to answer."""


class QueueFull(MedplibError):
    """The request queue in front of the model is full; the client should retry later."""


# Most specific first: PayloadTooLarge, UnknownModel and PromptTooLong are InputErrors too.
_STATUS: list[tuple[type[MedplibError], int, str]] = [
    (PayloadTooLarge, 413, "payload_too_large"),
    (UnknownModel, 404, "model_not_found"),
    (PromptTooLong, 400, "context_length_exceeded"),  # OpenAI's code for a prompt over the context
    (ClientClosed, 499, "client_closed_request"),  # nginx's status for the same event
    (Unauthorized, 401, "invalid_api_key"),
    (QueueFull, 429, "queue_full"),
    (DataValidationError, 400, "invalid_request_error"),
    (InputError, 400, "invalid_request_error"),
    (ConfigError, 400, "invalid_request_error"),
    (CheckpointError, 500, "server_error"),
]


def status_of(exc: MedplibError) -> tuple[int, str]:
    """(HTTP status, error code) for an error."""
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            return status, code
    return 500, "server_error"


def error_body(message: str, code: str) -> dict:
    kind = "invalid_request_error" if code != "server_error" else "server_error"
    return {"error": {"message": message, "type": kind, "code": code}}
