"""Crafted files for the fault suites: PNG headers that declare huge sizes, PNGs whose data stops half way or is
Adam7-interlaced, colour and palette DICOM, a tokenizer that differs from another only in which ids its pieces
have."""

import shutil
import struct
import zlib

import numpy as np
import sentencepiece.sentencepiece_model_pb2 as sp_model
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.dicom_files import write_dicom

STORED = (np.arange(32 * 32).reshape(32, 32) * 4 % 4096).astype(np.uint16)


def png_header_only(path, width: int, height: int, depth: int = 8):
    """A PNG that declares `width` x `height` gray pixels of `depth` bits but holds one row of zeros (one byte a
    pixel): decoders read the size first."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + _png_chunk(b"IEND", b""))
    return path


def color_dicom(path, rgb: np.ndarray, photometric: str):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    data = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", photometric)
    ds.PixelData = np.ascontiguousarray(data).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def palette_dicom(path, indices: np.ndarray, palette: np.ndarray):
    """PALETTE COLOR: 8-bit indices into 16-bit red, green and blue tables."""
    path = write_dicom(path, indices, photometric="PALETTE COLOR", bits_stored=8)
    ds = dcmread(path)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = indices.astype(np.uint8).tobytes()
    for i, colour in enumerate(("Red", "Green", "Blue")):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", palette[:, i].astype("<u2").tobytes())
    ds.save_as(path, enforce_file_format=True)
    return path


def swapped_tokenizer(source, out):
    """The same tokenizer with two pieces' ids exchanged: same size, different vocabulary."""
    shutil.copytree(source, out)
    (out / "tokenizer.json").unlink(missing_ok=True)
    proto = sp_model.ModelProto()
    proto.ParseFromString((out / "tokenizer.model").read_bytes())
    a, b = proto.pieces[300], proto.pieces[301]
    a.piece, b.piece = b.piece, a.piece
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_8bit_gray(path, pixels: np.ndarray, interlace: bool = False, keep_bytes: int | None = None):
    """An 8-bit gray PNG written chunk by chunk: optionally Adam7-interlaced, and optionally holding only the first
    `keep_bytes` bytes of its data (each row is a filter byte and its pixels, pass after pass) in a well-formed
    IDAT chunk: the file ends properly, with IEND, but its compressed data stops short (Pillow then fills the
    rest with black)."""
    height, width = pixels.shape
    passes = [pixels[y0::dy, x0::dx] for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                                                             (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))] \
        if interlace else [pixels]
    raw = b"".join(b"\0" + row.astype(np.uint8).tobytes() for image in passes if image.size for row in image)
    raw = raw[:keep_bytes]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, int(interlace))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
                     + _png_chunk(b"IEND", b""))
    return path


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An 8-bit gray image with structure (not constant, not colour)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    return np.clip(120 + 60 * np.sin(x / 5.0) * np.cos(y / 3.0) + 30 * x / width + rng.normal(0, 8, (height, width)),
                   0, 255).astype(np.uint8)
