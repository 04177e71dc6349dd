"""Building blocks shared by the towers: dtypes, partitioned dense and LayerNorm layers, attention, layer stacks."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxrllava_jax.errors import ConfigError

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
        if in_axes != tuple(range(x.ndim - len(in_axes), x.ndim)):
            raise ValueError(f"Dense {self.name}: in_axes {self.in_axes} must be the input's last axes")
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        # The cast keeps the compute dtype when a LoRA adapter (qwix, fp32 so that its small updates are not
        # rounded away) adds its low-rank product to this dot: bf16 activations stay bf16.
        if self.is_initializing() or not isinstance(kernel, jax.core.Tracer):
            # Init (where Qwix quantizes what the dot receives, keeping the kernel's axis names), quantized
            # kernels and eager calls (where Qwix's LoRA knows the kernel only by identity, not through a
            # reshape): contracted at the kernel's own shape.
            contract = (in_axes, tuple(range(len(in_axes))))
            out = jax.lax.dot_general(x, kernel, (contract, ((), ()))).astype(x.dtype)
        else:
            # One 2-D matmul [..., fan_in] @ [fan_in, fan_out]. A 3-D attention kernel [embed, heads, head_dim]
            # contracted as it is makes XLA (TPU) relayout the whole stacked kernel for the backward pass, 1 GiB
            # a projection at 7B held through the backward loop; flat, the transposed matmul reads it as stored.
            lead = x.shape[:x.ndim - len(in_axes)]
            out = jax.lax.dot_general(x.reshape(*lead, flat[0]), kernel.reshape(flat),
                                      (((len(lead),), (0,)), ((), ())))
            out = out.astype(x.dtype).reshape(*lead, *self.features)
        return out if bias is None else out + bias


def dense(features, axes: tuple[tuple[str, ...], tuple[str, ...]], *, use_bias: bool, dtype, param_dtype,
          name: str, in_axis=-1, kernel_init=nn.initializers.lecun_normal()) -> Dense:
    """A dense layer whose kernel and bias carry logical axis names: (input names, output names)."""
    in_names, out_names = axes
    return Dense(tuple(features) if isinstance(features, (tuple, list)) else (features,),
                 tuple(in_axis) if isinstance(in_axis, (tuple, list)) else (in_axis,), tuple(in_names),
                 tuple(out_names), use_bias, dtype, param_dtype, kernel_init, name=name)


# Remat policies by the names the layers give their activations with `checkpoint_name`: query_proj, key_proj,
# value_proj, attention_out (models/attention.py) and mlp_hidden (the MLP's activated hidden layer). A policy
# saves the named tensors for the backward pass and recomputes the rest (MaxText's `save_qkv_proj` and kin).
NAMED_REMAT_POLICIES = {
    "save_qkv_proj": ("query_proj", "key_proj", "value_proj"),
    "save_attention": ("query_proj", "key_proj", "value_proj", "attention_out"),
    "save_attention_mlp": ("query_proj", "key_proj", "value_proj", "attention_out", "mlp_hidden"),
}


def remat_policy_of(name: str):
    """A named policy above, a `jax.checkpoint_policies` member, or 'full' (save nothing)."""
    if name in NAMED_REMAT_POLICIES:
        return jax.checkpoint_policies.save_only_these_names(*NAMED_REMAT_POLICIES[name])
    if name == "full":
        return None
    if not hasattr(jax.checkpoint_policies, name):
        raise ConfigError(f"runtime.remat_policy {name!r} is none of 'none', 'full', {sorted(NAMED_REMAT_POLICIES)} "
                          "or a jax.checkpoint_policies member")
    return getattr(jax.checkpoint_policies, name)


def apply_layers(block: type[nn.Module], block_kwargs: dict, x, per_layer, *broadcast, num_layers: int,
                 scan: bool, remat_policy: str, name: str = "layers"):
    """Runs `num_layers` blocks `block(**block_kwargs)(x, layer_input, *broadcast) -> (x, layer_output)`.

    With `scan`, one compiled body runs over params stacked on a leading `layers` axis (fast compiles
    for deep models); without it the layers unroll into `layers_0`, `layers_1`, ... `per_layer` (e.g. a
    KV cache) is sliced along its leading axis and the layer outputs are stacked the same way.
    `remat_policy`: 'none' (keep every activation), else what `remat_policy_of` makes of it.
    """
    if remat_policy != "none":
        block = nn.remat(block, policy=remat_policy_of(remat_policy), prevent_cse=not scan)
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
