"""Building blocks shared by the towers: partitioned dense layers, attention, layer stacking."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def dtype_of(name: str | Dtype) -> Dtype:
    return jnp.dtype(name) if isinstance(name, str) else name


def partitioned(init: Callable, *names: str | None) -> Callable:
    return nn.with_logical_partitioning(init, names)


def dense(features, axes: tuple[tuple[str, ...], tuple[str, ...]], *, use_bias: bool, dtype, param_dtype,
          name: str, in_axis=-1, kernel_init=nn.initializers.lecun_normal()) -> nn.DenseGeneral:
    """A DenseGeneral whose kernel and bias carry logical axis names: (input names, output names)."""
    in_names, out_names = axes
    return nn.DenseGeneral(
        features, axis=in_axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=partitioned(kernel_init, *in_names, *out_names),
        bias_init=partitioned(nn.initializers.zeros_init(), *out_names),
    )


def attention(q, k, v, mask=None, *, implementation: str | None = None):
    """Multi-head attention on [batch, length, heads, head_dim]; k/v may have fewer (grouped) heads.

    Goes through `jax.nn.dot_product_attention`, so GPUs get cuDNN flash attention when asked for.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def apply_layers(block: type[nn.Module], block_kwargs: dict, x, per_layer, *broadcast, num_layers: int,
                 scan: bool, remat_policy: str, name: str = "layers"):
    """Runs `num_layers` blocks `block(**block_kwargs)(x, layer_input, *broadcast) -> (x, layer_output)`.

    With `scan`, one compiled body runs over params stacked on a leading `layers` axis (fast compiles
    for deep models); without it the layers unroll into `layers_0`, `layers_1`, ... `per_layer` (e.g. a
    KV cache) is sliced along its leading axis and the layer outputs are stacked the same way.
    `remat_policy` names a `jax.checkpoint_policies` member, 'full' to save nothing, or 'none'.
    """
    if remat_policy != "none":
        policy = None if remat_policy == "full" else getattr(jax.checkpoint_policies, remat_policy)
        block = nn.remat(block, policy=policy, prevent_cse=not scan)
    if scan:
        stacked = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0,) + (nn.broadcast,) * len(broadcast),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return stacked(**block_kwargs, name=name)(x, per_layer, *broadcast)
    outputs = []
    for i in range(num_layers):
        layer_input = None if per_layer is None else jax.tree.map(lambda a: a[i], per_layer)
        x, out = block(**block_kwargs, name=f"{name}_{i}")(x, layer_input, *broadcast)
        outputs.append(out)
    return x, (None if outputs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outputs))
