"""Reading request bodies: JSON (base64 images) or multipart (file parts), into validated
options and image bytes — nothing else. A client names no URL and no server path: an
image is the bytes it sends, so the service never fetches a link or opens a file a
request names.

Errors (all in the envelope): 415 ``unsupported_media_type`` for another content type,
400 ``invalid_json`` for a body that is not JSON, 422 ``invalid_request`` for fields that
do not match the schema (unknown fields included), 422 ``invalid_base64`` naming the
field, 422 ``unknown_field`` / ``missing_image`` / ``expected_file`` for multipart parts,
413 ``too_many_images`` above the per-request limit.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from facemetric.service.errors import ApiError, validation_details

_DATA_URL = re.compile(r"^data:[^,;]*(;[^,;]*)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")


@dataclass(frozen=True)
class ImageRequestSpec:
    """One endpoint's image request: the JSON model, the options model (the JSON model's
    fields without the images), the image fields (name → whether it repeats) and the
    options that multipart carries as JSON text."""

    json_model: type[BaseModel]
    options_model: type[BaseModel]
    files: dict[str, bool]
    json_options: tuple[str, ...] = ()


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(kind: str) -> bool:
    return kind == "application/json" or (kind.startswith("application/") and
                                          kind.endswith("+json"))


def decode_base64(text: str, field: str) -> bytes:
    """Standard or URL-safe base64 (whitespace ignored, a ``data:...;base64,`` prefix
    allowed) → bytes; :class:`ApiError` 422 ``invalid_base64`` naming ``field``."""
    data = _DATA_URL.sub("", text, count=1).encode("ascii", "replace")
    data = _WHITESPACE.sub(b"", data)
    try:
        if b"-" in data or b"_" in data:
            return base64.b64decode(data, altchars=b"-_", validate=True)
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(422, "invalid_base64",
                       f"{field} is not valid base64 ({err}); encode the image file's bytes "
                       f"with standard base64", {"field": field}) from err


def _validate(model: type[BaseModel], data: Any, *, raw_json: bool = False) -> BaseModel:
    try:
        if raw_json:
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as err:
        details = validation_details(err.errors())
        if any(d["type"] == "json_invalid" for d in details):
            raise ApiError(400, "invalid_json", "the body is not valid JSON; send a JSON object",
                           details) from None
        fields = ", ".join(d["field"] or "body" for d in details[:5])
        raise ApiError(422, "invalid_request",
                       f"the request does not match the API ({fields}); see details and /docs",
                       details) from None


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    """A JSON body validated against ``model``."""
    kind = media_type(request)
    if not _is_json(kind):
        raise ApiError(415, "unsupported_media_type",
                       f"this endpoint takes application/json, got {kind or 'no content type'}")
    return _validate(model, await request.body(), raw_json=True)


async def read_image_request(
    request: Request, spec: ImageRequestSpec, max_images: int
) -> tuple[Any, dict[str, list[bytes]]]:
    """``(options, images by field)`` of an image request (module docstring)."""
    kind = media_type(request)
    if _is_json(kind):
        parsed = _validate(spec.json_model, await request.body(), raw_json=True)
        images: dict[str, list[bytes]] = {}
        raw = parsed.model_dump()
        count = sum(len(raw[f]) if many else 1 for f, many in spec.files.items())
        _check_count(count, max_images)
        for name, many in spec.files.items():
            values = raw[name] if many else [raw[name]]
            images[name] = [decode_base64(v, f"{name}[{i}]" if many else name)
                            for i, v in enumerate(values)]
        options = spec.options_model.model_validate(
            {k: v for k, v in raw.items() if k not in spec.files})
        return options, images
    if kind == "multipart/form-data":
        return await _read_multipart(request, spec, max_images)
    raise ApiError(415, "unsupported_media_type",
                   f"send images as multipart/form-data (file parts) or application/json "
                   f"(base64), not {kind or 'a body without a content type'}")


def _check_count(count: int, max_images: int) -> None:
    if count > max_images:
        raise ApiError(413, "too_many_images",
                       f"{count} images in one request; the limit is {max_images}: split them "
                       f"over several requests", {"limit": max_images})


async def _read_multipart(
    request: Request, spec: ImageRequestSpec, max_images: int
) -> tuple[Any, dict[str, list[bytes]]]:
    option_names = set(spec.options_model.model_fields)
    form = await request.form(max_files=10_000, max_fields=10_000)
    try:
        files: dict[str, list[bytes]] = {name: [] for name in spec.files}
        options: dict[str, Any] = {}
        count = 0
        for name, value in form.multi_items():
            if name in spec.files:
                if not isinstance(value, UploadFile):
                    raise ApiError(422, "expected_file",
                                   f"part {name!r} must be a file (an image), got a text value",
                                   {"field": name})
                count += 1
                if count <= max_images:  # beyond: counted, not read (refused below)
                    files[name].append(await value.read())
            elif name in option_names:
                if not isinstance(value, str):
                    raise ApiError(422, "invalid_request", f"part {name!r} must be text, got a "
                                   f"file", {"field": name})
                if name in options:
                    raise ApiError(422, "invalid_request", f"part {name!r} is given twice",
                                   {"field": name})
                options[name] = value
            else:
                allowed = sorted([*spec.files, *option_names])
                raise ApiError(422, "unknown_field",
                               f"unknown part {name!r}; this endpoint takes {allowed}",
                               {"field": name, "allowed": allowed})
        for name, many in spec.files.items():
            if not files[name]:
                raise ApiError(422, "missing_image", f"the image part {name!r} is missing",
                               {"field": name})
            if not many and len(files[name]) > 1:
                raise ApiError(422, "invalid_request",
                               f"part {name!r} takes one image, got {len(files[name])}",
                               {"field": name})
        for name in spec.json_options:
            if name in options:
                try:
                    options[name] = json.loads(options[name])
                except json.JSONDecodeError as err:
                    raise ApiError(422, "invalid_request",
                                   f"part {name!r} must be JSON text: {err}",
                                   {"field": name}) from None
        validated = _validate(spec.options_model, options)  # schema errors first (422)
        _check_count(count, max_images)
        return validated, files
    finally:
        await form.close()


__all__ = ["ImageRequestSpec", "decode_base64", "media_type", "read_image_request",
           "read_json"]
