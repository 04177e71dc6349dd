"""Stage 1B, part 2: CLIP-style training on MIMIC reports (Dataset 2), from part 1's towers, best by
validation loss."""

from configs import stage1b_labels
from cxrllava_jax.training import stages


def get_config():
    c = stage1b_labels.get_config()
    c.data.sources = ("mimic",)
    c.data.text_kind = "reports"
    c.text_unfreeze_step = 0
    stages.start_from_previous(c, "1b_reports", root="workdirs")
    c.init.bert = ""
    return c
