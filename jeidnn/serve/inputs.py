"""The body of ``POST /predict``, checked before it reaches the model: every refusal is an :class:`HttpError`
with a status code and one line naming the bad value.

A request is a JSON object ``{"inputs": [...], "alpha": 0.1}`` (``alpha`` optional: the model's default).
A text model takes texts (strings); an image model takes ``{"image": "<base64 PNG or JPEG>"}`` objects.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Any

from jeidnn.errors import first_line

__all__ = ["HttpError", "parse_predict", "read_limited"]

FIELDS = ("inputs", "alpha")


class HttpError(Exception):
    """A request refused with ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def read_limited(request: Any, limit: int, what: str = "request body") -> bytes:
    """The body of a Starlette ``request``; 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"the {what} has {int(declared)} bytes; this server accepts at most {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HttpError(413, f"the {what} exceeds {limit} bytes, the most this server accepts")
    return bytes(body)


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
    return names.get(type(value), "null" if value is None else f"a {type(value).__name__}")


def _image(value: Any, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, dict):
        hint = "; this is an image model" if isinstance(value, str) else ""
        raise HttpError(422, f'{where} is {_kind(value)}{hint}: send {{"image": "<base64 PNG or JPEG>"}}')
    if set(value) != {"image"} or not isinstance(value["image"], str):
        raise HttpError(422, f'{where} must be {{"image": "<base64 PNG or JPEG>"}}, got keys {sorted(value)}')
    try:
        raw = base64.b64decode(value["image"], validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(422, f"{where}.image is not base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise HttpError(422, f"{where}.image is not an image PIL can read: {first_line(exc)}") from None
    return image.convert("RGB")


def _text(value: Any, where: str) -> str:
    if isinstance(value, dict) and "image" in value:
        raise HttpError(422, f"{where} is an image; this is a text model: send texts as strings")
    if not isinstance(value, str):
        raise HttpError(422, f"{where} is {_kind(value)} ({json.dumps(value)[:40]}), not a text")
    if not value.strip():
        raise HttpError(422, f"{where} is an empty text; send some words")
    return value


def parse_predict(body: bytes, modality: str, max_inputs: int) -> tuple[list[Any], float | None]:
    """The inputs (texts, or RGB PIL images for an image model) and ``alpha`` of a request body.

    Raises:
        HttpError: 400 for a body that is not JSON, 413 for more than ``max_inputs`` inputs, 422 for a JSON
            value of the wrong shape or type.
    """
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"the request body is not valid JSON ({first_line(exc)})") from None
    if not isinstance(request, dict):
        raise HttpError(422, f'the request body is {_kind(request)}; send an object {{"inputs": [...]}}')
    unknown = sorted(set(request) - set(FIELDS))
    if unknown:
        raise HttpError(422, f"unknown field {unknown[0]!r}; a request has `inputs` and optionally `alpha`")
    if "inputs" not in request:
        raise HttpError(422, 'the request has no `inputs`; send {"inputs": [...]}')
    inputs = request["inputs"]
    if not isinstance(inputs, list):
        raise HttpError(422, f"`inputs` is {_kind(inputs)}; send a list of inputs")
    if not inputs:
        raise HttpError(422, "`inputs` is empty; send at least one input")
    if len(inputs) > max_inputs:
        raise HttpError(413, f"`inputs` holds {len(inputs)} inputs; this server takes at most {max_inputs}")
    parse = _image if modality == "image" else _text
    items = [parse(value, f"inputs[{i}]") for i, value in enumerate(inputs)]
    alpha = request.get("alpha")
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise HttpError(
                422, f"`alpha` is {_kind(alpha)} ({json.dumps(alpha)}); send a number such as 0.1"
            )
        alpha = float(alpha)
    return items, alpha
