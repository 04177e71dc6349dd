"""Studies from real films written as DICOM: grouped by StudyInstanceUID, ordered by StudyDate, a lateral read
beside its frontal and refused alone; the study prompt (one frontal film: the release's prompt)."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.radiograph_guard import NotFrontalChestError
from cxrllava_jax.domain.studies import Study, latest_study, studies_in_folder
from cxrllava_jax.errors import InputError
from tests.dicom_files import NIH, chest_film, write_dicom, write_two_studies

SIZE = 32


@pytest.fixture
def folder(tmp_path):
    """`write_two_studies` and a stray text file."""
    write_two_studies(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_is_grouped_by_study_and_ordered_by_date_with_the_prior_linked(folder):
    older, current = studies_in_folder(folder)
    assert (older.uid, older.date, older.prior) == ("1.2.3.1", "20230301", None)
    assert (current.uid, current.date, current.prior) == ("1.2.3.2", "20240105", older)
    assert [(Path(i.source).name, i.view) for i in current.images] == [("b_frontal.dcm", "PA"), ("a_lateral.dcm", "LL")]
    assert latest_study(folder) == current  # what `ask` and `chat` read of a folder
    pixels = current.pixels(SIZE)  # frontal, lateral, then the prior's frontal: the prompt's order
    assert pixels.shape == (3, SIZE, SIZE, 1) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[2], Study.of(folder / "old.dcm").pixels(SIZE)[0])
    assert not np.array_equal(pixels[0], pixels[1])


def test_study_prompt_names_each_view_and_the_prior():
    text = prompting.study_prompt("Describe.", ["PA", "LL"], ["AP"], "20230301", "Small left effusion.",
                                  "Dyspnea.", "20240105")
    assert text == ("Indication: Dyspnea.\nCurrent study, 2024-01-05:\nPA view <image>\nlateral view <image>\n"
                    "Prior study, 2023-03-01:\nAP view <image>\nPrior report: Small left effusion.\nDescribe.")
    assert prompting.count_images([{"role": "user", "content": text}]) == 3
    with pytest.raises(InputError, match="contains <image>"):  # a place only the study's images may put there
        prompting.study_prompt("Describe.", ["PA"], prior_report="See <image>")


@pytest.mark.parametrize("views", [[""], ["PA"], ["AP"]])
def test_one_frontal_image_is_the_release_prompt(views):
    study = Study.of(NIH[0], views=views)
    assert study.prompt(prompting.REPORT_QUESTION) == prompting.REPORT_PROMPT


def test_lateral_alone_is_refused_naming_the_tag_and_inside_a_study_read(folder):
    lateral = folder / "new" / "a_lateral.dcm"
    with pytest.raises(NotFrontalChestError, match="ViewPosition is 'LL'"):
        Study.of(lateral).pixels(SIZE)
    with pytest.raises(NotFrontalChestError, match="only view is lateral"):  # a PNG the user calls lateral
        Study.of(NIH[0], views=["lateral"]).pixels(SIZE)
    assert Study.of([lateral, folder / "new" / "b_frontal.dcm"]).pixels(SIZE).shape == (2, SIZE, SIZE, 1)


def test_a_non_chest_file_is_refused_inside_a_study(folder):
    abdomen = write_dicom(folder / "abdomen.dcm", np.arange(64 * 64).reshape(64, 64), BodyPartExamined="ABDOMEN",
                          ViewPosition="AP")
    with pytest.raises(NotFrontalChestError, match="BodyPartExamined is 'ABDOMEN'"):
        Study.of([folder / "new" / "b_frontal.dcm", abdomen]).pixels(SIZE)


def test_files_of_one_study_that_disagree_are_refused(folder):
    chest_film(folder / "other.dcm", 0, ViewPosition="PA", StudyInstanceUID="1.2.3.2", PatientID="P1", StudyDate="20240106")
    with pytest.raises(InputError, match="StudyDate is '20240106' but .* says '20240105'"):
        studies_in_folder(folder)


def test_a_study_too_long_for_the_context_is_refused_naming_the_token_counts():
    study = Study.of([NIH[0], NIH[1]], views=["PA", "LL"], prior=Study.of(np.zeros((64, 64), np.uint8)))
    with pytest.raises(prompting.PromptTooLongError, match=r"3072 tokens \(3072 of them image positions: 3 images x 1024\) .* context is 3000"):
        study.check_fits(1024, 3000)
    study.check_fits(256, 4096)


def test_conversation_files_take_image_lists_with_one_place_each(tmp_path):
    import json

    from input_pipeline import conversations

    for name in ("pa.png", "lat.png"):
        Image.open(NIH[0]).save(tmp_path / name)
    answer = {"from": "gpt", "value": "Unchanged."}
    records = [{"image": ["pa.png", "lat.png"], "conversations": [{"from": "human", "value": "Compare."}, answer]},
               {"image": ["pa.png", "lat.png"], "conversations": [{"from": "human", "value": "<image>\nOne?"}, answer]}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(InputError, match=r"s.jsonl:2: the first human turn: 1 <image> place\(s\) .* for 2 image"):
        conversations.load(tmp_path / "s.jsonl")
    (tmp_path / "s.jsonl").write_text(json.dumps(records[0]) + "\n")
    [record] = conversations.load(tmp_path / "s.jsonl")
    assert record.image == (str(tmp_path / "pa.png"), str(tmp_path / "lat.png"))
    assert record.conversations[0][0]["content"] == "<image>\n<image>\nCompare."


def test_files_of_two_studies_are_a_study_and_its_prior_and_views_are_read_from_bytes(folder):
    """`Study.of` groups DICOM files by StudyInstanceUID (the earlier StudyDate the prior), from paths or bytes
    alike (a lateral upload alone refused by its tag); a view given against the file's is refused; three studies
    are refused."""
    new = folder / "new"
    paths = [folder / "old.dcm", new / "a_lateral.dcm", new / "b_frontal.dcm"]
    study = Study.of(paths)
    assert (study.uid, study.date, [i.view for i in study.images]) == ("1.2.3.2", "20240105", ["PA", "LL"])
    assert (study.prior.uid, study.prior.date, [i.source for i in study.prior.images]) == \
        ("1.2.3.1", "20230301", [paths[0]])
    uploads = Study.of([path.read_bytes() for path in paths])
    assert [i.view for i in uploads.all_images()] == ["PA", "LL", "PA"]
    np.testing.assert_array_equal(uploads.pixels(SIZE), study.pixels(SIZE))
    with pytest.raises(NotFrontalChestError, match="ViewPosition is 'LL'"):
        Study.of(new.joinpath("a_lateral.dcm").read_bytes()).pixels(SIZE)
    with pytest.raises(InputError, match=r"a_lateral.dcm: given as a frontal view \('PA'\) but its ViewPosition is 'LL'"):
        Study.of([new / "a_lateral.dcm"], views=["PA"])
    with pytest.raises(InputError, match="belong to 3 studies"):
        Study.of(paths + [chest_film(folder / "third.dcm", 0, StudyInstanceUID="1.2.3.9", PatientID="P1")])


def test_an_image_given_twice_or_a_prior_after_the_study_is_refused(folder):
    """The same file, the same bytes or the same DICOM instance twice in a study (or as its own prior, which would
    read as unchanged) is refused naming it; in a folder a repeated instance is read once. A prior dated after the
    current study is refused naming both dates."""
    frontal = folder / "new" / "b_frontal.dcm"
    copy = folder / "copy_of_frontal.dcm"
    copy.write_bytes(frontal.read_bytes())
    for images, kwargs in (([frontal, frontal], {}), ([frontal.read_bytes()] * 2, {}), ([frontal, copy], {}),
                           ([NIH[0]], {"prior": Study.of(NIH[0])})):
        with pytest.raises(InputError, match="the same image as .* a study reads each image once"):
            Study.of(images, **kwargs)
    older, current = studies_in_folder(folder)
    assert [i.view for i in current.images] == ["PA", "LL"]  # the copy or the original, once
    with pytest.raises(InputError, match=r"the prior study is dated 2025-01-01, after the current study \(20240105\)"):
        Study.of([frontal], prior=Study.of(NIH[0], date="2025-01-01"))
    Study.of([frontal], prior=Study.of(NIH[0], date="2024-01-05"))  # the same day
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the value as it writes it
        bad_date = chest_film(folder / "bad_date.dcm", 0, ViewPosition="PA", StudyInstanceUID="1.2.3.7",
                              StudyDate="2022-13-45")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom's warning about the value named no file of ours
        assert Study.of(bad_date).date == "2022-13-45"
