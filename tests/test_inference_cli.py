"""`cxrllava report`, `ask` and `chat` on the tiny model; chat is driven through a pseudo-terminal; the study `ask`
and `chat` read from their arguments."""

import dataclasses
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time

import pytest

from cxrllava_jax import arguments, cli
from cxrllava_jax.domain.studies import Study, latest_study, studies_in_folder
from cxrllava_jax.errors import ConfigError
from cxrllava_jax.inference import cli as inference_cli
from cxrllava_jax.inference.cli import this_process
from cxrllava_jax.reference.tiny_models import checkpoint_dir, synthetic_radiograph
from tests.dicom_files import CURRENT_UID, PRIOR_UID, chest_film, write_two_studies

OPTIONS = ["--temperature", "0", "--max-new-tokens", "10"]
GREEDY = dict(temperature=0.0, max_new_tokens=10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    for i in range(3):
        synthetic_radiograph(folder / f"cxr{i}.png", seed=i)
    (folder / "nested").mkdir()
    synthetic_radiograph(folder / "nested" / "cxr3.png", seed=3)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_report_for_a_folder_to_jsonl(folder, model, tmp_path, capsys):
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    (study / "zz_broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "reports.jsonl"
    code = cli.main(["report", str(study), "--checkpoint", str(checkpoint_dir()), "--jsonl", str(out),
                     "--batch-size", "2", *OPTIONS])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    images = sorted(p for p in study.rglob("*.png"))
    assert code == 1  # one image could not be read
    assert sorted(r["image"] for r in records) == [str(p) for p in images]
    errors = [r for r in records if "error" in r]
    assert [r["image"] for r in errors] == [str(study / "zz_broken.png")] and "cannot decode" in errors[0]["error"]
    good = [p for p in images if p.name != "zz_broken.png"]
    expected = dict(zip(map(str, good), model.write_radiologic_reports(good, **GREEDY)))
    assert {r["image"]: r["report"] for r in records if "report" in r} == expected
    err = capsys.readouterr().err
    assert "zz_broken.png" in err and "5/5" in err  # the progress bar reached the end


def test_report_prints_one_report_per_image(folder, model, capsys):
    images = [folder / "cxr0.png", folder / "cxr1.png"]
    assert cli.main(["report", *map(str, images), "--checkpoint", str(checkpoint_dir()), *OPTIONS]) == 0
    out = capsys.readouterr().out
    for image, report in zip(images, model.write_radiologic_reports(images, **GREEDY)):
        assert f"== {image} ==\n{report}\n" in out


def test_ask_prints_the_answer(folder, model, capsys):
    question = "Is there a pleural effusion?"
    assert cli.main(["ask", str(folder / "cxr0.png"), question, "--checkpoint", str(checkpoint_dir()), *OPTIONS]) == 0
    assert capsys.readouterr().out == model.ask_question(question, folder / "cxr0.png", **GREEDY) + "\n"


def test_missing_image_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nowhere.png"), "--checkpoint", str(checkpoint_dir())]) == 1
    assert "nowhere.png: no such image file or directory" in capsys.readouterr().err


def _read_until(fd, marker: bytes, seen: bytearray, timeout: float = 120.0) -> bytes:
    deadline = time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout}s; terminal so far: {bytes(seen)!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            raise AssertionError(f"the chat ended before {marker!r}; terminal: {bytes(seen)!r}")
        seen += chunk
    before, _, after = bytes(seen).partition(marker)
    seen[:] = after
    return before


@pytest.mark.slow
def test_chat_in_a_terminal(folder, model):
    image = folder / "cxr1.png"
    parent, child = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "cxrllava_jax.cli", "chat", str(image), "--checkpoint", str(checkpoint_dir()),
         *OPTIONS], stdin=child, stdout=child, stderr=child, close_fds=True, start_new_session=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    os.close(child)
    seen = bytearray()
    try:
        _read_until(parent, b"you> ", seen)
        os.write(parent, b"Is there a pleural effusion?\n")
        first = _read_until(parent, b"you> ", seen).decode(errors="replace").replace("\r\n", "\n")
        os.write(parent, b"Which side?\n")
        second = _read_until(parent, b"you> ", seen).decode(errors="replace").replace("\r\n", "\n")
        os.write(parent, b"\x04")  # Ctrl-D at an empty line: EOF
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(parent)
    conversation = model.conversation(image)  # the ids of each turn kept, as the command keeps them
    answer = conversation.ask("Is there a pleural effusion?", **GREEDY)
    assert first.endswith(f"cxr-llava> {answer}\n"), (first, answer)
    assert second.endswith(f"cxr-llava> {conversation.ask('Which side?', **GREEDY)}\n")


def test_report_processes_take_their_own_slice_and_file(folder, model, tmp_path, monkeypatch, capsys):
    """With JAX's multi-process variables set, each process reports on every n-th image into its own file; the
    images are read ahead by a worker pool; every record says which model wrote it, how and why it ended."""
    out = tmp_path / "reports.jsonl"
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    for process in ("0", "1"):
        monkeypatch.setenv("JAX_PROCESS_ID", process)
        assert cli.main(["report", str(folder / "nested"), *map(str, sorted(folder.glob("*.png"))), "--checkpoint",
                         str(checkpoint_dir()), "--jsonl", str(out), "--workers", "2", *OPTIONS]) == 0
    written = {name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
               for name in ("reports.00000-of-00002.jsonl", "reports.00001-of-00002.jsonl")}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)
    images = [folder / "nested" / "cxr3.png", *sorted(folder.glob("*.png"))]
    assert [[r["image"] for r in records] for records in written.values()] == [
        [str(p) for p in images[0::2]], [str(p) for p in images[1::2]]]
    records = [r for records in written.values() for r in records]
    expected = dict(zip(map(str, images), model.write_radiologic_reports(images, **GREEDY)))
    assert {r["image"]: r["report"] for r in records} == expected
    provenance = records[0]["provenance"]
    assert provenance["checkpoint"] == str(checkpoint_dir()) and provenance["fingerprint"] == model.fingerprint
    assert {"finish_reason", "seed", "temperature", "top_p", "prompt_tokens", "completion_tokens"} <= provenance.keys()
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert cli.main(["report", str(folder / "nested"), "--checkpoint", str(checkpoint_dir())]) == 1
    assert "JAX_PROCESS_ID=2 must be in [0, JAX_NUM_PROCESSES=2)" in capsys.readouterr().err


@pytest.mark.parametrize("variables, expected", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES=2 is set but JAX_PROCESS_ID is not"),  # each would be process 0
    ({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "4"}, "SLURM_NTASKS=4 is set but SLURM_PROCID is not"),
    ({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "4", "SLURM_PROCID": "3"}, (3, 4)),  # a task of `srun -n 4`
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, (0, 1)),  # sbatch -n 4 without srun: one process
    ({"JAX_NUM_PROCESSES": "1"}, (0, 1)), ({"JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "2"}, (2, 3))])
def test_report_process_variables_name_what_is_missing(variables, expected, monkeypatch):
    """Which share of the images a `report` process takes: a launcher's variables that do not name this process
    are refused, and a SLURM allocation without a step (`srun`) is one process, not the first of several."""
    for name in ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    if isinstance(expected, tuple):
        assert this_process() == expected
    else:
        with pytest.raises(ConfigError, match=expected):
            this_process()


def test_report_studies_writes_one_record_per_study_and_resumes_by_study(model, tmp_path, capsys):
    """`report --studies`: the DICOM folder's two studies (the later one read with its lateral and the earlier one
    as its prior) get a record each naming the study, its images with views and dates, and the prior; a file that
    is no readable DICOM gets its error record; --resume writes only the study whose record is missing."""
    folder = tmp_path / "dicom"
    paths = write_two_studies(folder)
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    out = tmp_path / "studies.jsonl"
    argv = ["report", "--studies", str(folder), "--checkpoint", str(checkpoint_dir()), "--jsonl", str(out), *OPTIONS]
    assert cli.main(argv) == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_study = {r["study"]: r for r in records}
    _, older, current = studies_in_folder(folder)  # the broken file first (no PatientID), then P1's by date
    assert by_study[CURRENT_UID]["images"] == [{"image": str(paths["frontal"]), "view": "PA"},
                                               {"image": str(paths["lateral"]), "view": "LL"}]
    assert by_study[CURRENT_UID]["date"] == "20240105"
    assert by_study[CURRENT_UID]["prior"] == {"study": PRIOR_UID, "date": "20230301",
                                              "images": [{"image": str(paths["prior"]), "view": "PA"}]}
    assert [by_study[study.uid]["report"] for study in (older, current)] == \
        model.write_radiologic_reports([older, current], **GREEDY)
    assert by_study[PRIOR_UID]["prior"] is None and "report" in by_study[PRIOR_UID]
    assert "broken.dcm: DICOM file without pixel data" in by_study[None]["error"]
    assert "1 of 3 studies failed" in capsys.readouterr().err

    out.write_text("".join(json.dumps(r) + "\n" for r in records if r["study"] != CURRENT_UID))
    assert cli.main(argv[:-len(OPTIONS)] + ["--resume", *OPTIONS]) == 0
    assert "2 of 3 studies already have a record" in capsys.readouterr().err
    again = [json.loads(line) for line in out.read_text().splitlines()][2:]
    assert again == [by_study[CURRENT_UID]]


def _study_of(*argv) -> Study:
    parser = arguments.parser("cxrllava ask", "")
    inference_cli.add_study_arguments(parser)
    return inference_cli.study_from_arguments(parser.parse_intermixed_args(list(map(str, argv))))


def test_arguments_make_the_study_as_the_server_makes_a_requests(folder, tmp_path, capsys):
    """One file is the release's input; files with --view, --prior (--prior-view), --prior-report and --indication;
    DICOM files of two studies (the prior report going to the earlier one); a folder: its latest study. A view that
    is none is argparse's refusal (exit 2), naming the flag."""
    a, b, c = (folder / f"cxr{i}.png" for i in range(3))
    assert _study_of(a) == Study.of(a)
    with pytest.raises(SystemExit) as exit_:
        _study_of(a, "--view", "oblique")
    assert exit_.value.code == 2 and "argument --view: must be PA, AP or a lateral (LL, RL, LAT, LATERAL), got " \
        "'oblique'" in capsys.readouterr().err
    assert _study_of(a, b, "--view", "pa", "--view", "lateral", "--prior", c, "--prior-view", "AP", "--prior-report",
                     "Small left effusion.", "--indication", "Dyspnea.") == Study.of(
        [a, b], views=["PA", "LATERAL"], indication="Dyspnea.", prior=Study.of(c, views=["AP"],
                                                                            report="Small left effusion."))
    files = write_two_studies(tmp_path)
    current = latest_study(tmp_path)
    with_report = dataclasses.replace(current, prior=dataclasses.replace(current.prior, report="Clear."))
    assert _study_of(files["prior"], files["lateral"], files["frontal"], "--prior-report", "Clear.") == with_report
    assert _study_of(tmp_path, "--prior-report", "Clear.") == with_report
    assert [i.view for i in with_report.all_images()] == ["PA", "LL", "PA"] and with_report.prior.uid == PRIOR_UID


@pytest.mark.parametrize("extra, message", [
    (["cxr1.png", "--view", "PA"], "--view is given 1 time(s) for 2 image(s)"),
    (["--prior-view", "AP"], "--prior-view is given 1 time(s) for 0 image(s)"),
    (["--prior-report", "Clear."], "--prior-report is given but no image of a prior study"),
    (["--indication", "see <image>"], "--indication: the text contains <image>"),
    (["dicom", "--view", "PA"], "dicom: a folder is read as one patient's DICOM studies"),
    (["dicom"], "dicom: holds the studies of 2 patients (P1: "),
    (["dicom/new/b_frontal.dcm", "dicom/new/a_lateral.dcm", "--view", "LL", "--view", "LL"],
     "b_frontal.dcm: given as a lateral view ('LL') but its ViewPosition is 'PA'"),
    (["dicom/new/a_lateral.dcm"], "a_lateral.dcm: ViewPosition is 'LL', but the model reads frontal"),
    (["--view", "LAT"], "cxr0.png: the study's only view is lateral"),
    (["--prior", "dicom/new/a_lateral.dcm"], "a_lateral.dcm: ViewPosition is 'LL'"),
])
def test_a_study_that_cannot_be_made_is_refused_before_the_model_loads(folder, tmp_path, monkeypatch, capsys, extra,
                                                                        message):
    write_two_studies(tmp_path / "dicom")
    chest_film(tmp_path / "dicom" / "other.dcm", 0, ViewPosition="PA", StudyInstanceUID="9.9", PatientID="P2")
    monkeypatch.chdir(tmp_path)
    images = [] if extra and extra[0].startswith("dicom") else [str(folder / "cxr0.png")]
    extra = [str(folder / e) if e.endswith(".png") else e for e in extra]
    argv = ["ask", *images, *extra, "Effusion?", "--checkpoint", str(tmp_path / "never-read")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "never-read" not in err, err


def test_ask_and_chat_about_a_two_image_study(folder, model, tmp_path, monkeypatch, capsys):
    """`ask` and `chat` about a frontal and a lateral film (views given, with the indication) answer as the library
    does about that study, the chat keeping its conversation on it; a lateral alone is refused, naming its view
    (a DICOM file's ViewPosition, or the one given). The commands get the session's model (loading is tested above)."""
    monkeypatch.setattr(inference_cli, "_load", lambda args: model)
    a, b = folder / "cxr0.png", folder / "cxr1.png"
    study = Study.of([a, b], views=["PA", "LL"], indication="Cough.")
    options = ["--view", "PA", "--view", "LL", "--indication", "Cough.", "--checkpoint", str(checkpoint_dir()), *OPTIONS]
    question = "Is there a pleural effusion?"
    assert cli.main(["ask", str(a), str(b), question, *options]) == 0
    assert capsys.readouterr().out == model.ask_question(question, study, **GREEDY) + "\n"

    lines = iter([question, "Which side?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", str(a), str(b), *options]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Chatting about study: {a} (PA), {b} (LL). ")
    conversation = model.conversation(study)
    answers = [conversation.ask(question, **GREEDY), conversation.ask("Which side?", **GREEDY)]
    assert out.split("cxr-llava> ")[1:] == [f"{answer}\n" for answer in answers]

    lateral = write_two_studies(tmp_path)["lateral"]
    for argv, message in (([str(lateral)], "ViewPosition is 'LL'"), ([str(a), "--view", "LL"], "only view is lateral")):
        assert cli.main(["ask", *argv, question, "--checkpoint", str(checkpoint_dir()), *OPTIONS]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
