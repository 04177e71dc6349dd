"""Paper Table 2: reports generated for the MIMIC internal test set (3,000 images), both sides labeled."""

from cxrllava_jax.evaluation.run import default_config


def get_config():
    config = default_config()
    config.dataset = "mimic"
    config.split = "test"
    config.paper_table = "mimic"
    config.answer_kind = "report"
    return config
