"""Radiograph decoding and preprocessing: any PNG/JPEG (8 or 16 bit, gray/RGB/RGBA) or DICOM file ->
`float32 [size, size, 1]`, normalised as the model expects.

The release feeds CLIPImageProcessor with an 8-bit grayscale image: shortest edge resized to the model
size with LANCZOS, center crop, x/255, (x - mean) / std. We do the same, after bringing 16-bit and
DICOM pixel data into the 8-bit range (DICOM through its modality and VOI LUTs, MONOCHROME1 inverted).
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class InputError(ValueError):
    """A record that cannot be used; the message names the file or row and what is wrong."""


def load_grayscale(path) -> Image.Image:
    """Any supported file -> an 8-bit grayscale PIL image."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    data = path.read_bytes()
    if not data:
        raise InputError(f"{path}: image file is empty")
    if path.suffix.lower() in (".dcm", ".dicom") or data[128:132] == b"DICM":
        return Image.fromarray(dicom_to_uint8(path))
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InputError(f"{path}: cannot decode image ({error})") from error
    return to_uint8_gray(image, path)


def to_uint8_gray(image: Image.Image, origin="image") -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        return Image.fromarray(window_to_uint8(pixels, pixels.min(), pixels.max()))
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (0, 0, 0))
        background.paste(image, mask=image.getchannel("A"))
        image = background
    if image.mode not in ("L", "RGB", "P", "LA", "1"):
        raise InputError(f"{origin}: unsupported image mode {image.mode}")
    return image.convert("L")


def window_to_uint8(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] onto [0, 255], clipped."""
    if high <= low:
        return np.zeros(pixels.shape, np.uint8)
    return np.clip(np.rint((pixels - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def dicom_to_uint8(path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as error:  # pydicom raises many types for broken files
        raise InputError(f"{path}: cannot read DICOM pixel data ({error})") from error
    pixels = apply_modality_lut(pixels, ds)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        pixels = apply_voi_lut(pixels, ds, index=0)
    pixels = np.asarray(pixels, np.float64)
    image = window_to_uint8(pixels, pixels.min(), pixels.max())
    if getattr(ds, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        image = 255 - image  # MONOCHROME1: high values are dark
    return image


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


def preprocess(image, size: int, mean: float, std: float, mode: str = "crop", min_size: int = 1) -> np.ndarray:
    """Path / PIL image / array -> float32 [size, size, 1] normalised."""
    origin = image if isinstance(image, (str, Path)) else "image"
    if isinstance(image, (str, Path)):
        image = load_grayscale(image)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    else:
        image = to_uint8_gray(image, origin)
    if min(image.size) < min_size:
        raise InputError(f"{origin}: image {image.size[0]}x{image.size[1]} is smaller than one {min_size}-pixel patch")
    image = resize_and_crop(image, size) if mode == "crop" else letterbox(image, size)
    pixels = np.asarray(image, np.float32) * (1.0 / 255.0)
    return ((pixels - mean) / std)[..., None]


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return to_uint8_gray(Image.fromarray(array.astype(np.uint8)))
    array = np.squeeze(array)
    if array.ndim != 2:
        raise InputError(f"an image array must be [H, W] or [H, W, 1|3|4], got shape {array.shape}")
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    return Image.fromarray(window_to_uint8(array.astype(np.float64), float(array.min()), float(array.max())))
