"""The page's viewer windows the image's own gray levels, not the 8-bit picture the model sees.

`POST /v1/preview?depth=full` answers with the image's values before any window (DICOM: after the modality LUT,
so in the file's own units, e.g. Hounsfield-like or raw detector counts; PNG/TIFF: the stored 16-bit values)
as little-endian uint16 rows, gzip-compressed, and in headers how to read them back and the window the model's
loader applies (`X-Window-Low`/`-High`: DICOM's first linear window, otherwise the values' [min, max]). The
8-bit preview (`depth` absent) stays what the page shows first and what "Reset window" returns to: it is the
loader's own output, whatever its VOI function.

The file has already passed the loader (`decode_grayscale`: the guard, the limits, damaged data) when this runs.
"""

import dataclasses
import gzip

import numpy as np
from PIL import Image, ImageOps

from cxrllava_jax.domain.image_headers import open_image

_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@dataclasses.dataclass(frozen=True)
class FullDepth:
    """uint16 [H, W] codes; a code c stands for the value `offset + c / scale` in the file's units."""

    codes: np.ndarray
    offset: float
    scale: float
    window: tuple[float, float]
    invert: bool  # MONOCHROME1: high values are dark

    def headers(self) -> dict:
        height, width = self.codes.shape
        return {"X-Image-Width": str(width), "X-Image-Height": str(height), "X-Value-Offset": repr(self.offset),
                "X-Value-Scale": repr(self.scale), "X-Window-Low": repr(self.window[0]),
                "X-Window-High": repr(self.window[1]), "X-Invert": "1" if self.invert else "0",
                "Content-Encoding": "gzip"}

    def body(self) -> bytes:
        return gzip.compress(self.codes.astype("<u2").tobytes(), compresslevel=1)


def full_depth(data: bytes, name: str, gray_8bit: Image.Image, max_side: int) -> FullDepth:
    """The values behind `gray_8bit` (the loader's output for the same bytes), resized as the 8-bit preview is.

    Memory stays near one decode's: rows and columns are first taken at a stride (to at most twice the preview's
    side, no copy), and only that sample is converted and resized."""
    opened = open_image(data, name)
    raw, values_of, window, invert = _dicom(opened.source) if opened.dicom else _deep_image(opened.source)
    if raw is None:  # 8-bit or colour sources: the loader's gray levels are all there is
        raw, values_of, window, invert = np.asarray(gray_8bit), _as_float, (0.0, 255.0), False
    if window is None:  # the loader stretches the values' own range (the transforms here are monotonic)
        ends = values_of(np.array([raw.min(), raw.max()]))
        window = (float(ends.min()), float(ends.max()))
    step = max(1, -(-max(raw.shape) // (2 * max_side)))
    resized = Image.fromarray(np.asarray(values_of(raw[::step, ::step]), np.float32), mode="F")
    resized.thumbnail((max_side, max_side))
    values = np.asarray(resized, np.float64)
    low, high = float(values.min()), float(values.max())
    # Integer values spanning at most 65,536 codes travel exactly; anything else is spread over the codes.
    exact = high - low <= 65535 and np.array_equal(values, np.rint(values))
    scale = 1.0 if exact or high == low else 65535.0 / (high - low)
    codes = np.clip(np.rint((values - low) * scale), 0, 65535).astype(np.uint16)
    return FullDepth(codes, low, scale, window, invert)


def _as_float(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, np.float64)


def _dicom(ds):
    """Stored pixels, the modality LUT, DICOM's first linear window (None: the loader's [min, max]), MONOCHROME1."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if not photometric.startswith("MONOCHROME"):
        return None, None, None, False
    window = None
    linear = str(ds.get("VOILUTFunction", "LINEAR")).upper() == "LINEAR"
    if not ds.get("VOILUTSequence") and linear and ds.get("WindowCenter") is not None \
            and ds.get("WindowWidth") is not None:
        center, width = (float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
                         for v in (ds.WindowCenter, ds.WindowWidth))
        # DICOM's LINEAR function: black at or below c - 0.5 - (w - 1) / 2, white above c - 0.5 + (w - 1) / 2
        window = (center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)
    return ds.pixel_array, lambda pixels: _as_float(apply_modality_lut(pixels, ds)), window, \
        photometric == "MONOCHROME1"


def _deep_image(image: Image.Image):
    """A PIL image deeper than 8 bits, turned as its EXIF orientation says (as the loader turns it)."""
    if image.mode not in _DEEP_MODES:
        return None, None, None, False
    image.load()
    image = ImageOps.exif_transpose(image)
    return np.asarray(image), _as_float, None, False
