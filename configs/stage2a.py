"""Stage 2A, feature alignment: only the projector trains (Adam lr 2e-3, batch 16, 1 epoch) on image-report
pairs, from stage 1B's image encoder and LLaMA-2-7B-chat."""

from configs import base
from cxrllava_jax.training import stages


def get_config():
    c = base.get_config()
    stages.start_from_previous(c, "2a", root="workdirs")
    c.data.sources = ("mimic",)
    c.data.conversations = "report"
    c.optim.update(name="adam", learning_rate=2e-3)
    c.frozen = ("img/.*", "llm/.*")
    c.num_epochs = 1.0
    c.init.llama = "pretrained/llama-2-7b-chat-hf"
    c.data.tokenizer = "pretrained/llama-2-7b-chat-hf"
    return c
