"""Hugging Face LLaMA directories (`LlamaForCausalLM`: `model.*` + `lm_head.weight`, LlamaConfig JSON)."""

import json
from pathlib import Path

import numpy as np

from cxrllava_jax.convert.mapping import Entry, expected_shapes, export_tensors, import_params
from cxrllava_jax.convert.safetensors_io import SafetensorsReader, write_sharded
from cxrllava_jax.models.configs import LlamaConfig

# Our LlamaConfig field <- Hugging Face LlamaConfig key.
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "rms_norm_eps": "rms_norm_eps",
             "rope_theta": "rope_theta", "max_position_embeddings": "max_position_embeddings",
             "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def config_from_hf(hf: dict, origin: str = "config.json") -> LlamaConfig:
    unsupported = {k: hf[k] for k in ("rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings")
                   if hf.get(k) not in (None, False)}
    if unsupported:
        raise ValueError(f"{origin}: unsupported LLaMA options {unsupported}")
    values = {ours: hf[theirs] for ours, theirs in HF_FIELDS.items() if hf.get(theirs) is not None}
    values.setdefault("num_kv_heads", values["num_heads"])
    if "rope_theta" not in values and isinstance(hf.get("rope_parameters"), dict):
        values["rope_theta"] = hf["rope_parameters"].get("rope_theta", 10000.0)
    if values.get("head_dim") == values["hidden_size"] // values["num_heads"]:
        values.pop("head_dim")
    return LlamaConfig(**values)


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
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()), str(directory / "config.json"))
    reader = SafetensorsReader(directory)
    ignored = [k for k in reader.keys() if k.endswith("rotary_emb.inv_freq")]
    return cfg, import_params(llama_entries(cfg), reader, str(directory), llama_expected_shapes(cfg), ignored)


def save_hf_llama(directory, cfg: LlamaConfig, params: dict, dtype=np.float32, max_shard_bytes: int = 5 * 2**30):
    """A directory `transformers.LlamaForCausalLM.from_pretrained` loads (params unscanned)."""
    directory = Path(directory)
    write_sharded(directory, export_tensors(llama_entries(cfg), params, dtype), max_shard_bytes)
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = np.dtype(dtype).name
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
