"""Paper Table 4: reports generated for the Indiana external test set (3,689 images), both sides labeled."""

from cxrllava_jax.evaluation.run import default_config


def get_config():
    config = default_config()
    config.dataset = "indiana"
    config.split = "test"
    config.paper_table = "indiana"
    config.answer_kind = "report"
    # Table 4 keeps Pleural Effusion (4.9% positive) and Pneumothorax (1.9%): only the 10-sample rule applied there.
    config.min_class_fraction = 0.0
    return config
