"""Attention kernels chosen by `Runtime.attention`: 'xla', 'cudnn', 'splash' or 'auto'.

- xla: `jax.nn.dot_product_attention`'s XLA path; it writes the whole [heads, query, key] score matrix.
- cudnn: cuDNN flash attention on NVIDIA GPUs. A causal mask over right-padded rows is passed as causal mode
  plus each row's key length, so no [batch, 1, length, length] mask is ever built.
- splash: the Pallas TPU splash-attention kernel (blockwise, causal blocks above the diagonal skipped), with
  real/padding tokens as segment ids; under a mesh it runs per shard (batch and heads). On CPU it runs in
  Pallas' interpreter, which is how the tests check it against xla. Its blocks need a length that is a
  multiple of 128 (stage 2's buckets are); other lengths (ViT's 1,025 tokens) and dense masks take xla.
- auto: splash on TPU, cudnn on GPU, xla elsewhere, by the platform of the mesh in use (or JAX's default).

A mask is either a boolean array [batch, 1 or heads, query, key] (decoding against a cache: every kernel
takes it densely) or a `CausalMask` (training's full forward), which the fused kernels build themselves.
The projections around attention carry `checkpoint_name`s (see `remat_policy`) so a remat policy can keep
them: query_proj, key_proj, value_proj, attention_out.
"""

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cxrllava_jax.errors import ConfigError

KERNELS = ("xla", "cudnn", "splash", "auto")
_BY_PLATFORM = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}


@flax.struct.dataclass
class CausalMask:
    """Causal self-attention over real tokens: the query at slot t sees the real keys at slots <= t.

    `right_padded` promises that every row's real tokens come first (what training batches are); cuDNN then
    needs only the row lengths. Rows padded on the left still work with every kernel, densely for cuDNN.
    """

    valid: jax.Array  # [batch, length] bool
    right_padded: bool = flax.struct.field(pytree_node=False, default=False)

    def dense(self) -> jax.Array:
        slots = jnp.arange(self.valid.shape[1])
        causal = slots[None, :] <= slots[:, None]
        return (causal[None] & self.valid[:, None, :])[:, None]


def resolve(kernel: str) -> str:
    """'auto' -> the kernel for the platform the program is compiled for."""
    if kernel not in KERNELS:
        raise ConfigError(f"runtime.attention must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = jax.default_backend() if device is None else device.platform
    return _BY_PLATFORM.get(platform, "xla")


def attend(q, k, v, mask=None, *, kernel: str = "xla"):
    """Multi-head attention on [batch, length, heads, head_dim]; k/v may have fewer (grouped) heads."""
    q, k, v = (checkpoint_name(x, n) for x, n in ((q, "query_proj"), (k, "key_proj"), (v, "value_proj")))
    kernel = resolve(kernel)
    if kernel == "splash" and (mask is None or isinstance(mask, CausalMask)) and _splash_block(q.shape[1]):
        out = splash(q, k, v, mask)
    elif kernel == "cudnn":
        out = cudnn(q, k, v, mask)
    else:
        dense = mask.dense() if isinstance(mask, CausalMask) else mask
        out = jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="xla")
    return checkpoint_name(out, "attention_out")


def cudnn(q, k, v, mask, implementation: str = "cudnn"):
    """cuDNN's kernel; `implementation` is there so the CPU tests can run the same arguments through XLA."""
    if isinstance(mask, CausalMask) and mask.right_padded:
        lengths = mask.valid.sum(axis=1).astype(jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                            implementation=implementation)
    dense = mask.dense() if isinstance(mask, CausalMask) else mask
    return jax.nn.dot_product_attention(q, k, v, mask=dense, implementation=implementation)


def splash(q, k, v, mask: CausalMask | None):
    """Splash attention; causal with segment ids (real = 1, padding = 0) for a `CausalMask`, full without one.

    Padding rows see only padding (their outputs are never used); real rows see exactly what `dense()` allows.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    _, length, heads, head_dim = q.shape
    shape = (length, length)
    base = sm.CausalMask(shape) if mask is not None else sm.FullMask(shape)
    segments = None if mask is None else mask.valid.astype(jnp.int32)
    interpret = resolve("auto") != "splash"  # not compiling for a TPU: Pallas' interpreter
    mesh = jax.sharding.get_abstract_mesh()
    qkv_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))

    def per_shard(q, k, v, segments):
        local_heads = q.shape[2]
        block_size = _splash_block(length)
        sizes = sk.BlockSizes(block_q=block_size, block_kv=block_size, block_kv_compute=block_size,
                              block_q_dkv=block_size, block_kv_dkv=block_size, block_kv_dkv_compute=block_size,
                              block_q_dq=block_size, block_kv_dq=block_size)
        kernel = sk.make_splash_mha(sm.MultiHeadMask([base] * local_heads), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
        scale = jnp.asarray(head_dim**-0.5, q.dtype)  # the kernel does not scale the logits itself
        heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
        ids = None if segments is None else jax.vmap(lambda s: sk.SegmentIds(q=s, kv=s))(segments)
        out = jax.vmap(kernel)(heads_first(q * scale), heads_first(k), heads_first(v), segment_ids=ids)
        return heads_first(out)

    if mesh.empty:
        return per_shard(q, k, v, segments)
    qkv = jax.sharding.PartitionSpec(*qkv_spec)
    rows = jax.sharding.PartitionSpec(qkv_spec[0], None)
    return jax.shard_map(per_shard, in_specs=(qkv, qkv, qkv, None if segments is None else rows), out_specs=qkv,
                         check_vma=False)(q, k, v, segments)


def _splash_block(length: int) -> int:
    """The kernel's block size for a sequence length (0: none fits; the caller falls back to xla)."""
    return next((b for b in (512, 256, 128) if length % b == 0), 0)
