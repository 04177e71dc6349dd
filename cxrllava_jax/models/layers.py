"""Building blocks shared by the towers: dtypes, partitioned dense and LayerNorm layers, attention, layer stacks."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# The layer stacks' names (`apply_layers(name=...)`): open_clip's, LLaMA's (ours) and BERT's. convert/layout.py
# reads them to move between scanned and unrolled checkpoints.
VIT_STACK, LLAMA_STACK, BERT_STACK = "resblocks", "block", "layer"
STACK_NAMES = (VIT_STACK, LLAMA_STACK, BERT_STACK)


def dtype_of(name: str | Dtype) -> Dtype:
    return jnp.dtype(name) if isinstance(name, str) else name


def dtypes(runtime) -> dict:
    """The compute and parameter dtypes of `runtime` as the keyword arguments Flax layers take."""
    return dict(dtype=dtype_of(runtime.dtype), param_dtype=dtype_of(runtime.param_dtype))


def partitioned(init: Callable, *names: str | None) -> Callable:
    return nn.with_logical_partitioning(init, names)


def layer_norm(eps: float, runtime, name: str) -> nn.LayerNorm:
    """LayerNorm over the `embed` axis (ViT and BERT)."""
    return nn.LayerNorm(epsilon=eps, name=name, scale_init=partitioned(nn.initializers.ones_init(), "embed"),
                        bias_init=partitioned(nn.initializers.zeros_init(), "embed"), **dtypes(runtime))


class Dense(nn.Module):
    """`nn.DenseGeneral` with the same parameters (`kernel` [*in, *out], `bias` [*out]) and the same init.

    Flax's DenseGeneral initialises and boxes the kernel flattened to 2-D and reshapes it afterwards,
    so the kernel's logical names (one per real axis) fail against the flat value as soon as a global
    mesh is set (`jax.set_mesh`), which is what makes activation constraints take effect. Here the
    kernel is created at its real shape; fan-in/fan-out are still those of the flattened matrix.
    """

    features: tuple[int, ...]
    in_axes: tuple[int, ...]
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    use_bias: bool
    dtype: Dtype
    param_dtype: Dtype
    kernel_init: Callable

    @nn.compact
    def __call__(self, x):
        in_axes = tuple(a % x.ndim for a in self.in_axes)
        in_shape = tuple(x.shape[a] for a in in_axes)
        flat = (int(np.prod(in_shape)), int(np.prod(self.features)))

        def kernel_init(rng, shape, dtype):
            return self.kernel_init(rng, flat, dtype).reshape(shape)

        kernel = self.param("kernel", partitioned(kernel_init, *self.in_names, *self.out_names),
                            in_shape + self.features, self.param_dtype)
        bias = (self.param("bias", partitioned(nn.initializers.zeros_init(), *self.out_names), self.features,
                           self.param_dtype) if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        contract = (in_axes, tuple(range(len(in_axes))))
        out = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        return out if bias is None else out + bias


def dense(features, axes: tuple[tuple[str, ...], tuple[str, ...]], *, use_bias: bool, dtype, param_dtype,
          name: str, in_axis=-1, kernel_init=nn.initializers.lecun_normal()) -> Dense:
    """A dense layer whose kernel and bias carry logical axis names: (input names, output names)."""
    in_names, out_names = axes
    return Dense(tuple(features) if isinstance(features, (tuple, list)) else (features,),
                 tuple(in_axis) if isinstance(in_axis, (tuple, list)) else (in_axis,), tuple(in_names),
                 tuple(out_names), use_bias, dtype, param_dtype, kernel_init, name=name)


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
