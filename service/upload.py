"""Receive a multipart upload straight into a job's folder, in chunks.

Starlette's `request.form()` spools files to the system temporary folder and only
checks sizes after the fact. This parser streams the body through python-multipart,
writes the `file` part into the job's own folder as it arrives, and raises 413 as
soon as the size limit is passed, so memory stays flat whatever the upload's size.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import ServiceError

MAX_FIELD_BYTES = 64 * 1024
"""Largest plain form field accepted (a prompt is the longest one expected)."""

MAX_FIELDS = 64
FLUSH_BYTES = 1024 * 1024
"""Buffered file bytes written to disk per call, in a worker thread."""


@dataclass
class Upload:
    """A stored upload: the file on disk and the plain form fields that came with it."""

    path: Path
    filename: str
    size: int = 0
    fields: dict[str, list[str]] = field(default_factory=dict)

    def value(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None


def display_name(raw: str | None) -> str:
    """Return a printable version of a client's file name, safe to echo in JSON and headers."""
    if not raw:
        return "upload"
    # Browsers and httpx send '"', CR and LF in multipart file names as %22, %0D and
    # %0A, as the WHATWG form encoding requires. Decoding them restores the name sent.
    raw = raw.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    return name.strip()[:200] or "upload"


def _stored_suffix(name: str) -> str:
    # ffmpeg identifies media by content. A short alphanumeric extension is kept only
    # as a hint for raw formats, and nothing else from the client's name reaches disk.
    suffix = Path(name).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""


def _too_large(limit: int) -> ServiceError:
    return ServiceError(
        f"upload is larger than the limit of {limit} bytes; send a smaller file "
        "or raise STREAMSCRIBE_MAX_UPLOAD_BYTES",
        code="upload_too_large",
        status_code=413,
    )


def check_content_length(request: Request, limit: int) -> None:
    """Reject at once a request whose declared `Content-Length` is over `limit`."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MAX_FIELDS * MAX_FIELD_BYTES:
        raise _too_large(limit)


async def receive_upload(request: Request, folder: Path, *, max_bytes: int) -> Upload:
    """Parse the multipart body of `request`, storing its `file` part under `folder`.

    Raises `ServiceError` with 400 for a body that is not multipart or has no file,
    and 413 once the file passes `max_bytes`.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ServiceError(
            "request body must be multipart/form-data with a 'file' field; "
            "for example: curl -F file=@video.mp4 URL",
            code="invalid_content_type",
            status_code=400,
        )

    upload: Upload | None = None
    fields: dict[str, list[str]] = {}
    header_field = bytearray()
    header_value = bytearray()
    headers: dict[str, str] = {}
    part_name: str | None = None
    part_is_file = False
    field_value = bytearray()
    pending = bytearray()
    handle = None
    errors: list[ServiceError] = []

    def on_part_begin() -> None:
        nonlocal part_name, part_is_file
        headers.clear()
        part_name, part_is_file = None, False
        field_value.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        # latin-1 keeps one character per byte: parse_options_header encodes the
        # parameters back to latin-1, and the file name's bytes are decoded as UTF-8 below.
        headers[header_field.decode("latin-1").lower()] = header_value.decode("latin-1")
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        nonlocal part_name, part_is_file, upload
        _, options = parse_options_header(headers.get("content-disposition", ""))
        part_name = options.get(b"name", b"").decode("utf-8", "replace")
        raw_filename = options.get(b"filename")
        part_is_file = part_name == "file" and raw_filename is not None
        if part_is_file:
            if upload is not None:
                errors.append(ServiceError("send exactly one 'file' field", code="too_many_files"))
                return
            filename = display_name(raw_filename.decode("utf-8", "replace"))
            upload = Upload(path=folder / f"input{_stored_suffix(filename)}", filename=filename)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if errors:
            return
        if part_is_file:
            assert upload is not None
            upload.size += end - start
            if upload.size > max_bytes:
                errors.append(_too_large(max_bytes))
                return
            pending.extend(data[start:end])
        else:
            field_value.extend(data[start:end])
            if len(field_value) > MAX_FIELD_BYTES:
                errors.append(ServiceError(
                    f"form field {part_name!r} is longer than {MAX_FIELD_BYTES} bytes",
                    code="field_too_large",
                ))

    def on_part_end() -> None:
        if part_is_file or part_name is None or errors:
            return
        values = fields.setdefault(part_name, [])
        if sum(len(v) for v in fields.values()) >= MAX_FIELDS:
            errors.append(ServiceError(f"more than {MAX_FIELDS} form fields", code="too_many_fields"))
            return
        values.append(field_value.decode("utf-8", "replace"))

    parser = MultipartParser(
        boundary,
        callbacks={
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except Exception as error:  # python-multipart raises several types for bad bodies
                raise ServiceError(
                    f"malformed multipart body: {error}", code="invalid_multipart"
                ) from error
            if errors:
                raise errors[0]
            if upload is not None and len(pending) >= FLUSH_BYTES:
                handle = handle or await asyncio.to_thread(open, upload.path, "wb")
                data = bytes(pending)
                pending.clear()
                await asyncio.to_thread(handle.write, data)
        parser.finalize()
        if errors:
            raise errors[0]
        if upload is None:
            raise ServiceError(
                "the form has no 'file' field; send the media as a file, for example "
                "curl -F file=@video.mp4 URL",
                code="missing_file",
            )
        handle = handle or await asyncio.to_thread(open, upload.path, "wb")
        await asyncio.to_thread(handle.write, bytes(pending))
    except ClientDisconnect as error:
        raise ServiceError("the client closed the connection during the upload",
                           code="client_disconnected") from error
    except OSError as error:
        raise _storage_error(error) from error
    finally:
        if handle is not None:
            await asyncio.to_thread(handle.close)
    upload.fields = fields
    return upload


def _storage_error(error: OSError) -> ServiceError:
    import errno

    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ServiceError(
            "the server's temporary storage is full; try again later",
            code="insufficient_storage",
            status_code=507,
        )
    return ServiceError(f"could not store the upload: {error.strerror}", code="storage_failed",
                        status_code=503)
