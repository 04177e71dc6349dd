"""DICOM pixel data -> 8-bit gray: the modality LUT (rescale slope/intercept or LUT sequence), the first VOI
transform, MONOCHROME1 inverted; colour as luma. `check_elements` refuses, before decoding, the elements that
contradict each other or leave no image (a VOI LUT whose descriptor disagrees with its data, RescaleSlope 0, pixel
data of another size than Rows x Columns say, several frames).

The VOI transform's output range becomes [0, 255]: a VOI LUT sequence's table (output range = the table's
[min, max]) or window centre / width (DICOM's LINEAR, LINEAR_EXACT or SIGMOID function); without either, the
modality values' own [min, max]. Gray pixels go through these transforms in float64 a block of rows at a time,
never the whole image at once.

Compressed transfer syntaxes (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE) decode through pydicom's
Pillow and pylibjpeg plugins (pylibjpeg-libjpeg, -openjpeg, -rle: dependencies of this package).
"""

from collections.abc import Sequence

import numpy as np

from cxrllava_jax.domain.gray_levels import array_to_gray, map_blocks, value_range, window_to_uint8
from cxrllava_jax.domain.image_headers import ImageHeader, check_dicom_pixel_data
from cxrllava_jax.errors import InputError

MAX_BITS_STORED = 16


def check_elements(ds, header: ImageHeader, origin):
    """What the elements alone show to be unusable, before any pixel is decoded."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if header.samples == 1 and header.bits > MAX_BITS_STORED:
        raise InputError(f"{origin}: BitsStored is {header.bits}; radiographs store at most {MAX_BITS_STORED} bits "
                         "per pixel")
    if header.samples == 1 and not photometric.startswith("MONOCHROME") and photometric != "PALETTE COLOR":
        raise InputError(f"{origin}: photometric interpretation {photometric!r} with one sample per pixel is not "
                         "supported")
    if header.samples != 1 and (header.samples != 3 or not photometric.startswith(("RGB", "YBR"))):
        raise InputError(f"{origin}: SamplesPerPixel {header.samples} with photometric interpretation "
                         f"{photometric!r}: a gray image has 1 sample per pixel, a colour one 3 (RGB or YBR)")
    check_dicom_pixel_data(ds, header, origin)
    if "RescaleSlope" in ds and "ModalityLUTSequence" not in ds and _number(ds.RescaleSlope, origin) == 0:
        raise InputError(f"{origin}: RescaleSlope is 0, which makes every pixel {ds.get('RescaleIntercept', 0)}: "
                         "there is no image to read")
    if ds.get("VOILUTSequence"):
        _lut(ds.VOILUTSequence[0], origin)


def to_uint8(ds, origin) -> np.ndarray:
    """The pixels of a checked dataset (`check_elements`) -> uint8 [Rows, Columns]."""
    try:
        pixels = ds.pixel_array
    except Exception as error:  # pydicom and its plugins raise many types for pixel data they cannot decode
        raise InputError(f"{origin}: cannot decode DICOM pixel data ({type(error).__name__}: {error}); "
                         f"transfer syntax {ds.file_meta.get('TransferSyntaxUID', 'unknown')}") from error
    expected = (int(ds.Rows), int(ds.Columns))
    if pixels.shape[:2] != expected:
        raise InputError(f"{origin}: the pixel data decodes to {pixels.shape[1]}x{pixels.shape[0]} pixels, but "
                         f"Rows x Columns say {expected[1]}x{expected[0]}")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    try:
        return _gray(pixels, ds, photometric, origin)
    except InputError:
        raise
    except Exception as error:  # a malformed LUT or window element: this file's failure, not the batch's
        raise InputError(f"{origin}: cannot apply the DICOM pixel transforms ({type(error).__name__}: {error})") \
            from error


def _gray(pixels: np.ndarray, ds, photometric: str, origin) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:  # colour (pydicom returns RGB, also for YBR): luma like the PNG path
        return array_to_gray(pixels, origin)
    modality = _modality(ds)
    low, high = value_range(pixels, modality, origin)
    if low == high:
        raise InputError(f"{origin}: every pixel is {low:g} after the modality LUT: a constant image, no radiograph")
    voi = _voi(ds, low, high, origin)
    image = map_blocks(pixels, lambda block: voi(modality(block)))
    return 255 - image if photometric == "MONOCHROME1" else image


def _modality(ds):
    from pydicom.pixels import apply_modality_lut

    return lambda block: np.asarray(apply_modality_lut(block, ds), np.float64)


def _voi(ds, low: float, high: float, origin):
    if ds.get("VOILUTSequence"):  # present and not empty; an empty sequence holds no transform
        lut, first = _lut(ds.VOILUTSequence[0], origin)
        lut_low, lut_high = lut.min(), lut.max()
        if lut_low == lut_high:
            raise InputError(f"{origin}: the VOI LUT maps every value to {lut_low:g}: a constant image")

        def through_lut(x):
            index = np.clip(np.rint(x) - first, 0, len(lut) - 1).astype(np.int64)
            return window_to_uint8(lut[index], lut_low, lut_high)
        return through_lut
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        center, width = _first(ds.WindowCenter, origin), _first(ds.WindowWidth, origin)
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        _check_window(center, width, function, origin)
        return lambda x: _window(x, center, width, function)
    return lambda x: window_to_uint8(x, low, high)


def _lut(item, origin) -> tuple[np.ndarray, int]:
    """A VOI LUT item's table and first mapped value; its descriptor must agree with its data."""
    if "LUTDescriptor" not in item or "LUTData" not in item:
        raise InputError(f"{origin}: the VOI LUT lacks its {'LUTData' if 'LUTDescriptor' in item else 'LUTDescriptor'}")
    descriptor = [int(v) for v in item.LUTDescriptor]
    if len(descriptor) != 3:
        raise InputError(f"{origin}: the VOI LUT descriptor has {len(descriptor)} values, not 3 (entries, first "
                         "value, bits)")
    entries, first, bits = descriptor
    entries = entries or 65536  # PS3.3 C.11.2.1.1: 0 stands for 2^16
    data = item.LUTData
    if isinstance(data, bytes):  # stored as OW: raw little-endian words
        data = np.frombuffer(data, "<u2" if bits > 8 else "u1")
    data = np.asarray(data if data is not None else [], np.float64).reshape(-1)
    if len(data) != entries:
        raise InputError(f"{origin}: the VOI LUT descriptor declares {entries} entries but its data holds "
                         f"{len(data)}")
    return data, first


def _number(value, origin) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{origin}: {value!r} is not a number") from None


def _first(value, origin) -> float:
    """Window elements may hold several values (alternative windows); the first is the default."""
    return _number(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value, origin)


def _check_window(center: float, width: float, function: str, origin):
    if not (np.isfinite(center) and np.isfinite(width)):
        raise InputError(f"{origin}: window center {center} / width {width} is not a number")
    if function in ("SIGMOID", "LINEAR_EXACT") and width <= 0:
        raise InputError(f"{origin}: window width {width:g} <= 0 is invalid for the {function} VOI function")
    if function == "LINEAR" and width < 1:
        raise InputError(f"{origin}: window width {width:g} < 1 is invalid for the LINEAR VOI function")
    if function not in ("SIGMOID", "LINEAR_EXACT", "LINEAR"):
        raise InputError(f"{origin}: unknown VOI LUT function {function!r}")


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing straight to [0, 255]."""
    if function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = (x - center) / width * 255.0 + 127.5
    else:
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)
