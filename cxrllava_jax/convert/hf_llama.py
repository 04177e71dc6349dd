"""Hugging Face LLaMA-family directories (`LlamaForCausalLM`: `model.*` + `lm_head.weight` unless the head is tied
to the embedding, LlamaConfig JSON of transformers 4.x or 5.x: LLaMA-2, Llama 3.x, SmolLM2, TinyLlama, ...)."""

import dataclasses
import json
from pathlib import Path

from cxrllava_jax import files
from cxrllava_jax.convert.mapping import Entry, expected_shapes, export_tensors, import_params
from cxrllava_jax.convert.safetensors_io import SafetensorsReader, storage_dtype, write_sharded
from cxrllava_jax.errors import InputError
from cxrllava_jax.models.configs import LlamaConfig, RopeScaling
from cxrllava_jax.models.rope import ROPE_TYPES

# Our LlamaConfig field <- Hugging Face LlamaConfig key.
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "rms_norm_eps": "rms_norm_eps",
             "rope_theta": "rope_theta", "max_position_embeddings": "max_position_embeddings",
             "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}


def config_from_hf(hf: dict, origin: str = "config.json") -> LlamaConfig:
    """Reads transformers 4.x configs (`rope_theta`, `rope_scaling`) and 5.x ones (`rope_parameters`)."""
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    unsupported = {k: hf[k] for k in ("attention_bias", "mlp_bias") if hf.get(k) not in (None, False)}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        unsupported["rope_type"] = rope_type
    if hf.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = hf["hidden_act"]
    if unsupported:
        raise InputError(f"{origin}: unsupported LLaMA options {unsupported}; supported rope types: {ROPE_TYPES}")
    values = {ours: hf[theirs] for ours, theirs in HF_FIELDS.items() if hf.get(theirs) is not None}
    values.setdefault("rms_norm_eps", 1e-6)  # transformers' default when the file leaves it out, not ours
    values.setdefault("num_kv_heads", values.get("num_heads", LlamaConfig.num_heads))
    if "rope_theta" not in values and "rope_theta" in rope:
        values["rope_theta"] = rope["rope_theta"]
    if isinstance(values.get("eos_token_id"), list):  # Llama 3 instruct models stop at any of several ids
        values["eos_token_id"] = values["eos_token_id"][0]
    cfg = LlamaConfig(**values, rope_scaling=_rope_scaling(rope_type, rope, origin),
                      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
    # transformers 5 always writes head_dim; the implied one is the same model, so keep configs comparable.
    return dataclasses.replace(cfg, head_dim=None) if cfg.head_dim == cfg.hidden_size // cfg.num_heads else cfg


def _rope_scaling(rope_type: str, rope: dict, origin: str) -> RopeScaling:
    if rope_type == "default":
        return RopeScaling()
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    values = {k: v for k, v in rope.items() if k in fields}
    if rope_type == "llama3" and "original_max_position_embeddings" not in values:
        raise InputError(f"{origin}: llama3 rope scaling without original_max_position_embeddings")
    return RopeScaling(rope_type=rope_type, **values)


def config_to_hf(cfg: LlamaConfig) -> dict:
    """A config both transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x read."""
    hf = {theirs: getattr(cfg, ours) for ours, theirs in HF_FIELDS.items()}
    hf["head_dim"] = cfg.resolved_head_dim
    scaling = cfg.rope_scaling
    hf["rope_scaling"] = None if scaling.rope_type == "default" else {
        k: v for k, v in dataclasses.asdict(scaling).items() if v is not None}
    hf.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
              tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False,
              torch_dtype="bfloat16")
    return hf


def llama_entries(cfg: LlamaConfig, torch_prefix: str = "model.", head_key: str = "lm_head.weight",
                  our_prefix: str = "") -> list[Entry]:
    """Our parameters <-> the PyTorch keys; a tied head has no tensor of its own (it is `embed_tokens`)."""
    t, o = torch_prefix, our_prefix
    entries = [Entry(f"{t}embed_tokens.weight", f"{o}embed_tokens/embedding", "copy")]
    for i in range(cfg.num_layers):
        tl, ol = f"{t}layers.{i}.", f"{o}layers/block_{i}/"
        entries += [Entry(f"{tl}self_attn.q_proj.weight", f"{ol}q_proj/kernel", "heads_in", cfg.num_heads),
                    Entry(f"{tl}self_attn.k_proj.weight", f"{ol}k_proj/kernel", "heads_in", cfg.num_kv_heads),
                    Entry(f"{tl}self_attn.v_proj.weight", f"{ol}v_proj/kernel", "heads_in", cfg.num_kv_heads),
                    Entry(f"{tl}self_attn.o_proj.weight", f"{ol}o_proj/kernel", "heads_out", cfg.num_heads)]
        entries += [Entry(f"{tl}mlp.{n}.weight", f"{ol}{n}/kernel", "linear") for n in ("gate_proj", "up_proj",
                                                                                         "down_proj")]
        entries += [Entry(f"{tl}{n}.weight", f"{ol}{n}/weight", "copy") for n in ("input_layernorm",
                                                                                 "post_attention_layernorm")]
    entries.append(Entry(f"{t}norm.weight", f"{o}norm/weight", "copy"))
    return entries if cfg.tie_word_embeddings else entries + [Entry(head_key, f"{o}lm_head/kernel", "linear")]


def llama_expected_shapes(cfg: LlamaConfig) -> dict:
    import jax.numpy as jnp

    from cxrllava_jax.models.llama import Llama

    return expected_shapes(Llama(cfg), jnp.zeros((1, 1), jnp.int32))


def read_config(directory) -> LlamaConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise InputError(f"{directory}: no config.json (a Hugging Face LLaMA directory)")
    return config_from_hf(files.read_json(path), str(path))


def load_hf_llama(directory) -> tuple[LlamaConfig, dict]:
    directory = Path(directory)
    cfg = read_config(directory)
    reader = SafetensorsReader(directory)
    ignored = [k for k in reader.keys() if k.endswith("rotary_emb.inv_freq")]
    if cfg.tie_word_embeddings:
        ignored.append("lm_head.weight")  # some writers store the tied head anyway: the same tensor as the embedding
    return cfg, import_params(llama_entries(cfg), reader, str(directory), llama_expected_shapes(cfg), ignored)


def save_hf_llama(directory, cfg: LlamaConfig, params: dict, dtype: str = "bfloat16",
                  max_shard_bytes: int = 5 * 2**30):
    """A directory `transformers.LlamaForCausalLM.from_pretrained` loads (params unscanned)."""
    directory = Path(directory)
    write_sharded(directory, export_tensors(llama_entries(cfg), params, storage_dtype(dtype)), max_shard_bytes)
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
