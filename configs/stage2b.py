"""Stage 2B, instruction tuning: everything but the image encoder trains (Adam lr 2e-5, batch 16, 3 epochs)
on reports and multi-turn question-answer conversations, from stage 2A."""

from configs import stage2a


def get_config():
    c = stage2a.get_config()
    c.stage = "2b"
    c.data.conversations = "instruction"
    c.optim.update(name="adam", learning_rate=2e-5)
    c.frozen = ("img/.*",)
    c.num_epochs = 3.0
    c.init.update(checkpoint="workdirs/stage2a/model", towers=("img", "projector", "llm"), llama="")
    return c
