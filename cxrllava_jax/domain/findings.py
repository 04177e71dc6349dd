"""The 14 CheXpert observations: the label vocabulary shared by the data, the labeler and the metrics."""

CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# Label values as the CheXpert labeler writes them; "not mentioned" is a missing value (NaN / empty cell).
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
