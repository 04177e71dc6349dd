"""A checkpoint's parameters onto the devices one tensor at a time, in the dtype asked for (or the one they are
stored in), quantized as they arrive when asked, and with several devices split over them by the logical-axis
rules (tensor parallel: heads, MLP and vocabulary over the `tensor` axis) so a model can span small GPUs.

Each tensor is read, cast, placed and dropped from the host before the next is read: the model never exists
twice, nor in float32 unless asked.
"""

from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cxrllava_jax import sharding
from cxrllava_jax.models import quantize as quantization


def place_params(tensors: Iterable[tuple[str, np.ndarray]], model: nn.Module, init_args: tuple, *,
                 dtype: str | None = None, quantize: str | None = None) -> tuple[nn.Module, dict]:
    """(model to run, parameter tree) from (parameter path, host array) pairs, consumed one at a time.

    `model` is returned as is, or wrapped by Qwix when `quantize` ('int8', 'int4') is given.
    """
    shardings = _tensor_parallel_shardings(model, init_args)
    if quantize is not None:
        model = quantization.quantized(model, quantize)
        template = quantization.abstract_params(model, *init_args)
    flat = {}
    for path, array in tensors:
        if dtype is not None and np.issubdtype(array.dtype, np.floating):
            array = array.astype(jnp.dtype(dtype), copy=False)
        value = jax.device_put(array, shardings[path]) if shardings else jnp.asarray(array)
        del array
        flat[path] = value if quantize is None else quantization.quantize_leaf(template, path, value)
    return model, traverse_util.unflatten_dict(flat, sep="/")


def _tensor_parallel_shardings(model: nn.Module, init_args: tuple) -> dict | None:
    if jax.device_count() == 1:
        return None
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=jax.device_count())
    abstract = jax.eval_shape(model.init, jax.random.key(0), *init_args)["params"]
    return traverse_util.flatten_dict(nn.meta.unbox(sharding.logical_shardings(abstract, mesh)), sep="/")
