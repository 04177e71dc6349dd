"""Defaults shared by every training stage: full-size CXR-LLaVA v2 (ViT-L/16 512 + LLaMA-2-7B)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "2b"  # which Task trains (training/tasks: 1a, 1b, 2a, 2b, finetune); stages.py sets it per stage
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        vision="vit_l16_512", vision_overrides={},
        llama="llama2_7b", llama_overrides={},
        text="bert_base", text_overrides={}, text_pooling="cls",
        projector="linear",
        projector_pool=1,  # > 1: ViT patches averaged pool x pool (2: 256 tokens an image) to fit several images
    ))
    c.runtime = ml_collections.ConfigDict(dict(
        dtype="bfloat16", param_dtype="float32", scan=True, remat_policy="save_qkv_proj", attention="auto",
    ))

    # Where the data is and how it is read. `source` names an adapter (mimic, chexpert, nih, padchest,
    # vindr, brixia, rsna_covid, indiana, synthetic); `sources` mixes several for stage 1.
    c.data = ml_collections.ConfigDict(dict(
        source="mimic", sources=(), data_dir="", batch_size=16, eval_batch_size=16,
        text_length=128, seq_length=2048, tokenizer="", uncertain_policy="abnormal",
        seq_buckets=4,  # stage 2: batches cut to one of this many lengths chosen from the data (0: all seq_length)
        num_workers=0, max_bad_fraction=0.0, shuffle_seed=0, eval_split="validate", train_split="train",
        image_mean=0.5, image_std=0.5, image_mode="crop",  # normalisation and crop/letterbox
        tfds_dir="",  # read the sources' ArrayRecord version (input_pipeline/tfds_builders.py) instead of files
        preprocessed=False,  # ...the one holding images as uint8 model pixels (`cxrllava preprocess`)
        text_tokenizer="",  # stage 1B: BERT tokenizer dir (defaults to config.init.bert)
        text_kind="labels",  # stage 1B texts: 'labels' (keywords) or 'reports'
        conversations="instruction",  # stage 2: 'report' (2A alignment) or 'instruction' (2B)
        train="", eval="",  # stage 2 and fine-tuning: your own conversation files instead (.json, .jsonl, .csv)
        max_images=1,  # stage 2 and fine-tuning: image slots a row (> 1: studies, `"image": [..]` lists)
    ))

    c.optim = ml_collections.ConfigDict(dict(
        name="adam", learning_rate=2e-5, momentum=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        warmup_steps=0, schedule="constant", end_lr_fraction=0.0, grad_clip_norm=0.0, grad_accum_steps=1,
    ))
    c.frozen = ()  # regexes over parameter paths such as 'img/.*'
    c.text_unfreeze_step = 0  # stage 1B: the text tower ('txt/.*') is frozen before this step

    c.num_epochs = 1.0
    c.num_train_steps = 0  # > 0 overrides num_epochs
    c.log_every_steps = 50
    c.eval_every_steps = 1000

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=1000, keep=2, best_metric="", best_mode="min", async_save=True))

    # Initial weights when not resuming: the previous stage's exported model (towers listed), and/or
    # pretrained towers converted on the fly from Hugging Face directories.
    c.init = ml_collections.ConfigDict(dict(checkpoint="", towers=(), llama="", bert=""))
    return c
