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

# The usual causes of each positive observation: the differential diagnoses instruction data teaches.
DIFFERENTIALS = {
    "Enlarged Cardiomediastinum": "lymphadenopathy, a mediastinal mass, or vascular enlargement such as aortic "
                                  "dilation",
    "Cardiomegaly": "cardiomyopathy, valvular heart disease, or a pericardial effusion",
    "Lung Lesion": "primary lung cancer, a metastasis, a granuloma, or a round pneumonia",
    "Lung Opacity": "infection, pulmonary edema, hemorrhage, or atelectasis",
    "Edema": "cardiogenic edema from heart failure, fluid overload, or non-cardiogenic edema such as ARDS",
    "Consolidation": "pneumonia, aspiration, pulmonary hemorrhage, or less commonly organizing pneumonia or "
                     "malignancy",
    "Pneumonia": "bacterial or viral infection, aspiration, or a non-infectious mimic such as hemorrhage",
    "Atelectasis": "mucus plugging, hypoventilation, or an obstructing endobronchial lesion",
    "Pneumothorax": "a spontaneous pneumothorax from a ruptured bleb, trauma, or an iatrogenic cause",
    "Pleural Effusion": "heart failure, a parapneumonic effusion, malignancy, or hypoalbuminemia",
    "Pleural Other": "pleural thickening after infection or hemorrhage, or asbestos-related pleural disease",
    "Fracture": "a traumatic fracture or, without known trauma, a pathologic fracture",
}
