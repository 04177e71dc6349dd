"""Image bytes from a request -> an image the library's loader decodes, after the server's byte and pixel limits.

The loader (`cxrllava_jax.domain.images`) reads anything with `read_bytes()`, so its decoding, windowing and checks
(the DICOM input guard included) apply to uploads exactly as to files. The header is read and checked here, before
anything is decoded; its `decode_bytes` is what the request costs `serving.admission`. Nothing is written to disk.
"""

import base64
import binascii
import dataclasses
import re

from cxrllava_jax.domain.image_headers import ImageTooLargeError, read_header
from cxrllava_jax.errors import InputError
from cxrllava_jax.serving.limits import Limits, RequestError

# What a data: URL or an upload may hold, and the suffix that tells the loader which decoder to use.
MEDIA_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "application/dicom": ".dcm"}
FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# What the first bytes say a file is (DICOM: "DICM" after a 128-byte preamble; a DICOM without one has no signature).
_MAGIC = {"image/png": lambda data: data.startswith(b"\x89PNG\r\n\x1a\n"),
          "image/jpeg": lambda data: data.startswith(b"\xff\xd8\xff"),
          "application/dicom": lambda data: data[128:132] == b"DICM"}
_BASE64_SPACE = b" \t\r\n"  # MIME base64 breaks lines; the line breaks are no data
MAX_NAME_CHARS = 200  # of an uploaded file's name, as errors show it
_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class UploadedImage:
    """An image file held in memory; `name` (its suffix marks DICOM) is how decoding errors name it."""

    data: bytes
    name: str
    decode_bytes: int = 0  # memory its decoding takes, estimated from the header

    def read_bytes(self) -> bytes:
        return self.data

    def __str__(self) -> str:
        return self.name


def from_data_url(url, field: str, limits: Limits) -> UploadedImage:
    """`data:image/png;base64,...` (PNG, JPEG or `application/dicom`) -> the image; remote URLs are refused."""
    if not isinstance(url, str):
        raise RequestError(400, f"{field} must be a string (a data: URL)", field)
    match = _DATA_URL.fullmatch(url.strip())
    if match is None:
        shown = url[:40] + ("..." if len(url) > 40 else "")
        raise RequestError(400, f"{field}: expected a base64 data: URL (data:image/png;base64,...), got {shown!r}; "
                                "the server fetches nothing", field)
    media_type = match["type"].lower()
    if media_type not in MEDIA_SUFFIXES:
        raise RequestError(400, f"{field}: unsupported media type {media_type!r}; send "
                                f"{', '.join(sorted(set(MEDIA_SUFFIXES) - {'image/jpg'}))}", field)
    if len(match["data"]) > limits.max_image_bytes * 4 // 3 + 4:
        raise _too_big(field, limits)
    try:
        data = base64.b64decode(match["data"].encode("ascii").translate(None, _BASE64_SPACE), validate=True)
    except (binascii.Error, ValueError) as error:  # a non-ASCII character is a ValueError (UnicodeEncodeError)
        reason = "it holds a character outside base64's alphabet" if isinstance(error, UnicodeError) else error
        raise RequestError(400, f"{field}: the data: URL is not valid base64 ({reason})", field) from None
    # A mislabelled file (a PNG sent as application/dicom) is read as what its first bytes say it is: the name's
    # suffix picks the decoder, and the declared type only decides for bytes without a signature.
    actual = next((kind for kind, looks_like in _MAGIC.items() if looks_like(data)), media_type)
    return checked(UploadedImage(data, "image" + MEDIA_SUFFIXES[actual]), field, limits)


def from_upload(data: bytes, filename: str, field: str, limits: Limits) -> UploadedImage:
    """An uploaded file; its name keeps a known image suffix so that DICOM without a preamble still decodes."""
    name = filename or "upload"
    if len(name) > MAX_NAME_CHARS:  # the name only labels errors; its suffix (kept) picks the decoder
        name = name[:MAX_NAME_CHARS // 2] + "..." + name[-MAX_NAME_CHARS // 2:]
    if not name.lower().endswith(FILE_SUFFIXES) and data[128:132] == b"DICM":
        name += ".dcm"
    return checked(UploadedImage(data, name), field, limits)


def checked(image: UploadedImage, field: str, limits: Limits) -> UploadedImage:
    """The upload's header against the library's and the server's limits, before any pixel is decoded."""
    if not image.data:
        raise RequestError(400, f"{field}: the image is empty", field)
    if len(image.data) > limits.max_image_bytes:
        raise _too_big(field, limits)
    try:
        header = read_header(image.data, image.name)
    except ImageTooLargeError as error:
        raise RequestError(413, f"{field}: {error}", field, "image_too_large") from None
    except InputError as error:
        raise RequestError(400, f"{field}: {error}", field, "invalid_image") from None
    if header.pixels > limits.max_image_pixels:
        raise RequestError(413, f"{field}: the image has {header.pixels:,} pixels; the server accepts at most "
                                f"{limits.max_image_pixels:,}", field, "image_too_large")
    return dataclasses.replace(image, decode_bytes=header.decode_bytes)


def _too_big(field: str, limits: Limits) -> RequestError:
    return RequestError(413, f"{field}: the image is larger than the server's limit of {limits.max_image_bytes:,} "
                             "bytes", field, "image_too_large")
