"""Images -> model-ready pixels: the one path that training (the collator) and prediction share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor


def pixel_values(processor: Any, images: Sequence[Any]) -> Tensor:
    """``(B, 3, H, W)`` pixels of ``images`` from the backbone's image ``processor``.

    PIL images of any mode (grayscale ``L``, ``RGBA``, palette ...) are converted to RGB first: the
    backbones read three channels, and an image processor would otherwise guess the channel layout or
    keep an alpha channel. Arrays are passed through as they are.
    """
    from PIL import Image

    rgb = [image.convert("RGB") if isinstance(image, Image.Image) else image for image in images]
    return processor(images=rgb, return_tensors="pt")["pixel_values"]
