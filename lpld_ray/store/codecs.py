"""Codecs of stored objects: images as lossless 8-bit PNG."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def encode_png(image: torch.Tensor) -> bytes:
    """A [C,H,W] float image in [0,1] as lossless 8-bit PNG."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    mode = "L" if array.shape[2] == 1 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def decode_png_uint8(data: bytes) -> torch.Tensor:
    """PNG bytes back to a [C,H,W] uint8 image."""
    array = np.asarray(Image.open(io.BytesIO(data)))
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes back to a [C,H,W] float image in [0,1]."""
    return decode_png_uint8(data).float() / 255.0
