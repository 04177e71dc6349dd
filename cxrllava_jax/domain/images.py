"""Radiograph decoding and preprocessing: any PNG/JPEG/TIFF (8 or 16 bit, gray/RGB/RGBA) or DICOM file ->
`uint8 [size, size, 1]` model pixels (`model_pixels`) -> `float32 [size, size, 1]`, normalised as the model
expects (`normalise`; `preprocess` is both).

The release feeds CLIPImageProcessor with an 8-bit grayscale image: shortest edge resized to the model size with
LANCZOS, center crop, x/255, (x - mean) / std. We do the same after bringing other pixel data into the 8-bit
range:
- 16-bit (and 32-bit integer or float) images: their own [min, max] stretched linearly onto [0, 255];
- DICOM: the modality LUT (rescale slope/intercept or LUT sequence), then the first VOI transform, whose output
  range becomes [0, 255]: a VOI LUT sequence's table (output range = the table's [min, max]) or window centre /
  width (DICOM's LINEAR, LINEAR_EXACT or SIGMOID function); without either, [min, max] as above;
  MONOCHROME1 (high values dark) is inverted last; a file whose tags say it is not a frontal chest radiograph is
  refused (`radiograph_guard`);
- colour: ITU-R 601 luma (PIL's 'L' conversion); RGBA is composited over black first.
(Pillow cannot decode 12-bit JPEG; 16-bit sources come as PNG, TIFF or DICOM.)

Files past our size limits (MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS) are refused before they are decoded, and every
failure to decode, whatever the decoder raises, is an InputError naming the file, so a batch can skip it.
"""

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cxrllava_jax.domain import radiograph_guard
from cxrllava_jax.errors import ConfigError, InputError

# The release's ViT patch: an image smaller than this on either side cannot make a single patch.
RELEASE_PATCH_SIZE = 16
# Limits of ours, far above any radiograph (a 43x43 cm detector at 100 um is 4300x4300 pixels, 37 MB in 16 bit):
# files past them are refused, not decoded into gigabytes.
MAX_IMAGE_BYTES = 256 * 2**20
MAX_IMAGE_PIXELS = 100_000_000
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def load_grayscale(path, allow_non_frontal: bool = False) -> Image.Image:
    """Any supported file -> an 8-bit grayscale PIL image (`radiograph_guard` decides what is refused)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    _check_bytes(path.stat().st_size, path)
    return decode_grayscale(path.read_bytes(), path, allow_non_frontal)


def is_dicom_file(path) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then "DICM" (whatever the file is called)."""
    with open(path, "rb") as f:
        return is_dicom(f.read(132))


def is_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def decode_grayscale(data: bytes, origin, allow_non_frontal: bool = False) -> Image.Image:
    """The bytes of a supported file (named `origin` in errors; its suffix may mark DICOM) -> 8-bit grayscale."""
    if not data:
        raise InputError(f"{origin}: image file is empty")
    _check_bytes(len(data), origin)
    if str(origin).lower().endswith((".dcm", ".dicom")) or is_dicom(data):
        return Image.fromarray(dicom_to_uint8(io.BytesIO(data), origin, allow_non_frontal))
    try:
        with warnings.catch_warnings():  # PIL's own pixel limit only warns below twice its value; ours decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        _check_pixels(image.size[0] * image.size[1], origin)
        image.load()
        radiograph_guard.check_image(image, origin)
        return to_uint8_gray(image, origin)
    except InputError:
        raise
    except Image.DecompressionBombError as error:
        raise InputError(f"{origin}: more than {MAX_IMAGE_PIXELS:,} pixels ({error})") from error
    except Exception as error:  # decoders raise many types for broken files; each is this file's failure
        raise InputError(f"{origin}: cannot decode image ({type(error).__name__}: {error})") from error


def _check_bytes(size: int, origin):
    if size > MAX_IMAGE_BYTES:
        raise InputError(f"{origin}: {size:,} bytes is past the {MAX_IMAGE_BYTES:,}-byte limit for one image")


def _check_pixels(count: int, origin):
    if count > MAX_IMAGE_PIXELS:
        raise InputError(f"{origin}: {count:,} pixels is past the {MAX_IMAGE_PIXELS:,}-pixel limit for one image")


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


def dicom_to_uint8(source, origin, allow_non_frontal: bool = False) -> np.ndarray:
    """DICOM pixel data -> uint8 [H, W] through the modality LUT, the first VOI transform and MONOCHROME1.

    Compressed transfer syntaxes (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE) decode through
    pydicom's Pillow and pylibjpeg plugins (pylibjpeg-libjpeg, -openjpeg, -rle: dependencies of this package)."""
    import pydicom

    try:
        ds = pydicom.dcmread(source)
    except Exception as error:  # pydicom raises many types for broken files
        raise InputError(f"{origin}: cannot read DICOM ({type(error).__name__}: {error})") from error
    if not allow_non_frontal:
        radiograph_guard.check_dicom(ds, origin)  # before decoding: a refused file costs no decode
    _check_pixels(int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0), origin)
    try:
        pixels = ds.pixel_array
    except Exception as error:  # and many more for pixel data it cannot decode
        raise InputError(f"{origin}: cannot decode DICOM pixel data ({type(error).__name__}: {error}); "
                         f"transfer syntax {ds.file_meta.get('TransferSyntaxUID', 'unknown')}") from error
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(f"{origin}: multi-frame DICOM ({ds.NumberOfFrames} frames); a radiograph has one")
    try:
        return _dicom_gray(pixels, ds, photometric)
    except InputError as error:
        raise InputError(f"{origin}: {error}") from error
    except Exception as error:  # a malformed LUT or window tag: this file's failure, not the batch's
        raise InputError(f"{origin}: cannot apply the DICOM pixel transforms ({type(error).__name__}: {error})") \
            from error


def _dicom_gray(pixels: np.ndarray, ds, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:  # colour (pydicom returns RGB, also for YBR): luma like the PNG path
        return np.asarray(_array_to_pil(pixels))
    if not photometric.startswith("MONOCHROME"):
        raise InputError(f"photometric interpretation {photometric!r} with one sample per pixel is not supported")
    pixels = np.asarray(apply_modality_lut(pixels, ds), np.float64)
    image = _apply_voi(pixels, ds)
    return 255 - image if photometric == "MONOCHROME1" else image


def _apply_voi(pixels: np.ndarray, ds) -> np.ndarray:
    if ds.get("VOILUTSequence"):  # present and not empty; an empty sequence holds no transform
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
    if not (np.isfinite(center) and np.isfinite(width)):
        raise InputError(f"window center {center} / width {width} is not a number")
    if function in ("SIGMOID", "LINEAR_EXACT") and width <= 0:
        raise InputError(f"window width {width} <= 0 is invalid for the {function} VOI function")
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
               min_size: int = RELEASE_PATCH_SIZE, allow_non_frontal: bool = False) -> np.ndarray:
    """Path (or stored image file) / PIL image / array -> float32 [size, size, 1] normalised.

    `mode` is 'crop' (the release: shortest edge to `size`, center crop) or 'pad' (letterbox). An image smaller
    than `min_size` (the model's patch) on either side is refused, and so is a DICOM file whose tags say it is
    not a frontal chest radiograph unless `allow_non_frontal`.
    """
    return normalise(model_pixels(image, size, mode, min_size, allow_non_frontal), mean, std)


def model_pixels(image, size: int, mode: str = "crop", min_size: int = RELEASE_PATCH_SIZE,
                 allow_non_frontal: bool = False) -> np.ndarray:
    """`preprocess` up to, not including, normalisation: uint8 [size, size, 1]. Deterministic, so it can be
    done once and stored (`cxrllava preprocess`); training then normalises on the accelerator."""
    if mode not in ("crop", "pad"):
        raise ConfigError(f"image mode must be 'crop' or 'pad', got {mode!r}")
    if hasattr(image, "model_pixels"):  # already preprocessed and stored (tfds_builders.StoredPixels)
        return image.model_pixels(size, mode)
    origin = image if isinstance(image, (str, Path)) else "image"
    if isinstance(image, (str, Path)):
        image = load_grayscale(image, allow_non_frontal)
    elif hasattr(image, "read_bytes"):  # an image file held elsewhere (tfds_builders.StoredImage), named by str()
        origin = image
        image = decode_grayscale(image.read_bytes(), image, allow_non_frontal)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    else:
        radiograph_guard.check_image(image, origin)
        image = to_uint8_gray(image, origin)
    if min(image.size) < min_size:
        raise InputError(f"{origin}: image {image.size[0]}x{image.size[1]} is smaller than one "
                         f"{min_size}-pixel patch")
    image = resize_and_crop(image, size) if mode == "crop" else letterbox(image, size)
    return np.asarray(image, np.uint8)[..., None]


def normalise(pixels, mean: float, std: float):
    """uint8 pixels -> float32 (x / 255 - mean) / std, with numpy on the host or jax.numpy on the device
    (the same float32 operations in the same order; under jit XLA may fuse the multiply and the subtraction
    into one multiply-add, which moves some values by one float32 rounding)."""
    scaled = pixels.astype(np.float32) * np.float32(1.0 / 255.0)
    return (scaled - np.float32(mean)) / np.float32(std)


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
