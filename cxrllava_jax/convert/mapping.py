"""The machinery every format shares: a table of (PyTorch key, our parameter path, how the tensor changes),
applied one tensor at a time in either direction, with every mismatch reported in one error."""

import dataclasses
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cxrllava_jax.errors import InputError


class ConversionError(InputError):
    pass


@dataclasses.dataclass(frozen=True)
class Entry:
    torch_key: str
    path: str  # 'llm/layers/block_0/q_proj/kernel'
    kind: str  # one of TRANSFORMS
    heads: int = 0  # for the attention reshapes
    part: int = 0  # PyTorch fuses some tensors (open_clip's in_proj: q, k, v stacked on axis 0):
    parts: int = 1  # this entry is part `part` of `parts` equal slices

    def to_ours(self, tensor: np.ndarray) -> np.ndarray:
        if self.parts > 1:
            tensor = tensor[self.part * (tensor.shape[0] // self.parts):(self.part + 1) * (tensor.shape[0] // self.parts)]
        return TRANSFORMS[self.kind][0](tensor, self.heads)

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        return TRANSFORMS[self.kind][1](array, self.heads)


# kind -> (torch -> ours, ours -> torch). Linear weights are [out, in] in PyTorch and [in, out] here;
# attention projections keep (heads, head_dim) as separate axes here.
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda t, h: t, lambda a, h: a),
    "linear": (lambda t, h: t.T, lambda a, h: a.T),
    "heads_in": (lambda t, h: t.T.reshape(t.shape[1], h, -1), lambda a, h: a.reshape(a.shape[0], -1).T),
    "heads_bias": (lambda t, h: t.reshape(h, -1), lambda a, h: a.reshape(-1)),
    "heads_out": (lambda t, h: t.T.reshape(h, -1, t.shape[0]), lambda a, h: a.reshape(-1, a.shape[-1]).T),
    "conv": (lambda t, h: t.transpose(2, 3, 1, 0), lambda a, h: a.transpose(3, 2, 0, 1)),
}


def import_params(entries: list[Entry], reader, origin: str, expected: dict, ignored: Iterable[str] = ()) -> dict:
    """Reads every entry's tensor through `reader` (a lazy safetensors reader), strictly, into one tree."""
    return traverse_util.unflatten_dict(dict(iter_imported(entries, reader, origin, expected, ignored)), sep="/")


def iter_imported(entries: list[Entry], reader, origin: str, expected: dict,
                  ignored: Iterable[str] = ()) -> Iterator[tuple[str, np.ndarray]]:
    """(our parameter path, array) pairs, one tensor at a time, in the file's dtype.

    `expected` maps our parameter paths to the shapes the configured model has. Missing, unexpected
    (other than `ignored`) and mis-shaped keys are all collected first and raised together, before any
    tensor is read.
    """
    available = set(reader.keys())
    wanted = {e.torch_key for e in entries}
    problems = [f"missing {k}" for k in sorted(wanted - available)]
    problems += [f"unexpected {k} {reader.shape(k)}" for k in sorted(available - wanted - set(ignored))]
    for entry in entries:
        if entry.torch_key in available:
            want = torch_shape(entry, expected[entry.path])
            if tuple(reader.shape(entry.torch_key)) != want:
                problems.append(f"{entry.torch_key}: expected shape {want}, found {tuple(reader.shape(entry.torch_key))}")
    if problems:
        raise ConversionError(f"{origin}: {len(problems)} problem(s) with the weights:\n  " + "\n  ".join(problems))
    for e in entries:
        yield e.path, np.ascontiguousarray(e.to_ours(reader.get(e.torch_key)))


def torch_shape(entry: Entry, our_shape) -> tuple:
    """The PyTorch shape of a tensor whose shape here is `our_shape`, computed without any memory."""
    abstract = jax.ShapeDtypeStruct(tuple(our_shape), jnp.float32)
    shape = jax.eval_shape(lambda a: entry.to_torch(a), abstract).shape
    return (shape[0] * entry.parts, *shape[1:])


def expected_shapes(model, *init_args) -> dict:
    """Our parameter paths -> shapes for a model and example inputs, traced abstractly (no weights made)."""
    import flax.linen as nn

    abstract = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), *init_args))["params"])
    return {k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}


def export_tensors(entries: list[Entry], params: dict, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(PyTorch key, tensor) pairs, one at a time, from our (unscanned) parameter tree."""
    flat = traverse_util.flatten_dict(params, sep="/")
    wanted = {e.path for e in entries}
    # A parameter the format has no place for would be dropped silently: the export would be another model.
    problems = [f"missing {p}" for p in sorted(wanted - set(flat))]
    problems += [f"unexpected {p} {np.shape(flat[p])}" for p in sorted(set(flat) - wanted)]
    if problems:
        raise ConversionError(f"the checkpoint does not fit the format: {len(problems)} problem(s):\n  "
                              + "\n  ".join(problems))
    fused: dict[str, list] = {}
    for entry in entries:
        tensor = np.ascontiguousarray(entry.to_torch(np.asarray(flat[entry.path])).astype(dtype))
        if entry.parts == 1:
            yield entry.torch_key, tensor
            continue
        fused.setdefault(entry.torch_key, []).append(tensor)
        if len(fused[entry.torch_key]) == entry.parts:
            yield entry.torch_key, np.concatenate(fused.pop(entry.torch_key), axis=0)
