"""Paper Table 3: JSON labels from the label-generation prompt on the CheXpert test set (518 images, radiologist
ground truth), compared with the reference labels."""

from cxrllava_jax.evaluation.run import default_config


def get_config():
    config = default_config()
    config.dataset = "chexpert"
    config.split = "test"
    config.paper_table = "chexpert"
    config.answer_kind = "json_labels"
    return config
