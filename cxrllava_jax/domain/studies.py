"""Studies, the unit a radiologist reads: the current images with their views, the prior study, the indication.

A `Study` holds its images (each with its view: 'PA', 'AP', a lateral, or '' when nobody said, which reads as
frontal as a single image always did), its date, an optional report (a prior's), an optional indication and an
optional prior `Study`. It is made from one image (`Study.of(image)`, today's input), from a list of images
(`Study.of([...])`, views given or read from each DICOM file's ViewPosition; DICOM files of two studies are the
current study and its prior, told apart by StudyDate), or from a folder of DICOM files (`studies_in_folder`): files
grouped by StudyInstanceUID, each patient's studies ordered by StudyDate/StudyTime, each linked to the one before it
as its prior. DICOM tags are read from files, their bytes, or anything with `read_bytes()` (a server's upload).
What a person gives (a command's arguments, a request's fields: images, views, the prior's images, the prior report,
the indication) becomes a study in one place, `study_as_given`; a folder asked about is its latest study
(`latest_study`).

Images are read in one order everywhere, the prompt's (`Study.prompt`) and the pixels' (`Study.pixels`): the
current study's frontal images, its laterals, then the prior's likewise. The radiograph guard reads a lateral view
only inside a study that has a frontal one; a lateral alone is refused as before, naming its ViewPosition.
"""

import dataclasses
import io
import re
import warnings
from pathlib import Path

import numpy as np

from cxrllava_jax.domain import images, prompting, radiograph_guard
from cxrllava_jax.domain.image_headers import is_dicom
from cxrllava_jax.domain.radiograph_guard import LATERAL_VIEWS, NotFrontalChestError, OVERRIDE, is_lateral
from cxrllava_jax.errors import InputError

_GROUPING_TAGS = ("StudyInstanceUID", "PatientID", "StudyDate", "StudyTime", "ViewPosition", "SOPInstanceUID")


@dataclasses.dataclass(frozen=True)
class StudyImage:
    source: object  # what `images.model_pixels` reads: a path, bytes, an open file, a PIL image or an array
    view: str = ""  # 'PA', 'AP', a lateral ('LL', 'RL', 'LAT', 'LATERAL'), or '' (not given: frontal)
    view_tag: str = ""  # what the file itself says: its DICOM ViewPosition ('' for other images)

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
        _check_distinct(self.all_images())
        if self.prior is not None and _day(self.prior.date) and _day(self.date) and \
                _day(self.prior.date) > _day(self.date):
            raise _about(InputError(f"{_name(self.prior.images[0].source)}: the prior study is dated {self.prior.date}, "
                                    f"after the current study ({self.date}); the prior is the earlier study"),
                         self.prior.images[0].source)

    @classmethod
    def of(cls, image_or_images, views=None, **fields) -> "Study":
        """A study as it is (then nothing else may be given), one image (a path, bytes, PIL image, array...) or a
        list of them; `views` one per image, else read from DICOM files' ViewPosition ('' where there is none).
        DICOM files of two StudyInstanceUIDs are a study and its prior (the earlier StudyDate), unless `prior` is
        given; the other `fields` (date, indication, ...) are the current study's, its date and UID otherwise read
        from its files."""
        if isinstance(image_or_images, Study):
            if views is not None or fields:
                raise InputError("a Study is taken as it is; give its views and fields when making it")
            return image_or_images
        sources = list(image_or_images) if isinstance(image_or_images, (list, tuple)) else [image_or_images]
        if views is not None and len(views) != len(sources):
            raise InputError(f"{len(views)} view(s) given for {len(sources)} image(s); give one per image")
        members = [_member(source, view) for source, view in zip(sources, views or [None] * len(sources))]
        for i, (image, tags) in enumerate(members):
            twin = next((other for other, other_tags in members[:i]
                         if tags["SOPInstanceUID"] and other_tags["SOPInstanceUID"] == tags["SOPInstanceUID"]), None)
            if twin is not None:
                raise _about(InputError(f"{_name(image.source)}: the same image as {_name(twin.source)} (SOPInstanceUID "
                                        f"{tags['SOPInstanceUID']}), given twice; a study reads each image once"),
                             image.source)
        groups: dict[str, list] = {}
        for member in members:
            groups.setdefault(member[1]["StudyInstanceUID"], []).append(member)
        if len(set(groups) - {""}) <= 1 or "prior" in fields:
            return _study(members, **fields)
        if "" in groups:
            raise InputError(f"{_name(groups[''][0][0].source)} has no StudyInstanceUID but the other images belong "
                             f"to studies {sorted(set(groups) - {''})}; give the prior as Study.of(..., prior=...)")
        if len(groups) > 2:
            raise InputError(f"the images belong to {len(groups)} studies ({', '.join(groups)}); a study is read "
                             "with one prior: give the current study's images and its prior's")
        prior, current = sorted(groups.values(), key=_study_key)
        _check_agrees(current[0], prior[0], ("PatientID",))
        return _study(current, prior=_study(prior), **fields)

    @property
    def has_frontal(self) -> bool:
        return any(not image.lateral for image in self.images)

    def all_images(self) -> tuple[StudyImage, ...]:
        """Every image the model reads, in prompt order: the current study's, then the prior's."""
        return self.images + (self.prior.images if self.prior else ())

    def prompt(self, question: str) -> str:
        """The first user turn asking `question` about this study (`prompting.study_prompt`). The release's report
        question, asked of a study with a prior, asks for the comparison the prior allows."""
        prior = self.prior
        if prior is not None and question == prompting.REPORT_QUESTION:
            question = prompting.COMPARISON_QUESTION
        return prompting.study_prompt(question, [i.view for i in self.images],
                                      [i.view for i in prior.images] if prior else (),
                                      prior.date if prior else "", prior.report if prior else "", self.indication,
                                      self.date if prior else "")

    def check_fits(self, num_image_tokens: int, max_length: int | None):
        """Refuses, before any image is read, a study whose image positions alone leave nothing to generate."""
        count = len(self.all_images())
        prompting.check_fits(count * num_image_tokens, count, num_image_tokens, max_length)

    def check_views(self, allow_non_frontal: bool = False):
        """Refuses, before any image is read, a study (or its prior) whose every image is a lateral view: the model
        reads a lateral only beside a frontal view of its study. A DICOM file's refusal names its ViewPosition, as
        the guard's does when it decodes one."""
        if allow_non_frontal:
            return
        for study in (self, self.prior):
            if study is None or study.has_frontal:
                continue
            first = study.images[0]
            try:
                radiograph_guard.check_view(first.view_tag, _name(first.source))
            except InputError as error:
                raise _about(error, first.source)
            raise _about(NotFrontalChestError(  # laterals by the views given, the files saying nothing
                f"{_name(first.source)}: the study's only view is lateral; the model reads a lateral view beside a "
                f"frontal one (PA or AP) of the same study; {OVERRIDE}"), first.source)

    def pixels(self, size: int, mode: str = "crop", allow_non_frontal: bool = False,
               min_size: int = images.RELEASE_PATCH_SIZE) -> np.ndarray:
        """uint8 model pixels [images, size, size, 1] in prompt order, each image through the one decode path
        and its guard; a lateral view passes only in a (current or prior) study that has a frontal one."""
        self.check_views(allow_non_frontal)
        return np.stack([pixels for study in (self, self.prior) if study is not None
                         for pixels in study._own_pixels(size, mode, allow_non_frontal, min_size)])

    def _own_pixels(self, size, mode, allow_non_frontal, min_size):
        out = []
        for image in self.images:
            # A lateral is read beside another image of the study that is frontal, never as its own companion
            # (whatever view it was given: the guard reads its tags again as it decodes).
            beside_frontal = any(not other.lateral for other in self.images if other is not image)
            try:
                out.append(images.model_pixels(image.source, size, mode, min_size, allow_non_frontal=allow_non_frontal,
                                               allow_lateral=beside_frontal))
            except InputError as error:
                raise _about(error, image.source)
        return out


def studies_in_folder(folder) -> list[Study]:
    """Every study in a folder of DICOM files (searched recursively; other files are passed over): files grouped
    by StudyInstanceUID, ordered by patient, then StudyDate and StudyTime, each study's prior the patient's study
    before it (a study without a StudyDate counts as the oldest). A file without a StudyInstanceUID is a study of
    its own; studies without a PatientID (anonymised exports) are taken as one patient's, as a folder usually is.
    (pydicom reads tags leniently: a damaged file usually has none, is a study of its own and fails when its pixels
    are read, alone.)"""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of DICOM files")
    groups: dict[str, list] = {}
    instances = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and images.is_dicom_file(p)):
        member = _member(path)
        instance = member[1]["SOPInstanceUID"]
        if instance in instances:  # the same image exported twice (PACS exports repeat files): read once
            continue
        instances.add(instance or None)
        groups.setdefault(member[1]["StudyInstanceUID"] or f"file:{path}", []).append(member)
    if not groups:
        raise InputError(f"{folder}: no DICOM files (files starting with the 128-byte preamble and 'DICM')")
    studies, latest = [], {}
    for members in sorted(groups.values(), key=_study_key):
        patient = members[0][1]["PatientID"]
        study = _study(members, prior=latest.get(patient))
        latest[patient] = study
        studies.append(study)
    return studies


def latest_study(folder) -> Study:
    """The study a question about a folder of one patient's DICOM files is about: the latest by StudyDate and
    StudyTime, with the study before it as its prior (`studies_in_folder`). A folder of several patients' studies is
    refused, naming them: which one to read is the user's choice."""
    studies = studies_in_folder(folder)
    patients: dict[str, Study] = {}
    for study in studies:
        patients.setdefault(study.patient, study)
    if len(patients) > 1:
        named = "; ".join(f"{patient or 'no PatientID'}: {_name(study.images[0].source)}"
                          for patient, study in patients.items())
        raise InputError(f"{folder}: holds the studies of {len(patients)} patients ({named}); give one patient's "
                         "folder or files")
    return studies[-1]


class PriorReportWithoutPrior(InputError):
    """A prior report given for a study with no prior images (neither given nor found among its DICOM files)."""


def study_as_given(images, views=None, prior_images=(), prior_views=None, prior_report: str = "",
                   indication: str = "") -> Study:
    """The study a person gives in a command's arguments or a request's fields: the current images with their views
    (None or '' each: DICOM files say theirs, other images read as frontal), the prior study's images with theirs,
    the prior's report and the indication as text. Without prior images, DICOM files of two StudyInstanceUIDs among
    `images` are the study and its prior (`Study.of`), and the prior report is that earlier study's. One image and
    nothing else is `Study.of(image)`: the release's input."""
    fields = {"indication": indication}
    if prior_images:
        fields["prior"] = Study.of(list(prior_images), prior_views, report=prior_report)
    study = Study.of(list(images), views, **fields)
    if prior_report and study.prior is None:
        raise PriorReportWithoutPrior("a prior report is given but no image of a prior study")
    if prior_report and not prior_images:  # the prior found among DICOM files of two studies
        study = dataclasses.replace(study, prior=dataclasses.replace(study.prior, report=prior_report))
    return study


def given_view(text) -> str:
    """A view as a person names it, upper-cased: PA, AP, a lateral (LL, RL, LAT, LATERAL), or '' (not given)."""
    view = text.strip().upper() if isinstance(text, str) else None
    if view not in ("", "PA", "AP", *LATERAL_VIEWS):
        raise InputError(f"must be PA, AP or a lateral ({', '.join(LATERAL_VIEWS)}), got {repr(text)[:40]}")
    return view


def _member(source, view: str | None = None) -> tuple[StudyImage, dict]:
    """(the image with its view: given, else its ViewPosition, else '') and its DICOM tags ('' each for other
    images). A view given against what the file says (frontal for a lateral, or the reverse) is refused: the guard
    reads a lateral only beside a frontal, so a study's frontal must be one."""
    tags = study_tags(source)
    told = tags["ViewPosition"]
    if view and told and is_lateral(view) != is_lateral(told):
        raise _about(InputError(f"{_name(source)}: given as a {'lateral' if is_lateral(view) else 'frontal'} view "
                                f"({view!r}) but its ViewPosition is {told!r}"), source)
    return StudyImage(source, str(view or told), str(told or "")), tags


def _study(members: list[tuple[StudyImage, dict]], **fields) -> Study:
    """One study of images whose tags agree (one patient, one date); its date, UID and patient from the tags
    unless given."""
    first = members[0]
    for member in members[1:]:
        _check_agrees(member, first, ("PatientID", "StudyDate"))
    read = {field: next((tags[tag] for _, tags in members if tags[tag]), "")
            for field, tag in (("date", "StudyDate"), ("uid", "StudyInstanceUID"), ("patient", "PatientID"))}
    return Study(tuple(image for image, _ in members), **{**read, **fields})


def _study_key(members):
    image, tags = members[0]
    return tags["PatientID"], tags["StudyDate"], tags["StudyTime"], _name(image.source)


def _check_agrees(member, first, keys):
    """Tags that both images have must be equal (one without them, a PNG or an anonymised file, agrees)."""
    for key in keys:
        if member[1][key] and first[1][key] and member[1][key] != first[1][key]:
            raise InputError(f"{_name(member[0].source)}: {key} is {member[1][key]!r} but {_name(first[0].source)} "
                             f"says {first[1][key]!r}; one study has one patient and one date, and its prior the "
                             "same patient")


def study_tags(source) -> dict:
    """The tags that place an image in its study (StudyInstanceUID, PatientID, StudyDate, StudyTime, ViewPosition),
    read without its pixel data; '' each for an image that is not a DICOM file (a path, bytes, or an object with
    `read_bytes()`)."""
    import pydicom

    readable = _dicom_readable(source)
    if readable is None:
        return dict.fromkeys(_GROUPING_TAGS, "")
    try:
        with warnings.catch_warnings():  # a value pydicom finds invalid (a StudyDate of 2022-13-45) is kept as text
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(readable, stop_before_pixels=True, specific_tags=list(_GROUPING_TAGS))
            return {tag: str(ds.get(tag) or "").strip() for tag in _GROUPING_TAGS}
    except Exception as error:  # pydicom raises many types for broken files
        raise _about(InputError(f"{_name(source)}: cannot read DICOM ({type(error).__name__}: {error})"),
                     source) from error


def _dicom_readable(source):
    """What pydicom reads for a DICOM image (its path, or its bytes as a file); None for other images (an open
    file is left unread: reading it here would leave nothing for the decoder)."""
    if isinstance(source, (str, Path)):
        dicom = images.is_dicom_file(source) or str(source).lower().endswith((".dcm", ".dicom"))
        return Path(source) if dicom and Path(source).is_file() else None
    if hasattr(source, "read_bytes"):
        data, name = source.read_bytes(), str(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), ""
    else:
        return None
    return io.BytesIO(data) if is_dicom(data) or name.lower().endswith((".dcm", ".dicom")) else None


def _check_distinct(study_images):
    """Refuses an image given twice in a study with its prior (the same file, or the same bytes): read as its own
    prior it would be reported unchanged."""
    for i, image in enumerate(study_images):
        twin = next((other for other in study_images[:i] if _same_source(image.source, other.source)), None)
        if twin is not None:
            raise _about(InputError(f"{_name(image.source)}: the same image as {_name(twin.source)}, given twice in one "
                                    "study (or as its own prior); a study reads each image once"), image.source)


def _same_source(a, b) -> bool:
    """The same file (paths), the same bytes (bytes, uploads), or the same object (arrays, PIL images)."""
    if isinstance(a, (str, Path)) and isinstance(b, (str, Path)):
        return Path(a).resolve() == Path(b).resolve()
    data = [bytes(x) if isinstance(x, (bytes, bytearray, memoryview)) else
            x.read_bytes() if hasattr(x, "read_bytes") and not isinstance(x, (str, Path)) else None for x in (a, b)]
    return data[0] == data[1] if None not in data else a is b


def _day(date: str) -> str:
    """A date as YYYYMMDD (DICOM's, or 2023-03-01 as a user writes it), '' when it is no such date."""
    digits = re.sub(r"\D", "", date or "")
    return digits if len(digits) == 8 else ""


def _about(error: InputError, source) -> InputError:
    """`error` marked with the image it is about (`error.image`), so that a caller that got the image from a
    request names the request's field (a server's upload has no path to name)."""
    error.image = source
    return error


def _name(source) -> str:
    return str(source) if isinstance(source, (str, Path)) or hasattr(source, "read_bytes") else \
        f"image ({type(source).__name__})"
