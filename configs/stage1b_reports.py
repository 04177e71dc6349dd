"""Stage 1B, part 2: CLIP-style training on MIMIC reports (Dataset 2), from part 1's towers, best by
validation loss."""

from configs import stage1b_labels


def get_config():
    c = stage1b_labels.get_config()
    c.data.sources = ("mimic",)
    c.data.text_kind = "reports"
    c.text_unfreeze_step = 0
    c.init.update(checkpoint="workdirs/stage1b_labels/model", towers=("img", "txt", "logit_scale"), bert="")
    return c
