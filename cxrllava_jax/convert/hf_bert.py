"""Hugging Face BERT directories (BertModel or a BERT inside a task model: keys with or without `bert.`)."""

from pathlib import Path

from cxrllava_jax import files
from cxrllava_jax.convert.mapping import Entry, expected_shapes, import_params
from cxrllava_jax.convert.safetensors_io import SafetensorsReader
from cxrllava_jax.models.configs import BertConfig
from cxrllava_jax.errors import InputError

HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
             "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
             "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
             "layer_norm_eps": "layer_norm_eps", "pad_token_id": "pad_token_id"}


def config_from_hf(hf: dict, origin: str) -> BertConfig:
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise InputError(f"{origin}: only BERT with exact GELU and absolute positions is supported")
    return BertConfig(**{ours: hf[theirs] for ours, theirs in HF_FIELDS.items() if theirs in hf})


def bert_entries(cfg: BertConfig, torch_prefix: str = "") -> list[Entry]:
    t = torch_prefix
    entries = [Entry(f"{t}embeddings.{n}.weight", f"{n}/embedding", "copy")
               for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    entries += _layer_norm(f"{t}embeddings.LayerNorm", "embeddings_LayerNorm")
    for i in range(cfg.num_layers):
        tl, ol = f"{t}encoder.layer.{i}.", f"layer_{i}/"
        for n in ("query", "key", "value"):
            entries += [Entry(f"{tl}attention.self.{n}.weight", f"{ol}{n}/kernel", "heads_in", cfg.num_heads),
                        Entry(f"{tl}attention.self.{n}.bias", f"{ol}{n}/bias", "heads_bias", cfg.num_heads)]
        entries += [Entry(f"{tl}attention.output.dense.weight", f"{ol}attention_output/kernel", "heads_out",
                          cfg.num_heads),
                    Entry(f"{tl}attention.output.dense.bias", f"{ol}attention_output/bias", "copy")]
        entries += _layer_norm(f"{tl}attention.output.LayerNorm", f"{ol}attention_LayerNorm")
        entries += _dense(f"{tl}intermediate.dense", f"{ol}intermediate") + _dense(f"{tl}output.dense", f"{ol}output")
        entries += _layer_norm(f"{tl}output.LayerNorm", f"{ol}output_LayerNorm")
    return entries + _dense(f"{t}pooler.dense", "pooler")


def _dense(torch_name, our_name):
    return [Entry(f"{torch_name}.weight", f"{our_name}/kernel", "linear"), Entry(f"{torch_name}.bias", f"{our_name}/bias", "copy")]


def _layer_norm(torch_name, our_name):
    return [Entry(f"{torch_name}.weight", f"{our_name}/scale", "copy"), Entry(f"{torch_name}.bias", f"{our_name}/bias", "copy")]


class _RenamedReader:
    """Old BERT checkpoints name LayerNorm parameters gamma/beta; present them as weight/bias."""

    def __init__(self, reader):
        self.reader = reader
        self.names = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): k
                      for k in reader.keys()}

    def keys(self):
        return self.names.keys()

    def shape(self, key):
        return self.reader.shape(self.names[key])

    def get(self, key):
        return self.reader.get(self.names[key])


def load_hf_bert(directory) -> tuple[BertConfig, dict]:
    directory = Path(directory)
    cfg = config_from_hf(files.read_json(directory / "config.json"), str(directory / "config.json"))
    reader = _RenamedReader(SafetensorsReader(directory))
    prefix = "bert." if any(k.startswith("bert.") for k in reader.keys()) else ""
    # position_ids is a constant buffer; heads of task models (MLM, classifiers) are not the encoder.
    ignored = [k for k in reader.keys() if k.endswith("position_ids") or not k.startswith(prefix)]
    import jax.numpy as jnp

    from cxrllava_jax.models.bert import Bert

    shapes = expected_shapes(Bert(cfg), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))
    return cfg, import_params(bert_entries(cfg, prefix), reader, str(directory), shapes, ignored)
