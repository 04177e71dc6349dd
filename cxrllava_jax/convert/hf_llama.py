"""Hugging Face LLaMA directories (`LlamaForCausalLM`: `model.*` + `lm_head.weight`, LlamaConfig JSON)."""

import dataclasses
import json
from pathlib import Path

from cxrllava_jax import files
from cxrllava_jax.convert.mapping import Entry, expected_shapes, export_tensors, import_params
from cxrllava_jax.convert.safetensors_io import SafetensorsReader, storage_dtype, write_sharded
from cxrllava_jax.models.configs import LlamaConfig
from cxrllava_jax.errors import InputError

# Our LlamaConfig field <- Hugging Face LlamaConfig key.
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "rms_norm_eps": "rms_norm_eps",
             "rope_theta": "rope_theta", "max_position_embeddings": "max_position_embeddings",
             "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}


def config_from_hf(hf: dict, origin: str = "config.json") -> LlamaConfig:
    """Reads transformers 4.x configs (`rope_theta`, `rope_scaling`) and 5.x ones (`rope_parameters`)."""
    rope = hf.get("rope_parameters") or {}
    unsupported = {k: hf[k] for k in ("rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings")
                   if hf.get(k) not in (None, False)}
    if rope.get("rope_type", "default") != "default":
        unsupported["rope_parameters"] = rope
    if hf.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = hf["hidden_act"]
    if unsupported:
        raise InputError(f"{origin}: unsupported LLaMA options {unsupported}")
    values = {ours: hf[theirs] for ours, theirs in HF_FIELDS.items() if hf.get(theirs) is not None}
    values.setdefault("rms_norm_eps", 1e-6)  # transformers' default when the file leaves it out, not ours
    values.setdefault("num_kv_heads", values.get("num_heads", LlamaConfig.num_heads))
    if "rope_theta" not in values and "rope_theta" in rope:
        values["rope_theta"] = rope["rope_theta"]
    cfg = LlamaConfig(**values)
    # transformers 5 always writes head_dim; the implied one is the same model, so keep configs comparable.
    return dataclasses.replace(cfg, head_dim=None) if cfg.head_dim == cfg.hidden_size // cfg.num_heads else cfg


def config_to_hf(cfg: LlamaConfig) -> dict:
    hf = {theirs: getattr(cfg, ours) for ours, theirs in HF_FIELDS.items()}
    hf["head_dim"] = cfg.kv_dim
    hf.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", tie_word_embeddings=False,
              attention_bias=False, mlp_bias=False, torch_dtype="bfloat16")
    return hf


def llama_entries(cfg: LlamaConfig, torch_prefix: str = "model.", head_key: str = "lm_head.weight",
                  our_prefix: str = "") -> list[Entry]:
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
    return entries + [Entry(f"{t}norm.weight", f"{o}norm/weight", "copy"), Entry(head_key, f"{o}lm_head/kernel", "linear")]


def llama_expected_shapes(cfg: LlamaConfig) -> dict:
    import jax.numpy as jnp

    from cxrllava_jax.models.llama import Llama

    return expected_shapes(Llama(cfg), jnp.zeros((1, 1), jnp.int32))


def load_hf_llama(directory) -> tuple[LlamaConfig, dict]:
    directory = Path(directory)
    cfg = config_from_hf(files.read_json(directory / "config.json"), str(directory / "config.json"))
    reader = SafetensorsReader(directory)
    ignored = [k for k in reader.keys() if k.endswith("rotary_emb.inv_freq")]
    return cfg, import_params(llama_entries(cfg), reader, str(directory), llama_expected_shapes(cfg), ignored)


def save_hf_llama(directory, cfg: LlamaConfig, params: dict, dtype: str = "bfloat16",
                  max_shard_bytes: int = 5 * 2**30):
    """A directory `transformers.LlamaForCausalLM.from_pretrained` loads (params unscanned)."""
    directory = Path(directory)
    write_sharded(directory, export_tensors(llama_entries(cfg), params, storage_dtype(dtype)), max_shard_bytes)
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
