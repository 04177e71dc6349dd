"""Stage 1B, part 1: CLIP-style training on label keywords of Dataset 1 (SGD lr 1e-2, text tower frozen
until step 70k). Starts from stage 1A's image encoder and a pretrained BERT (CXR-BERT in the paper)."""

from configs import base
from cxrllava_jax.training import stages


def get_config():
    c = base.get_config()
    stages.start_from_previous(c, "1b_labels", root="workdirs")
    c.data.sources = ("chexpert", "nih", "padchest", "vindr", "brixia", "rsna_covid")
    c.data.text_kind = "labels"
    c.data.batch_size = c.data.eval_batch_size = 128
    c.optim.update(name="sgd", learning_rate=1e-2)
    c.text_unfreeze_step = 70_000
    c.num_epochs = 30.0
    c.runtime.remat_policy = "none"
    c.checkpoint.update(best_metric="loss", best_mode="min", every_steps=5000)
    c.eval_every_steps = 5000
    c.init.bert = "pretrained/cxr-bert"
    return c
