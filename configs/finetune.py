"""Fine-tuning a trained CXR-LLaVA on your own studies with LoRA (or QLoRA) on one GPU:

    python train.py --config=configs/finetune.py --workdir=workdirs/finetune \
        --config.init.release=CXR-LLAVA-v2/ --config.data.train=my_data.jsonl [--config.data.eval=my_val.jsonl]

Starts from the release's directory (`init.release`) or any of our CXR-LLaVA checkpoints (`init.checkpoint`),
whose architecture and tokenizer it keeps. Data: LLaVA conversation JSON/JSONL or a CSV of image,report
(input_pipeline/conversations.py). Only the adapters train; the base stays frozen in bf16, or, with
`--config.lora.base_quantize=int8` (or int4: QLoRA), its language model quantized as `--quantize` does for inference.
Checkpoints hold the adapters and optimizer state only (the base is reloaded from where it came on resume). The
run writes the merged model to WORKDIR/model and the adapter alone, in PEFT's format, to WORKDIR/adapter.
"""

import ml_collections

from configs import base
from cxrllava_jax.models import lora


def get_config():
    c = base.get_config()
    c.task = "finetune"
    c.lora = ml_collections.ConfigDict(dict(
        rank=16, alpha=32.0, dropout=0.05,
        targets=lora.DEFAULT_TARGETS,  # regexes over module paths; add lora.PROJECTOR, lora.VIT to adapt those
        # QLoRA: 'int8' or 'int4' holds the language model's frozen weights quantized as inference does
        base_quantize=ml_collections.FieldReference(None, field_type=str),
        base_dtype="bfloat16",
    ))
    c.data.update(batch_size=4, eval_batch_size=4, seq_length=1536)
    c.optim.update(name="adamw", learning_rate=2e-4, weight_decay=0.0, warmup_steps=20, schedule="cosine",
                   grad_clip_norm=1.0)
    c.num_epochs = 3.0
    c.log_every_steps = 10
    c.eval_every_steps = 200
    c.checkpoint.update(every_steps=200, keep=2)
    c.init.update(checkpoint="", towers=())
    c.init.release = ""
    return c
