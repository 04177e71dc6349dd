"""Radiograph decoding and preprocessing: any PNG/JPEG/TIFF (8 or 16 bit, gray/RGB/RGBA) or DICOM file ->
`float32 [size, size, 1]`, normalised as the model expects.

The release feeds CLIPImageProcessor with an 8-bit grayscale image: shortest edge resized to the model size with
LANCZOS, center crop, x/255, (x - mean) / std. We do the same after bringing other pixel data into the 8-bit
range:
- 16-bit (and 32-bit integer or float) images: their own [min, max] stretched linearly onto [0, 255];
- DICOM: the modality LUT (rescale slope/intercept or LUT sequence), then the first VOI transform, whose output
  range becomes [0, 255]: a VOI LUT sequence's table (output range = the table's [min, max]) or window centre /
  width (DICOM's LINEAR, LINEAR_EXACT or SIGMOID function); without either, [min, max] as above;
  MONOCHROME1 (high values dark) is inverted last;
- colour: ITU-R 601 luma (PIL's 'L' conversion); RGBA is composited over black first.
(Pillow cannot decode 12-bit JPEG; 16-bit sources come as PNG, TIFF or DICOM.)
"""

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxrllava_jax.errors import InputError

# The release's ViT patch: an image smaller than this on either side cannot make a single patch.
RELEASE_PATCH_SIZE = 16
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def load_grayscale(path) -> Image.Image:
    """Any supported file -> an 8-bit grayscale PIL image."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    return decode_grayscale(path.read_bytes(), path)


def decode_grayscale(data: bytes, origin) -> Image.Image:
    """The bytes of a supported file (named `origin` in errors; its suffix may mark DICOM) -> 8-bit grayscale."""
    if not data:
        raise InputError(f"{origin}: image file is empty")
    if str(origin).lower().endswith((".dcm", ".dicom")) or data[128:132] == b"DICM":
        return Image.fromarray(dicom_to_uint8(io.BytesIO(data), origin))
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{origin}: cannot decode image ({error})") from error
    return to_uint8_gray(image, origin)


def to_uint8_gray(image: Image.Image, origin="image") -> Image.Image:
    """A decoded PIL image of any mode -> 8-bit grayscale ('L')."""
    if image.mode in _HIGH_DEPTH_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        return Image.fromarray(window_to_uint8(pixels, pixels.min(), pixels.max()))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode not in ("L", "RGB", "RGBA", "P", "1", "CMYK", "YCbCr"):
        raise InputError(f"{origin}: unsupported image mode {image.mode}")
    return image.convert("L")


def window_to_uint8(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] onto [0, 255], rounded and clipped; a constant image becomes 0."""
    if high <= low:
        return np.zeros(pixels.shape, np.uint8)
    return np.clip(np.rint((pixels - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def dicom_to_uint8(source, origin) -> np.ndarray:
    """DICOM pixel data -> uint8 [H, W] through the modality LUT, the first VOI transform and MONOCHROME1."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(source)
        pixels = ds.pixel_array
    except Exception as error:  # pydicom raises many types for broken or undecodable files
        raise InputError(f"{origin}: cannot read DICOM pixel data ({type(error).__name__}: {error}); "
                         "compressed transfer syntaxes may need pylibjpeg plugins") from error
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(f"{origin}: multi-frame DICOM ({ds.NumberOfFrames} frames); a radiograph has one")
    if pixels.ndim == 3:  # colour (pydicom returns RGB): luma like the PNG path
        return np.asarray(Image.fromarray(pixels.astype(np.uint8)).convert("L"))
    pixels = np.asarray(apply_modality_lut(pixels, ds), np.float64)
    image = _apply_voi(pixels, ds)
    return 255 - image if photometric == "MONOCHROME1" else image


def _apply_voi(pixels: np.ndarray, ds) -> np.ndarray:
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        lut = _lut_data(item, entries or 65536, bits)
        index = np.clip(np.rint(pixels) - first, 0, len(lut) - 1).astype(np.int64)
        return window_to_uint8(lut[index], lut.min(), lut.max())
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return _window(pixels, _first(ds.WindowCenter), _first(ds.WindowWidth),
                       str(ds.get("VOILUTFunction", "LINEAR")).upper())
    return window_to_uint8(pixels, pixels.min(), pixels.max())


def _lut_data(item, entries: int, bits: int) -> np.ndarray:
    data = item.LUTData
    if isinstance(data, bytes):  # stored as OW: raw little-endian words
        data = np.frombuffer(data, "<u2" if bits > 8 else "u1")
    return np.asarray(data, np.float64).reshape(-1)[:entries]


def _first(value) -> float:
    """Window tags may hold several values (alternative windows); the first is the default."""
    return float(value[0] if isinstance(value, Sequence) else value)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing straight to [0, 255]."""
    if function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = (x - center) / width * 255.0 + 127.5
    elif function == "LINEAR":
        if width < 1:
            raise InputError(f"window width {width} < 1 is invalid for the LINEAR VOI function")
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    else:
        raise InputError(f"unknown VOI LUT function {function!r}")
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIPImageProcessor's resize (shortest edge = size, LANCZOS) and center crop."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    width, height = image.size
    top, left = (height - size) // 2, (width - size) // 2
    return image.crop((left, top, left + size, top + size))


def letterbox(image: Image.Image, size: int) -> Image.Image:
    """Longest edge = size, LANCZOS, padded with black to a square (keeps the whole field of view)."""
    width, height = image.size
    scale = size / max(width, height)
    resized = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(resized, ((size - resized.size[0]) // 2, (size - resized.size[1]) // 2))
    return canvas


def preprocess(image, size: int, mean: float, std: float, mode: str = "crop",
               min_size: int = RELEASE_PATCH_SIZE) -> np.ndarray:
    """Path (or stored image file) / PIL image / array -> float32 [size, size, 1] normalised.

    `mode` is 'crop' (the release: shortest edge to `size`, center crop) or 'pad' (letterbox). An image smaller
    than `min_size` (the model's patch) on either side is refused.
    """
    if mode not in ("crop", "pad"):
        raise ValueError(f"image mode must be 'crop' or 'pad', got {mode!r}")
    origin = image if isinstance(image, (str, Path)) else "image"
    if isinstance(image, (str, Path)):
        image = load_grayscale(image)
    elif hasattr(image, "read_bytes"):  # an image file held elsewhere (tfds_builders.StoredImage), named by str()
        origin = image
        image = decode_grayscale(image.read_bytes(), image)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    else:
        image = to_uint8_gray(image, origin)
    if min(image.size) < min_size:
        raise InputError(f"{origin}: image {image.size[0]}x{image.size[1]} is smaller than one "
                         f"{min_size}-pixel patch")
    image = resize_and_crop(image, size) if mode == "crop" else letterbox(image, size)
    pixels = np.asarray(image, np.float32) * np.float32(1.0 / 255.0)
    return ((pixels - np.float32(mean)) / np.float32(std))[..., None]


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if array.dtype == np.uint8:
            return to_uint8_gray(Image.fromarray(array))
        # Float or 16-bit colour: PIL's luma weights (as its 'L' conversion), then windowed like gray arrays.
        array = array[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    array = np.squeeze(array)
    if array.ndim != 2:
        raise InputError(f"an image array must be [H, W] or [H, W, 1|3|4], got shape {array.shape}")
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    return Image.fromarray(window_to_uint8(array.astype(np.float64), float(array.min()), float(array.max())))
