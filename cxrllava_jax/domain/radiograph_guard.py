"""The inputs the model was trained for: frontal chest radiographs. DICOM says what a file holds; refuse the rest.

A DICOM file is refused, naming the tag and its value, when its Modality is not a projection radiograph (CR, DX,
DR), its BodyPartExamined is not the chest, or its ViewPosition is lateral. An absent or empty tag passes: many
exports leave them out. Images without such metadata (PNG, JPEG) pass with their size and bit depth checked.
`allow_non_frontal=True` (`--allow-non-frontal`) reads such files anyway, for people who know what they do.
"""

from cxrllava_jax.errors import InputError

RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "LUNGS")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL")
MAX_SIDE = 16384  # no radiograph detector is larger; a bigger "image" is not one (and would exhaust memory)


class NotFrontalChestError(InputError):
    """A file whose metadata says it is not a frontal chest radiograph."""


def check_dicom(ds, origin) -> None:
    """Refuses a DICOM dataset whose tags say it is not a frontal chest radiograph."""
    modality = _tag(ds, "Modality")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        _refuse(origin, "Modality", modality, f"a projection radiograph ({'/'.join(RADIOGRAPH_MODALITIES)})")
    body_part = _tag(ds, "BodyPartExamined")
    if body_part and not any(part in body_part for part in CHEST_BODY_PARTS):
        _refuse(origin, "BodyPartExamined", body_part, "the chest")
    view = _tag(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        _refuse(origin, "ViewPosition", view, "a frontal view (PA or AP)")
    bits = int(ds.get("BitsStored") or 0)
    if bits > 16:
        raise InputError(f"{origin}: BitsStored is {bits}; radiographs store at most 16 bits per pixel")


def check_image(image, origin) -> None:
    """A decoded PIL image without metadata: its size and bit depth must be a radiograph's."""
    if image.mode == "1":
        raise InputError(f"{origin}: 1-bit (black and white) image; a radiograph has 8 to 16 bits of gray levels")
    size = image.size
    if max(size) > MAX_SIDE:
        raise InputError(f"{origin}: image {size[0]}x{size[1]} is larger than any radiograph ({MAX_SIDE} pixels a side)")


def _tag(ds, keyword: str) -> str:
    return str(ds.get(keyword) or "").strip().upper()


def _refuse(origin, keyword: str, value: str, expected: str):
    raise NotFrontalChestError(
        f"{origin}: {keyword} is {value!r}, but the model reads frontal chest radiographs ({keyword} should be "
        f"{expected}); pass --allow-non-frontal (allow_non_frontal=True) to read it anyway")
