"""Studies, the unit a radiologist reads: the current images with their views, the prior study, the indication.

A `Study` holds its images (each with its view: 'PA', 'AP', a lateral, or '' when nobody said, which reads as
frontal as a single image always did), its date, an optional report (a prior's), an optional indication and an
optional prior `Study`. It is made from one image (`Study.of(image)`, today's input), from a list of images
(`Study.of([...])`, views given or read from each DICOM file's ViewPosition), or from a folder of DICOM files
(`studies_in_folder`): files grouped by StudyInstanceUID, each patient's studies ordered by StudyDate/StudyTime,
each linked to the one before it as its prior.

Images are read in one order everywhere, the prompt's (`Study.prompt`) and the pixels' (`Study.pixels`): the
current study's frontal images, its laterals, then the prior's likewise. The radiograph guard reads a lateral view
only inside a study that has a frontal one; a lateral alone is refused as before, naming its ViewPosition.
"""

import dataclasses
from pathlib import Path

import numpy as np

from cxrllava_jax.domain import images, prompting
from cxrllava_jax.domain.radiograph_guard import NotFrontalChestError, OVERRIDE, is_lateral
from cxrllava_jax.errors import InputError

_GROUPING_TAGS = ("StudyInstanceUID", "PatientID", "StudyDate", "StudyTime", "ViewPosition")


@dataclasses.dataclass(frozen=True)
class StudyImage:
    source: object  # what `images.model_pixels` reads: a path, bytes, an open file, a PIL image or an array
    view: str = ""  # 'PA', 'AP', a lateral ('LL', 'RL', 'LAT', 'LATERAL'), or '' (not given: frontal)

    @property
    def lateral(self) -> bool:
        return is_lateral(self.view)


@dataclasses.dataclass(frozen=True)
class Study:
    images: tuple[StudyImage, ...]
    date: str = ""  # DICOM's YYYYMMDD, or any text a user gave
    report: str = ""  # the study's report, given for a prior
    indication: str = ""  # indication / clinical history
    prior: "Study | None" = None
    uid: str = ""  # StudyInstanceUID
    patient: str = ""  # PatientID

    def __post_init__(self):
        if not self.images:
            raise InputError("a study needs at least one image")
        # Frontal views first, each group in the order given: the order the prompt names them in.
        object.__setattr__(self, "images", tuple(sorted(self.images, key=lambda image: image.lateral)))

    @classmethod
    def of(cls, image_or_images, views=None, **fields) -> "Study":
        """One image (a path, bytes, PIL image, array...) or a list of them; `views` one per image, else read from
        DICOM files' ViewPosition ('' where there is none)."""
        sources = list(image_or_images) if isinstance(image_or_images, (list, tuple)) else [image_or_images]
        if views is not None and len(views) != len(sources):
            raise InputError(f"{len(views)} view(s) given for {len(sources)} image(s); give one per image")
        views = views if views is not None else [_view_of(source) for source in sources]
        return cls(tuple(StudyImage(s, str(v or "")) for s, v in zip(sources, views)), **fields)

    @property
    def has_frontal(self) -> bool:
        return any(not image.lateral for image in self.images)

    def all_images(self) -> tuple[StudyImage, ...]:
        """Every image the model reads, in prompt order: the current study's, then the prior's."""
        return self.images + (self.prior.images if self.prior else ())

    def prompt(self, question: str) -> str:
        """The first user turn asking `question` about this study (`prompting.study_prompt`)."""
        prior = self.prior
        return prompting.study_prompt(question, [i.view for i in self.images],
                                      [i.view for i in prior.images] if prior else (),
                                      prior.date if prior else "", prior.report if prior else "", self.indication,
                                      self.date if prior else "")

    def check_fits(self, num_image_tokens: int, max_length: int | None):
        """Refuses, before any image is read, a study whose image positions alone leave nothing to generate."""
        count = len(self.all_images())
        prompting.check_fits(count * num_image_tokens, count, num_image_tokens, max_length)

    def pixels(self, size: int, mode: str = "crop", allow_non_frontal: bool = False) -> np.ndarray:
        """uint8 model pixels [images, size, size, 1] in prompt order, each image through the one decode path
        and its guard; a lateral view passes only in a (current or prior) study that has a frontal one."""
        return np.stack([pixels for study in (self, self.prior) if study is not None
                         for pixels in study._own_pixels(size, mode, allow_non_frontal)])

    def _own_pixels(self, size, mode, allow_non_frontal):
        out = [images.model_pixels(image.source, size, mode, allow_non_frontal=allow_non_frontal,
                                   allow_lateral=self.has_frontal) for image in self.images]
        if not self.has_frontal and not allow_non_frontal:  # laterals without tags that say so (views given)
            raise NotFrontalChestError(
                f"{_name(self.images[0].source)}: the study's only view is lateral; the model reads a lateral view "
                f"beside a frontal one (PA or AP) of the same study; {OVERRIDE}")
        return out


def studies_in_folder(folder) -> list[Study]:
    """Every study in a folder of DICOM files (searched recursively; other files are passed over): files grouped
    by StudyInstanceUID, ordered by patient, then StudyDate and StudyTime, each study's prior the patient's study
    before it (a study without a StudyDate counts as the oldest). A file without a StudyInstanceUID is a study of
    its own; studies without a PatientID (anonymised
    exports) are taken as one patient's, as a folder usually is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of DICOM files")
    groups: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and images.is_dicom_file(p)):
        tags = _read_tags(path)
        groups.setdefault(tags["StudyInstanceUID"] or f"file:{path}", []).append((path, tags))
    if not groups:
        raise InputError(f"{folder}: no DICOM files (files starting with the 128-byte preamble and 'DICM')")
    ordered = sorted(groups.items(), key=lambda group: _study_key(group[1]))
    studies, latest = [], {}
    for uid, members in ordered:
        first = members[0][1]
        for path, tags in members[1:]:
            _check_agrees(path, tags, first, members[0][0])
        study = Study(tuple(StudyImage(path, tags["ViewPosition"]) for path, tags in members), date=first["StudyDate"],
                      prior=latest.get(first["PatientID"]), uid="" if uid.startswith("file:") else uid,
                      patient=first["PatientID"])
        latest[first["PatientID"]] = study
        studies.append(study)
    return studies


def latest_studies(studies: list[Study]) -> list[Study]:
    """Each patient's most recent study (with its priors behind it): what a folder asks to be reported."""
    latest = {}
    for study in studies:
        latest[study.patient] = study
    return list(latest.values())


def _study_key(members):
    tags = members[0][1]
    return tags["PatientID"], tags["StudyDate"], tags["StudyTime"], str(members[0][0])


def _check_agrees(path, tags, first, first_path):
    for key in ("PatientID", "StudyDate"):
        if tags[key] != first[key]:
            raise InputError(f"{path}: {key} is {tags[key]!r} but {first_path} of the same StudyInstanceUID says "
                             f"{first[key]!r}; one study has one patient and one date")


def _read_tags(path: Path) -> dict:
    """The tags that place a file in its study, read without its pixel data."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_GROUPING_TAGS))
    except Exception as error:  # pydicom raises many types for broken files
        raise InputError(f"{path}: cannot read DICOM ({type(error).__name__}: {error})") from error
    return {tag: str(ds.get(tag) or "").strip() for tag in _GROUPING_TAGS}


def _view_of(source) -> str:
    """A DICOM file's ViewPosition; '' for anything else (the view of a PNG is what the user says it is)."""
    if isinstance(source, (str, Path)) and images.is_dicom_file(source):
        return _read_tags(Path(source))["ViewPosition"]
    return ""


def _name(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"image ({type(source).__name__})"
