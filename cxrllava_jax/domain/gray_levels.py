"""Pixel values of any depth -> 8-bit gray levels, in bounded memory.

Images deeper than 8 bits are windowed in float64 a block of rows at a time (`map_blocks`, `value_range`), so a
6000x6000 16-bit image needs a few 8 MB temporaries beside its own pixels rather than three full float64 copies.
"""

import numpy as np
from PIL import Image

from cxrllava_jax.domain.image_headers import BLOCK_PIXELS
from cxrllava_jax.errors import InputError

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's 'L' conversion


def window_to_uint8(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] onto [0, 255], rounded and clipped; a constant image becomes 0."""
    if high <= low:
        return np.zeros(pixels.shape, np.uint8)
    return np.clip(np.rint((pixels - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def array_to_gray(array: np.ndarray, origin) -> np.ndarray:
    """[H, W], [H, W, 1] or colour [H, W, 3|4] of any dtype -> uint8 [H, W]. 8-bit colour becomes luma as PIL's
    'L' conversion; deeper colour is weighted the same way, then stretched like gray."""
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.dtype == np.uint8:
        return np.asarray(Image.fromarray(np.ascontiguousarray(array[..., :3])).convert("L"))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(f"{origin}: an image array must be [H, W] or [H, W, 1|3|4], got shape {array.shape}")
    if array.dtype == np.uint8 and array.ndim == 2:
        return array
    return stretch_to_uint8(array, origin)


def stretch_to_uint8(pixels: np.ndarray, origin) -> np.ndarray:
    """[H, W] (or [H, W, 3|4] colour as luma) of any dtype -> uint8 [H, W]: its own [min, max] onto [0, 255]."""
    if pixels.ndim == 3:
        def values(block):
            return block[..., :3].astype(np.float64) @ LUMA
    else:
        def values(block):
            return block.astype(np.float64)
    low, high = value_range(pixels, values, origin)
    if low == high:
        raise InputError(f"{origin}: every pixel is {low:g}: a constant image, no radiograph")
    return map_blocks(pixels, lambda block: window_to_uint8(values(block), low, high))


def map_blocks(pixels: np.ndarray, transform) -> np.ndarray:
    """uint8 transform(pixels) computed a block of rows at a time."""
    out = np.empty(pixels.shape[:2], np.uint8)
    for rows in _blocks(pixels):
        out[rows] = transform(pixels[rows])
    return out


def value_range(pixels: np.ndarray, transform, origin) -> tuple[float, float]:
    """[min, max] of transform(pixels), block by block; NaN or infinite values are the file's fault."""
    low, high = np.inf, -np.inf
    for rows in _blocks(pixels):
        block = transform(pixels[rows])
        if not np.isfinite(block).all():
            raise InputError(f"{origin}: the pixel values include NaN or infinity")
        low, high = min(low, float(block.min())), max(high, float(block.max()))
    return low, high


def _blocks(pixels: np.ndarray):
    step = max(1, BLOCK_PIXELS // max(1, pixels.shape[1]))
    return [slice(start, start + step) for start in range(0, pixels.shape[0], step)]
