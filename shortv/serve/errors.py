"""How a request fails: `RequestError`, an HTTP status with OpenAI's error fields, raised
while a request is checked (`protocol`, `images`); and `EngineError`, what the batching
engine reports, named by kind (`Refusal`) rather than by status.

Each kind of refusal has one HTTP status and OpenAI error type and code, in `HTTP` below:
the engine says what went wrong, and this table alone says how a client is told.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class RequestError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    """A 400 (invalid_request_error)."""
    return RequestError(400, message, param=param, code=code)


class Refusal(Enum):
    """Why the engine could not answer a request."""

    BAD_INPUT = "bad input"  # the prompt, an image or an option cannot be used
    TOO_LONG = "too long"  # the prompt (with an explicit max_tokens) does not fit the context
    OVERLOADED = "overloaded"  # the queue is full
    SHUTTING_DOWN = "shutting down"  # the server stops before the request was answered
    INTERNAL = "internal"  # a fault of the server itself (its log has the traceback)


# How a client is told of each refusal: HTTP status, OpenAI error type, OpenAI error code.
HTTP: dict[Refusal, tuple[int, str, str | None]] = {
    Refusal.BAD_INPUT: (400, "invalid_request_error", None),
    Refusal.TOO_LONG: (400, "invalid_request_error", "context_length_exceeded"),
    Refusal.OVERLOADED: (429, "rate_limit_error", "queue_full"),
    Refusal.SHUTTING_DOWN: (503, "server_error", "server_shutting_down"),
    Refusal.INTERNAL: (500, "server_error", "internal_error"),
}


class EngineError(RequestError):
    """A request the engine refuses or fails, by kind; its status, type and code follow from
    the kind (`HTTP`). `param` names the request field at fault, if one is."""

    def __init__(self, kind: Refusal, message: str, *, param: str | None = None) -> None:
        status, type_, code = HTTP[kind]
        super().__init__(status, message, param=param, code=code, type=type_)
