"""Radiograph decoding and preprocessing: any PNG/JPEG/TIFF (8 or 16 bit, gray/RGB/RGBA) or DICOM file ->
`uint8 [size, size, 1]` model pixels (`model_pixels`) -> `float32 [size, size, 1]`, normalised as the model
expects (`normalise`; `preprocess` is both).

The release feeds CLIPImageProcessor with an 8-bit grayscale image: shortest edge resized to the model size with
LANCZOS, center crop, x/255, (x - mean) / std. We do the same after bringing other pixel data into the 8-bit
range:
- 16-bit (and 32-bit integer or float) images: their own [min, max] stretched linearly onto [0, 255];
- DICOM: the modality LUT, the first VOI transform and MONOCHROME1 inversion (`dicom_pixels`);
- colour: ITU-R 601 luma (PIL's 'L' conversion); RGBA is composited over black first;
- an EXIF orientation (cameras, phones, some scanners) is applied, as image viewers do.
(Pillow cannot decode 12-bit JPEG; 16-bit sources come as PNG, TIFF or DICOM.)

Every file goes through one path, `decode_grayscale`, in this order:
1. the header alone (`image_headers.open_image`): byte, pixel and side limits, one image per file, 8 to 16 bits
   of gray levels, DICOM elements that agree with each other and with the pixel data's length;
2. the DICOM tags guard (`radiograph_guard.check_dicom`) unless `allow_non_frontal`; a lateral view passes only
   with `allow_lateral` (a study that has a frontal image, `studies.Study`);
3. the decode, then the validation step: decoded sizes equal the header's (Pillow silently fills a PNG whose
   data ends early with black: its data length is checked), no NaN, and no constant image;
4. for files without DICOM tags, the content guard (`radiograph_guard.check_content`: colour, shape) unless
   `allow_non_frontal`.
Every failure, whatever the decoder raises, is an InputError naming the file and the fault, so a batch can skip
it; a damaged image is never reported on.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cxrllava_jax import files
from cxrllava_jax.domain import dicom_pixels, radiograph_guard
from cxrllava_jax.domain.gray_levels import array_to_gray, stretch_to_uint8
from cxrllava_jax.domain.image_headers import check_bytes, check_png_complete, is_dicom, open_image
from cxrllava_jax.errors import ConfigError, InputError

# The release's ViT patch: an image smaller than this on either side cannot make a single patch.
RELEASE_PATCH_SIZE = 16
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def load_grayscale(path, allow_non_frontal: bool = False, allow_lateral: bool = False) -> Image.Image:
    """Any supported file -> an 8-bit grayscale PIL image (`radiograph_guard` decides what is refused)."""
    if path is None:
        raise InputError("no image given (the image path is None)")
    path = Path(path)
    if files.printable(path) != str(path):
        raise InputError(f"{files.printable(path)}: the file name is not UTF-8 text (shown with \\x escapes), so no "
                         "report or error record could name it; rename the file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give an image file (PNG, JPEG, TIFF or DICOM) inside it")
    if not path.is_file():
        raise InputError(f"{path}: image file not found" if not path.exists() else
                         f"{path}: not a regular file; give an image file (PNG, JPEG, TIFF or DICOM)")
    check_bytes(path.stat().st_size, path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror or error})") from None
    return decode_grayscale(data, path, allow_non_frontal, allow_lateral)


def is_dicom_file(path) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then "DICM" (whatever the file is called). A file that cannot be
    read is none (a folder of images is not refused for an unreadable stray file)."""
    try:
        with open(path, "rb") as f:
            return is_dicom(f.read(132))
    except OSError:
        return False


def decode_grayscale(data: bytes, origin, allow_non_frontal: bool = False,
                     allow_lateral: bool = False) -> Image.Image:
    """The bytes of a supported file (named `origin` in errors; its suffix may mark DICOM) -> 8-bit grayscale."""
    opened = open_image(data, origin)
    if opened.dicom:
        if not allow_non_frontal:
            radiograph_guard.check_dicom(opened.source, origin, allow_lateral)  # before decoding: a refused file costs no decode
        dicom_pixels.check_elements(opened.source, opened.header, origin)
        gray = Image.fromarray(dicom_pixels.to_uint8(opened.source, origin))
    else:
        image = _load(opened.source, data, origin)
        if not allow_non_frontal:
            radiograph_guard.check_content(image, origin)
        gray = to_uint8_gray(image, origin)
    return _validated(gray, origin)


def _load(image: Image.Image, data: bytes, origin) -> Image.Image:
    """Decodes a header-checked PIL image, checks it is complete and turns it as its EXIF orientation says."""
    try:
        image.load()
        if image.format == "PNG":  # before the turn: the check reads the last row the decoder wrote
            check_png_complete(image, data, origin)
        ImageOps.exif_transpose(image, in_place=True)
    except InputError:
        raise
    except Exception as error:  # decoders raise many types for broken files; each is this file's failure
        raise InputError(f"{origin}: cannot decode image ({type(error).__name__}: {error})") from error
    return image


def _validated(gray: Image.Image, origin) -> Image.Image:
    """The last check every decoded file passes: an image that shows nothing is no radiograph to report on."""
    low, high = gray.getextrema()
    if low == high:
        raise InputError(f"{origin}: every pixel of the image is {low} (after windowing): a constant image, no "
                         "radiograph")
    return gray


def to_uint8_gray(image: Image.Image, origin="image") -> Image.Image:
    """A decoded PIL image of any mode -> 8-bit grayscale ('L')."""
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(stretch_to_uint8(np.asarray(image), origin))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode not in ("L", "RGB", "RGBA", "P", "1", "CMYK", "YCbCr"):
        raise InputError(f"{origin}: unsupported image mode {image.mode}")
    return image.convert("L")


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
                 allow_non_frontal: bool = False, allow_lateral: bool = False) -> np.ndarray:
    """`preprocess` up to, not including, normalisation: uint8 [size, size, 1]. Deterministic, so it can be
    done once and stored (`cxrllava preprocess`); training then normalises on the accelerator."""
    if mode not in ("crop", "pad"):
        raise ConfigError(f"image mode must be 'crop' or 'pad', got {mode!r}")
    if hasattr(image, "model_pixels"):  # already preprocessed and stored (tfds_builders.StoredPixels)
        return image.model_pixels(size, mode)
    origin = image if isinstance(image, (str, Path)) else "image"
    if image is None or isinstance(image, (str, Path)):
        image = load_grayscale(image, allow_non_frontal, allow_lateral)
    elif hasattr(image, "read_bytes"):  # an image file held elsewhere (tfds_builders.StoredImage), named by str()
        origin = image
        image = decode_grayscale(image.read_bytes(), image, allow_non_frontal, allow_lateral)
    elif hasattr(image, "read") or isinstance(image, (bytes, bytearray, memoryview)):  # an open file, or its bytes
        origin = Path(str(getattr(image, "name", ""))).name or f"image ({type(image).__name__})"
        image = decode_grayscale(bytes(image.read() if hasattr(image, "read") else image), origin, allow_non_frontal,
                                 allow_lateral)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, origin)
    elif isinstance(image, Image.Image):
        radiograph_guard.check_image(image, origin)
        _check_patch(image, min_size, origin)
        if not allow_non_frontal:
            radiograph_guard.check_content(image, origin)
        image = to_uint8_gray(image, origin)
    else:
        raise InputError(f"cannot read an image from a {type(image).__name__}: pass a file path, an open file or its "
                         "bytes, a PIL image or an array")
    _check_patch(image, min_size, origin)
    image = resize_and_crop(image, size) if mode == "crop" else letterbox(image, size)
    return np.asarray(image, np.uint8)[..., None]


def _check_patch(image: Image.Image, min_size: int, origin):
    if min(image.size) < min_size:
        raise InputError(f"{origin}: image {image.size[0]}x{image.size[1]} is smaller than one "
                         f"{min_size}-pixel patch")


def normalise(pixels, mean: float, std: float):
    """uint8 pixels -> float32 (x / 255 - mean) / std, with numpy on the host or jax.numpy on the device
    (the same float32 operations in the same order; under jit XLA may fuse the multiply and the subtraction
    into one multiply-add, which moves some values by one float32 rounding)."""
    scaled = pixels.astype(np.float32) * np.float32(1.0 / 255.0)
    return (scaled - np.float32(mean)) / np.float32(std)


def _array_to_pil(array: np.ndarray, origin) -> Image.Image:
    if not (array.ndim == 3 and array.shape[-1] in (3, 4)):
        array = np.squeeze(array)
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.dtype == np.uint8:
        return to_uint8_gray(Image.fromarray(array), origin)
    return Image.fromarray(array_to_gray(array, origin))
