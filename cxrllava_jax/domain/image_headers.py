"""What an image file says about itself, read before any pixel is decoded, and the limits checked on it.

`open_image(data, origin)` parses the header only (Pillow opens lazily; pydicom reads the elements, not the pixel
codec) and returns the `ImageHeader` with the opened object, so a file past a limit, a multi-page file, a format
we do not read or a DICOM file whose elements contradict each other costs no decode. The server prices a request
from `ImageHeader.decode_bytes` before admitting it (`serving.admission`).
"""

import dataclasses
import io
import math
import warnings
import zlib

from PIL import Image

from cxrllava_jax.errors import InputError

# Limits of ours, far above any radiograph (a 43x43 cm detector at 100 um is 4300x4300 pixels, 37 MB in 16 bit):
# files past them are refused, not decoded into gigabytes.
MAX_IMAGE_BYTES = 256 * 2**20
MAX_IMAGE_PIXELS = 100_000_000
MAX_SIDE = 16384  # no radiograph detector is larger; a bigger "image" is not one (and would exhaust memory)
MIN_GRAY_BITS = 8  # a 1-bit image is a drawing, not an exposure; one rule for PNG, TIFF and DICOM alike
# Pillow formats a radiograph comes in (MPO: a JPEG that carries further pictures, refused if it does).
PIL_FORMATS = ("PNG", "JPEG", "MPO", "TIFF")
_MODE_BITS = {"1": 1, "L": 8, "P": 8, "LA": 8, "PA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8,
              "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_PNG_GRAY_TYPES = (0, 4)
# Rows handled at once when 16-bit pixels are windowed in float64 (`images`, `dicom_pixels`): ~8 MB a temporary.
BLOCK_PIXELS = 1 << 20


class ImageTooLargeError(InputError):
    """An image past a size limit (bytes, pixels, side): the server answers 413 rather than 400."""


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """Sizes as the file declares them. `bits`: per sample, of the stored gray levels (PNG's IHDR bit depth,
    DICOM's BitsStored); `bytes_per_sample`: as decoded in memory."""

    format: str
    width: int
    height: int
    samples: int = 1
    bits: int = 8
    bytes_per_sample: int = 1
    frames: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decode_bytes(self) -> int:
        """Peak memory of decoding it to 8-bit gray: the decoder's buffer and numpy's copy of it, the 8-bit
        result, and the windowing's float64 blocks (`BLOCK_PIXELS`, a few temporaries)."""
        decoded = self.pixels * self.samples * self.bytes_per_sample * self.frames
        return 2 * decoded + self.pixels + (4 * 8 * min(self.pixels, BLOCK_PIXELS) if self.bytes_per_sample > 1 else 0)


@dataclasses.dataclass(frozen=True)
class OpenedImage:
    header: ImageHeader
    source: object  # a lazily opened PIL image, or a pydicom Dataset
    dicom: bool


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then "DICM" (whatever the file is called)."""
    return data[128:132] == b"DICM"


def read_header(data: bytes, origin) -> ImageHeader:
    """The header of an image file's bytes, checked against the limits; nothing is decoded."""
    return open_image(data, origin).header


def open_image(data: bytes, origin) -> OpenedImage:
    """Opens the bytes of a PNG, JPEG, TIFF or DICOM file (named `origin` in errors; a .dcm/.dicom suffix marks
    DICOM without a preamble) and checks its header; raises an InputError naming the file and the fault."""
    if not data:
        raise InputError(f"{origin}: image file is empty (0 bytes)")
    check_bytes(len(data), origin)
    if str(origin).lower().endswith((".dcm", ".dicom")) or is_dicom(data):
        ds = _read_dicom(data, origin)
        opened = OpenedImage(_dicom_header(ds, origin), ds, dicom=True)
    else:
        image = _open_pil(data, origin)
        opened = OpenedImage(_pil_header(image, data, origin), image, dicom=False)
    _check_header(opened.header, origin)
    return opened


def check_bytes(size: int, origin):
    if size > MAX_IMAGE_BYTES:
        raise ImageTooLargeError(f"{origin}: {size:,} bytes is past the {MAX_IMAGE_BYTES:,}-byte limit for one image")


def check_pixels(count: int, origin):
    if count > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(f"{origin}: {count:,} pixels is past the {MAX_IMAGE_PIXELS:,}-pixel limit for one "
                                 "image")


def check_size(width: int, height: int, origin):
    if max(width, height) > MAX_SIDE:
        raise ImageTooLargeError(f"{origin}: image {width}x{height} is larger than any radiograph ({MAX_SIDE} pixels "
                                 "a side)")


def check_gray_levels(bits: int, origin):
    if bits < MIN_GRAY_BITS:
        raise InputError(f"{origin}: {bits}-bit image ({2 ** bits} gray levels); a radiograph has {MIN_GRAY_BITS} to "
                         "16 bits of gray levels")


def _check_header(header: ImageHeader, origin):
    if header.width < 1 or header.height < 1:
        raise InputError(f"{origin}: the header declares an image of {header.width}x{header.height} pixels")
    check_pixels(header.pixels, origin)
    check_size(header.width, header.height, origin)
    if header.frames != 1:
        raise InputError(f"{origin}: {header.format} file of {header.frames} images (pages or frames); a radiograph "
                         "is one image: save the one to read as a file of its own")
    if header.samples == 1:
        check_gray_levels(header.bits, origin)


# ---------------------------------------------------------------- PNG, JPEG, TIFF (Pillow)

def _open_pil(data: bytes, origin) -> Image.Image:
    try:
        with warnings.catch_warnings():  # PIL's own pixel limit only warns below twice its value; ours decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"{origin}: more than {MAX_IMAGE_PIXELS:,} pixels ({error})") from error
    except Image.UnidentifiedImageError:
        raise InputError(f"{origin}: cannot decode image: not a readable PNG, JPEG, TIFF or DICOM file (it starts "
                         f"with {data[:16]!r})") from None
    except Exception as error:  # decoders raise many types for broken headers; each is this file's failure
        raise InputError(f"{origin}: cannot decode image ({type(error).__name__}: {error})") from error
    if image.format not in PIL_FORMATS:
        raise InputError(f"{origin}: {image.format} image; radiographs are read from PNG, JPEG, TIFF or DICOM files")
    return image


def _pil_header(image: Image.Image, data: bytes, origin) -> ImageHeader:
    mode = image.mode
    if mode not in _MODE_BITS:
        raise InputError(f"{origin}: unsupported image mode {mode}")
    bits = _MODE_BITS[mode]
    if image.format == "PNG" and data[25] in _PNG_GRAY_TYPES:
        bits = data[24]  # IHDR: Pillow shows 2- and 4-bit gray as 8-bit 'L'
    try:
        frames = getattr(image, "n_frames", 1)
    except Exception as error:  # counting pages reads their headers, which may be broken
        raise InputError(f"{origin}: cannot read the pages of this {image.format} file ({error})") from error
    return ImageHeader(image.format, image.width, image.height, samples=len(image.getbands()), bits=bits,
                       bytes_per_sample=max(1, _MODE_BITS[mode] // 8), frames=frames)


def check_png_complete(image: Image.Image, data: bytes, origin):
    """Pillow fills the rows of a PNG whose compressed data ends early with black and reports no error. `image`
    is the PNG as Pillow decoded `data`, before any turn. Its decoder writes a row only once it has all of the
    row, into an image that starts zeroed, and the stream's last row is the image's last (Adam7: the last odd
    row, which the seventh pass fills whole): a byte other than zero there shows the data reached the end.
    Otherwise (that row is black, or there is none) inflate the IDAT chunks (in bounded pieces) and compare the
    length with what the header's size and depth require: a second decompression, which most radiographs skip."""
    width, height, depth, colour, interlace = int.from_bytes(data[16:20]), int.from_bytes(data[20:24]), data[24], \
        data[25], data[28]
    last = height - 1 if not interlace or height % 2 == 0 else height - 2
    if last >= 0 and image.crop((0, last, width, last + 1)).tobytes().strip(b"\0"):
        return
    bits = depth * _PNG_CHANNELS.get(colour, 1)
    passes = [(width, height)] if not interlace else [  # Adam7: each pass's (columns, rows)
        (math.ceil((width - x0) / dx), math.ceil((height - y0) / dy))
        for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                               (0, 1, 1, 2)) if width > x0 and height > y0]
    expected = sum(rows * (1 + math.ceil(columns * bits / 8)) for columns, rows in passes)
    inflate, produced, position = zlib.decompressobj(), 0, 8
    try:
        while position + 8 <= len(data) and not inflate.eof:
            length, kind = int.from_bytes(data[position:position + 4]), data[position + 4:position + 8]
            if kind == b"IDAT":
                pending = data[position + 8:position + 8 + length]
                while pending and not inflate.eof:
                    produced += len(inflate.decompress(pending, 1 << 20))
                    pending = inflate.unconsumed_tail
            position += 12 + length
    except zlib.error as error:
        raise InputError(f"{origin}: damaged PNG image data ({error})") from None
    if produced < expected:
        row = 1 + math.ceil(width * bits / 8)
        raise InputError(f"{origin}: the PNG image data ends early ({produced:,} of {expected:,} bytes, about "
                         f"{min(height, produced // row)} of {height} rows): the file is truncated or damaged")


# ---------------------------------------------------------------- DICOM (pydicom)

def _read_dicom(data: bytes, origin):
    import pydicom

    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as error:  # pydicom raises many types for broken files
        raise InputError(f"{origin}: cannot read DICOM ({type(error).__name__}: {error})") from error


def _dicom_header(ds, origin) -> ImageHeader:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(f"{origin}: DICOM file without pixel data (no PixelData element)")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        allocated = int(ds.BitsAllocated)
        stored = int(ds.get("BitsStored", allocated) or allocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as error:
        raise InputError(f"{origin}: DICOM image elements missing or not numbers ({error})") from None
    if stored > allocated:
        raise InputError(f"{origin}: BitsStored {stored} is more than BitsAllocated {allocated}")
    return ImageHeader("DICOM", columns, rows, samples=samples, bits=stored,
                       bytes_per_sample=max(1, math.ceil(allocated / 8)), frames=frames)


def check_dicom_pixel_data(ds, header: ImageHeader, origin):
    """Uncompressed pixel data must be exactly as long as Rows x Columns x samples x BitsAllocated say (one pad
    byte allowed): a shorter element cannot fill the image; a longer one means the sizes are wrong and pydicom
    would silently crop (or split into frames) what it holds."""
    if not hasattr(ds, "file_meta") or ds.file_meta.get("TransferSyntaxUID") is None \
            or ds.file_meta.TransferSyntaxUID.is_compressed or "PixelData" not in ds:
        return
    allocated = int(ds.BitsAllocated)
    expected = math.ceil(header.pixels * header.samples * header.frames * allocated / 8)
    actual = len(ds.PixelData)
    if actual not in (expected, expected + 1):
        raise InputError(f"{origin}: the pixel data holds {actual:,} bytes, but Rows {header.height} x Columns "
                         f"{header.width} x {header.samples} sample(s) x {allocated} bits make {expected:,}: the "
                         "image sizes in the header are wrong or the file is damaged")
