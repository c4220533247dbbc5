"""Codecs of stored objects: images as lossless 8-bit PNG or as JPEG; one decoder reads both."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg"}  # recover.image_format -> object name extension


def _pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0], mode="L") if array.shape[2] == 1 else Image.fromarray(array, mode="RGB")


def encode_png(image: torch.Tensor) -> bytes:
    """A [C,H,W] float image in [0,1] as lossless 8-bit PNG."""
    buf = io.BytesIO()
    _pil(image).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(image: torch.Tensor, quality: int = 75) -> bytes:
    """A [C,H,W] float image in [0,1] as 8-bit JPEG at ``quality`` (Pillow's default 75, 4:2:0 chroma)."""
    buf = io.BytesIO()
    _pil(image).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def encode_image(image: torch.Tensor, image_format: str, quality: int = 75) -> bytes:
    """The stored object of an image in ``image_format`` (png or jpeg)."""
    return encode_jpeg(image, quality) if image_format == "jpeg" else encode_png(image)


def decode_png_uint8(data: bytes) -> torch.Tensor:
    """PNG or JPEG bytes (Pillow reads the format from the bytes) back to a [C,H,W] uint8 image."""
    array = np.asarray(Image.open(io.BytesIO(data)))
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def decode_png(data: bytes) -> torch.Tensor:
    """PNG or JPEG bytes back to a [C,H,W] float image in [0,1]."""
    return decode_png_uint8(data).float() / 255.0
