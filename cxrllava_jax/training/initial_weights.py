"""Where a stage's weights come from when it is not resuming (the model it hands on is its task's `export`).

Order: random init (tiny sizes, or towers nobody provides), then the towers listed in
`config.init.towers` from the previous stage's exported model, then pretrained Hugging Face towers
(`config.init.llama`, `config.init.bert`) converted on the fly. Fine-tuning takes every base weight from
`config.init.release` or `config.init.checkpoint` (training/base_model.py) and keeps its fresh adapters.
"""

import jax
import numpy as np
from flax import traverse_util

from cxrllava_jax.convert import checkpoint as model_checkpoint
from cxrllava_jax.convert import hf_bert, hf_llama
from cxrllava_jax.convert.layout import relayout
from cxrllava_jax.errors import ConfigError, MismatchError
from cxrllava_jax.models import lora
from cxrllava_jax.training import base_model
from cxrllava_jax.training.tasks.base import runtime


def load(cfg, params, shardings):
    """Returns `params` with the configured pretrained parts swapped in, placed with `shardings`."""
    if cfg.task == "finetune":
        return _placed(_with_base_weights(cfg, params), shardings)
    params = dict(params)
    scan = cfg.runtime.scan
    if cfg.init.checkpoint:
        _, _, source = model_checkpoint.load_model(cfg.init.checkpoint, runtime(cfg))
        for tower in cfg.init.towers:
            if tower not in source:
                raise ConfigError(f"config.init.towers names {tower!r}, but {cfg.init.checkpoint} holds only "
                                  f"{sorted(source)}")
            params[tower] = _checked(params[tower], source[tower], f"{cfg.init.checkpoint}:{tower}")
    if cfg.init.llama:
        _, llm = hf_llama.load_hf_llama(cfg.init.llama)
        params["llm"] = _checked(params["llm"], relayout(llm, scan=scan), cfg.init.llama)
    if cfg.init.bert:
        _, bert = hf_bert.load_hf_bert(cfg.init.bert)
        txt = dict(params["txt"])
        txt["bert"] = _checked(txt["bert"], relayout(bert, scan=scan), cfg.init.bert)
        params["txt"] = txt
    return _placed(params, shardings)


def _placed(params, shardings):
    # Loaded towers arrive as host arrays and go to their shards; the rest stays where `create_sharded` put it.
    return jax.tree.map(lambda x, s: x if isinstance(x, jax.Array) else jax.device_put(x, s), params, shardings)


def _with_base_weights(cfg, params):
    """Fine-tuning: every base weight from the trained model (cast to the frozen base's dtype), the freshly
    initialised adapters kept (LoRA's B starts at zero: the run starts at the base model)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    base = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not lora.is_adapter(k)}, sep="/")
    loaded = _checked(base, base_model.params(cfg), cfg.init.release or cfg.init.checkpoint)
    return traverse_util.unflatten_dict({**flat, **traverse_util.flatten_dict(loaded, sep="/")}, sep="/")


def _checked(expected, found, origin: str):
    """`found` if it has exactly `expected`'s structure and shapes; else one error listing every difference."""
    if not isinstance(expected, dict):  # a single parameter such as the contrastive logit scale
        expected, found = {"value": expected}, {"value": found}
        return _checked(expected, found, origin)["value"]
    want = traverse_util.flatten_dict(expected, sep="/")
    have = traverse_util.flatten_dict(found, sep="/")
    problems = [f"missing {k} {want[k].shape}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k} {have[k].shape}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: expected {want[k].shape}, found {have[k].shape}"
                 for k in sorted(set(want) & set(have)) if want[k].shape != have[k].shape]
    if problems:
        raise MismatchError(f"initial weights from {origin} do not fit the model:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict({k: np.asarray(v).astype(want[k].dtype) for k, v in have.items()}, sep="/")

