"""Safetensors directories, read lazily and written in shards: never pickle, never the whole model at once."""

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from cxrllava_jax import files
from cxrllava_jax.errors import InputError

INDEX = "model.safetensors.index.json"
# The format's dtype names (https://github.com/huggingface/safetensors, "Format").
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype for a dtype name, bfloat16 included (numpy has none of its own)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class SafetensorsReader:
    """Tensors of a single-file or sharded (with index) safetensors directory, read on demand."""

    def __init__(self, directory):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            weight_map = (files.read_json(index) or {}).get("weight_map")
            if not isinstance(weight_map, dict):
                raise InputError(f"{index}: no weight_map object; is this a safetensors index?")
            names = sorted(set(weight_map.values()))
        else:
            names = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not names:
            pickles = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt*"))
            hint = f" (found {pickles}: pickle files are not read; convert them to safetensors first)" if pickles else ""
            raise InputError(f"{self.directory}: no .safetensors weights{hint}")
        self._entries = {}  # key -> (file, dtype, shape, byte offset, byte length)
        for name in names:
            for key, entry in _read_header(self.directory / name).items():
                self._entries[key] = (self.directory / name, *entry)

    def keys(self):
        return self._entries.keys()

    def shape(self, key) -> tuple:
        return self._entries[key][2]

    def get(self, key) -> np.ndarray:
        """The tensor read into fresh memory with plain reads: mapping the file instead would keep every page
        read so far resident (and counted) for as long as the reader lives, a second copy of the weights."""
        path, dtype, shape, offset, length = self._entries[key]
        count = length // dtype.itemsize
        return np.fromfile(path, dtype=dtype, count=count, offset=offset).reshape(shape)


def _read_header(path: Path) -> dict:
    """key -> (dtype, shape, absolute byte offset, byte length) from a safetensors file's JSON header; a file
    whose header does not parse or whose tensors run past its end (cut off) is refused, naming it."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        entries = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise InputError(f"{path}: tensor {key} has dtype {info['dtype']}, which is not read here")
            start, end = info["data_offsets"]
            entries[key] = (np.dtype(DTYPES[info["dtype"]]), tuple(info["shape"]), 8 + size + start, end - start)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error}); it may be "
                         "cut off: download it again") from error
    end = max((offset + length for _, _, offset, length in entries.values()), default=0)
    if end > path.stat().st_size:
        raise InputError(f"{path}: the file ends at byte {path.stat().st_size} but its tensors run to {end}; it is "
                         "cut off: download it again")
    return entries


def write_sharded(directory, tensors, max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None):
    """Writes (key, array) pairs into model-0000i-of-0000n.safetensors shards plus the index."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for key, array in tensors:
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(_flush(directory, len(shards), current, metadata))
            current, size = {}, 0
        current[key] = array
        size += array.nbytes
    if current:
        shards.append(_flush(directory, len(shards), current, metadata))
    total = len(shards)
    weight_map, total_size = {}, 0
    for i, (temp_name, keys, nbytes) in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        (directory / temp_name).rename(directory / name)
        weight_map.update({k: name for k in keys})
        total_size += nbytes
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map},
                                              indent=2, sort_keys=True))


def _flush(directory: Path, number: int, tensors: dict, metadata):
    name = f"shard-{number:05d}.partial"
    save_file(tensors, str(directory / name), metadata={"format": "pt", **(metadata or {})})
    return name, list(tensors), sum(a.nbytes for a in tensors.values())
