"""Errors that reach the client, each with an HTTP status and a stable code."""

from __future__ import annotations


class ServiceError(Exception):
    """A failure the client should see: `message` states what went wrong and what to do."""

    status_code = 400
    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, status_code: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers or {}

    def to_json(self) -> dict[str, object]:
        # The same shape as OpenAI's API errors, so its SDK raises a readable exception.
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error" if self.status_code < 500 else "server_error",
                "code": self.code,
                "param": None,
            }
        }


class MediaError(ServiceError):
    """The upload cannot be used as media: empty, not media, incomplete, no audio."""

    status_code = 422
    code = "invalid_media"


class DecodeError(Exception):
    """ffmpeg failed or stalled while decoding a file that probed as valid."""

    def __init__(self, message: str, *, code: str = "decode_failed") -> None:
        super().__init__(message)
        self.code = code
