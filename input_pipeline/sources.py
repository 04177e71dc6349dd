"""The dataset adapters by name: each is `load(root, split=None) -> list[Record]`, reading only label files.

Record images are not opened or even checked here (see `records.require_images`). `split` is 'train',
'validate' or 'test' (None: all); how each source's splits are made is in its module's docstring.
"""

from input_pipeline import brixia, chexpert, indiana, mimic, nih, padchest, rsna_covid, rsna_pneumonia, vindr

ADAPTERS = {
    "mimic": mimic.load,
    "synthetic": mimic.load,  # the synthetic dataset is written in the MIMIC-CXR-JPG layout
    "chexpert": chexpert.load,
    "nih": nih.load,
    "padchest": padchest.load,
    "vindr": vindr.load,
    "brixia": brixia.load,
    "rsna_covid": rsna_covid.load,
    "rsna_pneumonia": rsna_pneumonia.load,
    "indiana": indiana.load,
}
