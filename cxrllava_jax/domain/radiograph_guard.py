"""The inputs the model was trained for: frontal chest radiographs. Refuse what says, or shows, it is not one.

A DICOM file is refused, naming the tag and its value, when its Modality is not a projection radiograph (CR, DX,
DR), its BodyPartExamined is not the chest, or its ViewPosition is lateral. An absent or empty tag passes: many
exports leave them out. A lateral view is read only beside a frontal one of the same study (`allow_lateral`, set by
`studies.Study`), never alone: the model reports on a frontal film and a lateral adds to it. A file without such tags (PNG, JPEG, TIFF) is refused when its pixels show it is not a
radiograph: real colour (not gray stored as RGB) or a shape no chest film has (`check_content`).
`allow_non_frontal=True` (`--allow-non-frontal`) reads such files anyway, for people who know what they do.

Whatever the override, every image must have gray levels and a size no larger than any detector
(`image_headers.check_gray_levels`, `image_headers.check_size`).
"""

import numpy as np

from cxrllava_jax.domain.image_headers import check_gray_levels, check_size
from cxrllava_jax.errors import InputError

RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "LUNGS")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL")
# Chest films are 35x43 cm, 43x43 cm or thereabouts (portable ones 24x30 cm): nothing near 2.5 to 1.
MAX_ASPECT_RATIO = 2.5
# Gray stored as RGB (JPEG's chroma noise included) differs between channels by a few levels; colour content is
# where the channels differ by more than COLOUR_CHROMA on more than COLOUR_FRACTION of the image (coloured
# annotations on a film stay below it).
COLOUR_CHROMA = 24
COLOUR_FRACTION = 0.05
_COLOUR_SAMPLE_SIDE = 512  # pixels a side the colour check looks at (a nearest-neighbour sample of the image)
OVERRIDE = "pass --allow-non-frontal (allow_non_frontal=True) to read it anyway"


class NotFrontalChestError(InputError):
    """A file whose metadata or content says it is not a frontal chest radiograph."""


def check_dicom(ds, origin, allow_lateral: bool = False) -> None:
    """Refuses a DICOM dataset whose tags say it is not a frontal chest radiograph (a lateral view passes when
    `allow_lateral`: inside a study that has a frontal one)."""
    modality = _tag(ds, "Modality")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        _refuse(origin, "Modality", modality, f"a projection radiograph ({'/'.join(RADIOGRAPH_MODALITIES)})")
    body_part = _tag(ds, "BodyPartExamined")
    if body_part and not any(part in body_part for part in CHEST_BODY_PARTS):
        _refuse(origin, "BodyPartExamined", body_part, "the chest")
    check_view(_tag(ds, "ViewPosition"), origin, allow_lateral)


def check_view(view: str, origin, allow_lateral: bool = False) -> None:
    """Refuses a DICOM ViewPosition that names a lateral view, unless `allow_lateral` (inside a study that has a
    frontal one)."""
    if view in LATERAL_VIEWS and not allow_lateral:
        _refuse(origin, "ViewPosition", view, "a frontal view (PA or AP), or a lateral given together with the "
                "frontal view of its study")


def check_image(image, origin) -> None:
    """A decoded PIL image without metadata: its size and bit depth must be a radiograph's."""
    if image.mode == "1":
        check_gray_levels(1, origin)
    check_size(*image.size, origin)


def check_content(image, origin) -> None:
    """A PIL image from a file without DICOM tags: refused when its shape or its colour says it is no radiograph."""
    width, height = image.size
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise NotFrontalChestError(
            f"{origin}: image {width}x{height} is {ratio:.1f} times as long as it is wide; a chest radiograph is at "
            f"most {MAX_ASPECT_RATIO:g} to 1; {OVERRIDE}")
    if image.mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "1"):
        return
    fraction = colour_fraction(image)
    if fraction > COLOUR_FRACTION:
        raise NotFrontalChestError(
            f"{origin}: colour image ({fraction:.0%} of its pixels have colour); the model reads grayscale "
            f"radiographs (a photograph or a coloured figure is not one); {OVERRIDE}")


def colour_fraction(image) -> float:
    """The share of pixels whose red, green and blue differ by more than COLOUR_CHROMA levels, on a sample."""
    scale = max(1, max(image.size) // _COLOUR_SAMPLE_SIDE)
    sample = image.resize((max(1, image.width // scale), max(1, image.height // scale)), resample=0)
    rgb = np.asarray(sample.convert("RGB"), np.int16)
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    return float((chroma > COLOUR_CHROMA).mean())


def is_lateral(view: str) -> bool:
    """A ViewPosition (or a view a user gave) that names a lateral projection."""
    return view.strip().upper() in LATERAL_VIEWS


def _tag(ds, keyword: str) -> str:
    return str(ds.get(keyword) or "").strip().upper()


def _refuse(origin, keyword: str, value: str, expected: str):
    raise NotFrontalChestError(
        f"{origin}: {keyword} is {value!r}, but the model reads frontal chest radiographs ({keyword} should be "
        f"{expected}); {OVERRIDE}")
