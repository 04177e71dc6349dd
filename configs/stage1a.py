"""Stage 1A: the image encoder learns normal vs abnormal (supplement: SGD lr 1e-3, batch 64, <= 100 epochs,
random init, best by validation loss)."""

from configs import base
from cxrllava_jax.training import stages


def get_config():
    c = base.get_config()
    stages.start_from_previous(c, "1a", root="workdirs")
    c.data.sources = ("chexpert", "nih", "padchest", "vindr", "brixia", "rsna_covid")  # Dataset 1
    c.data.batch_size = c.data.eval_batch_size = 64
    c.optim.update(name="sgd", learning_rate=1e-3)
    c.num_epochs = 100.0
    c.runtime.remat_policy = "none"
    c.checkpoint.update(best_metric="loss", best_mode="min", every_steps=5000)
    c.eval_every_steps = 5000
    return c
