"""DICOM files written by the tests with pydicom: uncompressed 16-bit grayscale, any extra elements; real chest
films as DICOM (`chest_film`) and a patient's two studies made of them (`write_two_studies`)."""

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_dicom(path, stored: np.ndarray, photometric="MONOCHROME2", bits_stored: int = 12, **elements):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    for name, value in elements.items():
        setattr(ds, name, value)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


NIH = sorted((Path(__file__).parent / "fixtures" / "real-cxr" / "nih").glob("*.png"))


def chest_film(path, index: int, **tags) -> Path:
    """A real NIH film (downscaled to 128 pixels) as a 12-bit CR chest DICOM file with `tags`."""
    stored = np.asarray(Image.open(NIH[index]).convert("L").resize((128, 128)), np.uint16) * 16
    return write_dicom(path, stored, Modality="CR", BodyPartExamined="CHEST", WindowCenter="2048",
                       WindowWidth="4096", **tags)


CURRENT_UID, PRIOR_UID = "1.2.3.2", "1.2.3.1"


def write_two_studies(folder: Path) -> dict[str, Path]:
    """Patient P1's study of 2024-01-05 (a PA and a lateral sharing its StudyInstanceUID, in a subfolder, the
    lateral's name sorting first) and the PA of 2023-03-01 before it; -> {"frontal", "lateral", "prior"}: paths."""
    (folder / "new").mkdir(parents=True)
    current = dict(StudyInstanceUID=CURRENT_UID, PatientID="P1", StudyDate="20240105")
    return {"lateral": chest_film(folder / "new" / "a_lateral.dcm", 1, ViewPosition="LL", **current),
            "frontal": chest_film(folder / "new" / "b_frontal.dcm", 0, ViewPosition="PA", **current),
            "prior": chest_film(folder / "old.dcm", 1, ViewPosition="PA", StudyInstanceUID=PRIOR_UID, PatientID="P1",
                                StudyDate="20230301")}
