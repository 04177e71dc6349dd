"""Safetensors directories, read lazily and written in shards: never pickle, never the whole model at once."""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from cxrllava_jax import files
from cxrllava_jax.errors import InputError

INDEX = "model.safetensors.index.json"


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
            raise FileNotFoundError(f"{self.directory}: no .safetensors weights{hint}")
        self._handles = {name: _open(self.directory / name) for name in names}
        self._where = {key: name for name, h in self._handles.items() for key in h.keys()}

    def keys(self):
        return self._where.keys()

    def shape(self, key) -> tuple:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def get(self, key) -> np.ndarray:
        return self._handles[self._where[key]].get_tensor(key)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors' own error names neither the file nor what to do
        raise InputError(f"{path}: not a readable safetensors file ({error}); it may be cut off: download it "
                         "again") from error


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
