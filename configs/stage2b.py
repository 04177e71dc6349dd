"""Stage 2B, instruction tuning: everything but the image encoder trains (Adam lr 2e-5, batch 16, 3 epochs)
on reports and multi-turn question-answer conversations, from stage 2A."""

from configs import stage2a
from cxrllava_jax.training import stages


def get_config():
    c = stage2a.get_config()
    stages.start_from_previous(c, "2b", root="workdirs")
    c.data.conversations = "instruction"
    c.optim.update(name="adam", learning_rate=2e-5)
    c.frozen = ("img/.*",)
    c.num_epochs = 3.0
    c.init.llama = ""
    return c
