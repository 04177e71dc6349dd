"""Attention kernels chosen by `Runtime.attention`: 'xla', 'cudnn', 'splash' or 'auto'.

- xla: `jax.nn.dot_product_attention`'s XLA path; it writes the whole [heads, query, key] score matrix.
- cudnn: cuDNN flash attention on NVIDIA GPUs, for bfloat16/float16 inputs and head dims it takes. Right-padded
  rows (training batches, BERT's key padding) are passed as causal or padding mode plus each row's key length,
  so no [batch, 1, length, length] mask is ever built; any other mask (left-padded prompts, a cache's slots:
  inference only) goes in as a bias of the full [batch, 1, query, key] shape, the only one cuDNN takes.
- splash: the Pallas TPU splash-attention kernel (blockwise, causal blocks above the diagonal skipped), with
  real/padding tokens as segment ids; under a mesh it runs per shard (batch and heads). On CPU it runs in
  Pallas' interpreter, which is how the tests check it against xla. Its blocks need a length that is a
  multiple of 128 (stage 2's buckets are).
- auto: splash on TPU, cudnn on GPU, xla elsewhere, by the platform of the mesh in use (or JAX's default).

Where the asked-for kernel cannot take the inputs (float32 on cuDNN, ViT's 1,025 tokens or a dense mask on
splash), `choose` runs them through xla instead, and the choice and its reason are logged once.

A mask is a boolean array [batch, 1 or heads, query, key] (decoding against a cache), a `CausalMask`
(a decoder's full forward) or a `KeyMask` (an encoder's key padding); the fused kernels build the last two
themselves. The projections around attention carry `checkpoint_name`s (see `remat_policy`) so a remat policy
can keep them: query_proj, key_proj, value_proj, attention_out.
"""

import functools
import logging

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

KERNELS = ("xla", "cudnn", "splash", "auto")
_BY_PLATFORM = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # `check_layout` in jax/_src/cudnn/fused_attention_stablehlo.py
log = logging.getLogger(__name__)


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


@flax.struct.dataclass
class KeyMask:
    """Every query sees its row's real keys (an encoder's key padding, BERT's `attention_mask`).

    `right_padded` promises that every row's real tokens come first (what BERT tokenizers give); cuDNN then
    needs only the row lengths.
    """

    valid: jax.Array  # [batch, length] bool
    right_padded: bool = flax.struct.field(pytree_node=False, default=False)

    def dense(self) -> jax.Array:
        return self.valid[:, None, None, :]


def resolve(kernel: str, platform: str | None = None) -> str:
    """'auto' -> the kernel for `platform`, by default the one the program is compiled for."""
    if kernel not in KERNELS:
        raise ValueError(f"runtime.attention must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    return _BY_PLATFORM.get(platform or _platform(), "xla")


def _platform() -> str:
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return jax.default_backend() if device is None else device.platform


def choose(kernel: str, q, k, mask=None, platform: str | None = None) -> tuple[str, str]:
    """(the kernel that runs these inputs, why not the one asked for: '' when it is), for q [batch, query,
    heads, head_dim] and k [batch, key, kv_heads, head_dim] (arrays or shapes with a dtype)."""
    wanted = resolve(kernel, platform)
    if wanted == "splash":
        if not (mask is None or isinstance(mask, CausalMask)):
            return "xla", "splash takes no dense or key-padding mask"
        if not _splash_block(q.shape[1]):
            return "xla", f"splash needs a length that is a multiple of 128, got {q.shape[1]}"
    if wanted == "cudnn":
        head_dim, most = q.shape[-1], _cudnn_max_head_dim()
        if jnp.dtype(q.dtype) not in _CUDNN_DTYPES or jnp.dtype(k.dtype) != jnp.dtype(q.dtype):
            return "xla", f"cuDNN takes bfloat16 or float16, got {jnp.dtype(q.dtype).name}"
        if head_dim % 8 or head_dim > most:
            return "xla", f"cuDNN takes head dims that are multiples of 8 up to {most}, got {head_dim}"
    return wanted, ""


def _cudnn_max_head_dim() -> int:
    """256 from Hopper (compute capability 9.0) on, 128 before (`check_is_flash_attention` in JAX)."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    return 256 if capability and float(capability) >= 9.0 else 128


@functools.cache
def _log_choice(kernel: str, chosen: str, reason: str):
    """Once per distinct choice: a run traces attention once per layer shape, the log says it once."""
    if reason:
        log.info("attention: %s runs through %s: %s", kernel, chosen, reason)
    else:
        log.info("attention: %s runs through %s", kernel, chosen)


def attend(q, k, v, mask=None, *, kernel: str = "xla"):
    """Multi-head attention on [batch, length, heads, head_dim]; k/v may have fewer (grouped) heads."""
    q, k, v = (checkpoint_name(x, n) for x, n in ((q, "query_proj"), (k, "key_proj"), (v, "value_proj")))
    chosen, reason = choose(kernel, q, k, mask)
    _log_choice(kernel, chosen, reason)
    if chosen == "splash":
        out = splash(q, k, v, mask)
    elif chosen == "cudnn":
        out = cudnn(q, k, v, mask)
    else:
        dense = mask.dense() if isinstance(mask, (CausalMask, KeyMask)) else mask
        out = jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="xla")
    return checkpoint_name(out, "attention_out")


def cudnn(q, k, v, mask, implementation: str = "cudnn"):
    """cuDNN's kernel; `implementation` is there so the CPU tests can run the same arguments through XLA.

    Right-padded rows become key lengths (causal or not); any other mask a bias of the full [batch, 1, query,
    key] shape: cuDNN's layout check does not broadcast one (JAX issue 28974). Training only ever passes
    right-padded rows (a bias's gradient is cuDNN's weak spot). JAX's training-time check counts every call
    as one with a bias and so refuses odd lengths (ViT's 1 + 32 x 32 tokens): those get one slot of padding,
    a key no real query sees."""
    query, key = q.shape[1], k.shape[1]
    lengths, causal, dense = None, isinstance(mask, CausalMask), None
    if isinstance(mask, (CausalMask, KeyMask)) and mask.right_padded:
        lengths = mask.valid.sum(axis=1).astype(jnp.int32)
    elif mask is not None:
        dense = mask.dense() if isinstance(mask, (CausalMask, KeyMask)) else mask
        dense, causal = jnp.broadcast_to(dense, (q.shape[0], dense.shape[1], query, key)), False
    if query % 2 or key % 2:
        extra_q, extra_k = query % 2, key % 2
        q = jnp.pad(q, ((0, 0), (0, extra_q), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, extra_k), (0, 0), (0, 0))) for x in (k, v))
        if dense is not None:
            dense = jnp.pad(dense, ((0, 0), (0, 0), (0, extra_q), (0, extra_k)))
        elif lengths is None:
            lengths = jnp.full((q.shape[0],), key, jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, mask=dense, is_causal=causal, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out[:, :query]


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
