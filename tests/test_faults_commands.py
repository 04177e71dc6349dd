"""Fault suite for the commands on the tiny model: a batch survives every bad file, earlier outputs are kept,
identity checks refuse parts that do not belong together, and the converters fail with a message naming the file.
In process (cli.main with capsys) except where a separate process is the point (tests/test_faults_processes.py)."""

import errno
import json
import os
import shutil

import numpy as np
import pytest

from cxrllava_jax import cli, errors, files
from cxrllava_jax.errors import InputError, MismatchError
from cxrllava_jax.inference.api import CXRLLaVA, Conversation
from cxrllava_jax.reference.tiny_models import release_dir, synthetic_radiograph
from tests.dicom_files import write_dicom
from tests.fault_files import STORED, png_header_only, swapped_tokenizer

GREEDY = ["--temperature", "0", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def checkpoint(imported_checkpoint):
    assert "tokenizer_fingerprint" in json.loads((imported_checkpoint / "model_config.json").read_text())
    return imported_checkpoint


@pytest.fixture(scope="module")
def model(checkpoint):
    return CXRLLaVA.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Good images, a DICOM without extension, and one of each kind of bad file."""
    folder = tmp_path_factory.mktemp("mixed")
    synthetic_radiograph(folder / "a_good.png", seed=0)
    write_dicom(folder / "b_IM0001", STORED)  # no extension, found by content
    png_header_only(folder / "c_bomb.png", 20_000, 10_000)  # PIL's DecompressionBombError
    write_dicom(folder / "d_width0.dcm", STORED, WindowCenter=10, WindowWidth=0, VOILUTFunction="SIGMOID")
    (folder / "e_truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    synthetic_radiograph(folder / "f_good.png", seed=1)
    synthetic_radiograph(os.fsdecode(bytes(folder) + b"/g_caf\xe9.png"), seed=2)  # a Latin-1 file name
    return folder


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_batch_survives_every_bad_file(mixed_folder, checkpoint, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    status = cli.main(["report", str(mixed_folder), "--checkpoint", str(checkpoint), "--jsonl", str(out),
                       "--batch-size", "2", *GREEDY])
    records = {r["image"].rsplit("/", 1)[1]: r for r in _jsonl(out)}
    assert status == 1
    assert sorted(records) == ["a_good.png", "b_IM0001", "c_bomb.png", "d_width0.dcm", "e_truncated.jpg", "f_good.png",
                               "g_caf\\xe9.png"]
    assert {name for name, r in records.items() if "report" in r} == {"a_good.png", "b_IM0001", "f_good.png"}
    assert "more than 100,000,000 pixels" in records["c_bomb.png"]["error"]
    assert "window width 0" in records["d_width0.dcm"]["error"]
    assert "cannot decode image" in records["e_truncated.jpg"]["error"]
    assert "the file name is not UTF-8 text" in records["g_caf\\xe9.png"]["error"]
    err = capsys.readouterr().err
    assert "4 of 7 images failed" in err and "Traceback" not in err


def test_a_prompt_too_long_is_recorded_for_its_item(model, mixed_folder):
    good = mixed_folder / "a_good.png"
    too_long = [{"role": "user", "content": "effusion " * 5000}]
    fine = [{"role": "user", "content": "Any effusion?"}]
    failed = {}
    answers = dict(model.iter_generate([fine, too_long, fine], [good] * 3, batch_size=3, temperature=0.0,
                                       max_new_tokens=2, on_bad_image=lambda i, e: failed.setdefault(i, e)))
    assert sorted(answers) == [0, 2] and list(failed) == [1] and "context" in str(failed[1])


def test_existing_jsonl_is_kept_unless_append_or_overwrite(mixed_folder, checkpoint, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    out.write_text('{"image": "earlier.png", "report": "kept"}\n')
    args = ["report", str(mixed_folder / "a_good.png"), "--checkpoint", str(checkpoint), "--jsonl", str(out), *GREEDY]
    assert cli.main(args) == 1
    assert "r.jsonl exists; pass --append, --resume or --overwrite" in capsys.readouterr().err
    assert out.read_text() == '{"image": "earlier.png", "report": "kept"}\n'
    assert cli.main(args + ["--append"]) == 0
    assert [r["image"] for r in _jsonl(out)] == ["earlier.png", str(mixed_folder / "a_good.png")]
    capsys.readouterr()
    assert cli.main(args + ["--resume"]) == 0  # recorded already: nothing to do, the model not even loaded
    assert "1 of 1 images already have a record" in capsys.readouterr().err and len(_jsonl(out)) == 2
    assert cli.main(args + ["--append"]) == 0  # written again, and said so
    assert "1 of 1 images already have a record" in capsys.readouterr().err and len(_jsonl(out)) == 3
    assert cli.main(args + ["--overwrite"]) == 0
    assert [r["image"] for r in _jsonl(out)] == [str(mixed_folder / "a_good.png")]


@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "nan", "--temperature nan: must be"), ("--top-p", "0", "--top-p 0.0: must be"),
    ("--top-p", "nan", "--top-p nan: must be"), ("--max-new-tokens", "0", "--max-new-tokens 0: must be"),
])
def test_sampling_options_refused_before_the_model_loads(tmp_path, capsys, option, value, message):
    status = cli.main(["report", str(tmp_path), "--checkpoint", str(tmp_path / "none"), option, value])
    err = capsys.readouterr().err
    assert status == 1 and message in err and "checkpoint" not in err


@pytest.mark.parametrize("size", ["0", "-1", "two"])
def test_batch_size_must_be_positive(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(tmp_path), "--checkpoint", str(tmp_path), "--batch-size", size])
    assert exit_.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_image_marker_in_a_question_is_refused(checkpoint, mixed_folder, capsys):
    status = cli.main(["ask", str(mixed_folder / "a_good.png"), "<image> Is there an effusion?",
                       "--checkpoint", str(checkpoint), *GREEDY])
    assert status == 1 and "contains <image>" in capsys.readouterr().err


def test_chat_survives_a_bad_follow_up_and_keeps_its_history(checkpoint, mixed_folder, monkeypatch, capsys):
    seen = []
    real_ask = Conversation.ask

    def ask(self, question, **options):  # the turns each question is asked after
        seen.append([t["content"] for t in self.turns] + [question])
        return real_ask(self, question, **options)

    monkeypatch.setattr(Conversation, "ask", ask)
    lines = iter(["Any effusion?", "and <image> here?", "x " * 3000, "Heart size?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", str(mixed_folder / "a_good.png"), "--checkpoint", str(checkpoint), *GREEDY]) == 0
    out = capsys.readouterr().out
    assert "not asked: the text contains <image>" in out and "no longer fits" in out
    assert out.count("cxr-llava> ") == 2  # the refused turns print no answer prompt before their refusal
    assert len(seen) == 3 and seen[-1][0] == "Any effusion?" and seen[-1][2] == "Heart size?"  # history kept


# ---------------------------------------------------------------- identity checks

def test_another_tokenizer_of_the_same_size_is_refused(checkpoint, tmp_path, mixed_folder, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt, ignore=shutil.ignore_patterns("tokenizer"))
    swapped_tokenizer(checkpoint / "tokenizer", ckpt / "tokenizer")
    with pytest.raises(MismatchError, match="is not the one .* was saved with"):
        CXRLLaVA.from_pretrained(ckpt)
    assert cli.main(["ask", str(mixed_folder / "a_good.png"), "Effusion?", "--checkpoint", str(ckpt)]) == 1
    assert "tokenizer" in capsys.readouterr().err


def test_model_config_that_disagrees_with_the_parameters(checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    meta = json.loads((ckpt / "model_config.json").read_text())
    meta["config"]["llama"]["intermediate_size"] += 8
    (ckpt / "model_config.json").write_text(json.dumps(meta))
    with pytest.raises(MismatchError, match=r"model_config.json implies \(\d+, \d+\), params/ holds \(\d+, \d+\)"):
        CXRLLaVA.from_pretrained(ckpt)


# ---------------------------------------------------------------- converters

def test_import_torch_bad_sources(tmp_path, capsys):
    def run(src, *extra):
        status = cli.main(["import-torch", "--src", str(src), "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert status == 1 and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
        return err

    assert "no-such-dir: no such directory" in run(tmp_path / "no-such-dir")
    pickles = tmp_path / "pickles"
    shutil.copytree(release_dir(), pickles, ignore=shutil.ignore_patterns("*.safetensors*"))
    (pickles / "pytorch_model.bin").write_bytes(b"pickle")
    assert "pickle files are not read" in run(pickles)
    cut = tmp_path / "cut"
    shutil.copytree(release_dir(), cut)
    shard = sorted(cut.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert f"{shard}: not a readable safetensors file" in run(cut)
    broken = tmp_path / "broken"
    shutil.copytree(release_dir(), broken)
    (broken / "config.json").write_text("{")
    assert "config.json: line 1 column 2: not valid JSON" in run(broken)
    assert not (tmp_path / "out").exists()


def test_export_torch_bad_targets(checkpoint, tmp_path, capsys):
    onto_file = tmp_path / "file"
    onto_file.write_text("keep me")
    assert cli.main(["export-torch", "--checkpoint", str(checkpoint), "--out", str(onto_file)]) == 1
    assert "Not a directory" in capsys.readouterr().err and onto_file.read_text() == "keep me"
    with pytest.raises(SystemExit):
        cli.main(["export-torch", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"), "--max-shard-size",
                  "abc"])
    assert "'abc' is not a size" in capsys.readouterr().err
    cut = tmp_path / "cut"
    shutil.copytree(checkpoint, cut)
    for f in (cut / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[:100])
    status = cli.main(["export-torch", "--checkpoint", str(cut), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 1 and "cut/params: cannot read the parameters" in err and len(err.strip().splitlines()) <= 2, err
    assert not (tmp_path / "o").exists()


def test_image_errors_are_input_errors_for_library_callers(model, mixed_folder):
    with pytest.raises(InputError, match="c_bomb.png"):
        model.write_radiologic_report(mixed_folder / "c_bomb.png")
    with pytest.raises(ValueError, match="batch_size=0"):
        model.write_radiologic_reports([mixed_folder / "a_good.png"], batch_size=0)
    assert np.isfinite(model.preprocess(mixed_folder / "b_IM0001")).all()
    with pytest.raises(InputError, match=f"{mixed_folder}: is a directory; give an image file"):  # `ask DIR`
        model.ask_question("Is there an effusion?", mixed_folder)


# ---------------------------------------------------------------- the output protocol (cxrllava_jax/files.py)

def test_a_set_of_outputs_is_swapped_in_whole_or_not_at_all(tmp_path):
    """A failure leaves the old set and no staging behind; success swaps the new set in through the symlink that
    names it, and the files the command does not own are carried over (the same inodes, no copy)."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "a.txt").write_text("old a")
    (target / "stale.txt").write_text("an earlier run's output")
    (target / "notes.txt").write_text("the user's")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(RuntimeError):
        with files.staged_directory(tmp_path / "link", overwrite=True, owns=("a.txt", "stale.txt")) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("stopped")
    assert (target / "a.txt").read_text() == "old a" and sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
    notes = (target / "notes.txt").stat().st_ino
    with files.staged_directory(tmp_path / "link", overwrite=True, owns=("a.txt", "stale.txt")) as staging:
        (staging / "a.txt").write_text("new a")
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in target.iterdir()) == ["a.txt", "notes.txt"]
    assert (target / "a.txt").read_text() == "new a" and (target / "notes.txt").stat().st_ino == notes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


def test_a_mount_point_has_its_entries_swapped_in_one_by_one(tmp_path, monkeypatch):
    """A mount point (a container's volume) cannot be renamed: the set is staged inside it instead."""
    volume = tmp_path / "volume"
    volume.mkdir()
    for name, text in (("a.txt", "old a"), ("stale.txt", "old"), ("notes.txt", "the user's")):
        (volume / name).write_text(text)
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(volume))
    with files.staged_directory(volume, overwrite=True, owns=("a.txt", "stale.txt")) as staging:
        assert staging.parent == volume
        (staging / "a.txt").write_text("new a")
    assert {p.name: p.read_text() for p in volume.iterdir()} == {"a.txt": "new a", "notes.txt": "the user's"}


@pytest.mark.parametrize("kind", ["file", "directory", "appended record"])
def test_a_full_disk_names_the_output_and_keeps_the_old(tmp_path, monkeypatch, capsys, kind):
    out = tmp_path / ("out" if kind == "directory" else "out.jsonl")
    if kind == "directory":
        out.mkdir()
        (out / "a.txt").write_text("old")
    else:
        out.write_text('{"image": "earlier.png", "report": "kept"}\n')
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def work():
        if kind == "file":
            with files.replaced_atomically(out) as f:
                f.write("new")
                raise full
        elif kind == "directory":
            with files.staged_directory(out, overwrite=True) as staging:
                (staging / "a.txt").write_text("new")
                raise full
        else:
            real_write, calls = os.write, []

            def half_then_full(fd, data):  # the disk fills after half of the line
                if fd != appender._fd:
                    return real_write(fd, data)
                calls.append(len(data))
                if len(calls) > 1:
                    raise full
                return real_write(fd, data[:len(data) // 2])

            with files.LockedAppender(out) as appender:
                monkeypatch.setattr(os, "write", half_then_full)
                appender.write({"image": "new.png", "report": "x" * 50})

    assert errors.report_errors("cxrllava x", work) == errors.EXIT_ERROR
    monkeypatch.undo()
    assert capsys.readouterr().err.startswith(f"cxrllava x: {out}: No space left on device while ")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_output_paths_of_the_wrong_kind_are_refused_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("keep")
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(SystemExit) as exit_:  # the argument's type refuses it, naming the flag
        cli.main(["synth", "--out", str(tmp_path / "a_file"), "--num", "2"])
    assert exit_.value.code == 2 and "argument --out: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(tmp_path / "missing.png"), "--checkpoint", str(checkpoint), "--jsonl",
                  str(tmp_path / "a_dir"), "--overwrite"])
    assert exit_.value.code == 2 and "a_dir is a directory; give the name of the file" in capsys.readouterr().err
    inside = tmp_path / "a_dir" / "sub"
    inside.mkdir()
    monkeypatch.chdir(inside)  # swapping a directory the shell is in would leave it in a removed one
    assert cli.main(["synth", "--out", str(tmp_path / "a_dir"), "--num", "2", "--overwrite"]) == 1
    assert "is the current directory or holds it" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "keep" and inside.is_dir()


def test_an_abandoned_staging_directory_is_removed_by_the_next_run(tmp_path):
    gone = next(pid for pid in range(4_000_000, 4_100_000) if not files._running(pid))
    (tmp_path / f".out.{gone}.partial").mkdir()
    (tmp_path / f".out.{os.getppid()}.partial").mkdir()  # a live writer's: kept
    with files.staged_directory(tmp_path / "out", overwrite=False) as staging:
        (staging / "a").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.{os.getppid()}.partial", "out"]


def test_synth_refuses_an_existing_dataset_and_replaces_it_beside_with_overwrite(tmp_path, capsys):
    data = tmp_path / "data"
    assert cli.main(["synth", "--out", str(data), "--num", "3", "--image-size", "32", "--seed", "1"]) == 0
    image = next((data / "files").rglob("*.jpg"))
    os.link(image, tmp_path / "kept.jpg")  # a hard-linked copy elsewhere (a cp -l backup)
    (data / "README.md").write_text("the user's notes")
    before = image.read_bytes()
    capsys.readouterr()
    again = ["synth", "--out", str(data), "--num", "3", "--image-size", "48", "--seed", "1"]  # the same file names
    assert cli.main(again) == 1
    assert "data already holds files, mimic-cxr-2.0.0-chexpert.csv" in capsys.readouterr().err
    assert image.read_bytes() == before
    assert cli.main(again + ["--overwrite"]) == 0
    assert image.read_bytes() != before and (tmp_path / "kept.jpg").read_bytes() == before  # never written into
    assert (data / "README.md").read_text() == "the user's notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "kept.jpg"]


def test_export_torch_overwrite_replaces_an_export_beside_it(checkpoint, tmp_path, capsys):
    out = tmp_path / "export"
    args = ["export-torch", "--checkpoint", str(checkpoint), "--out", str(out), "--dtype", "float32"]
    assert cli.main(args) == 0
    (out / "NOTES.txt").write_text("the user's notes")
    weights = {p.name: p.stat().st_ino for p in out.glob("*.safetensors")}
    assert cli.main(args) == 1 and "pass --overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0
    assert {p.name for p in out.glob("*.safetensors")} == set(weights)
    assert all(p.stat().st_ino != weights[p.name] for p in out.glob("*.safetensors"))  # written anew, not into
    assert (out / "NOTES.txt").read_text() == "the user's notes" and (out / "README.md").is_file()  # the new card



def test_records_after_a_line_cut_off_by_a_kill_stay_whole(tmp_path):
    """A kill mid-line leaves a line without its newline: the next record starts a line of its own, and --resume's
    reading skips the cut one (its image is done again). The output's folder is created; a replaced file keeps
    its permissions."""
    out = tmp_path / "new" / "folder" / "r.jsonl"
    image = lambda record: record.get("image")  # noqa: E731
    with files.record_appender(out, skip_recorded=image) as appender:
        assert appender.write({"image": "a.png", "report": "x"})
    with open(out, "a") as f:
        f.write('{"image": "b.png", "rep')
    with files.record_appender(out, skip_recorded=image) as appender:
        assert appender.recorded() == {"a.png"}
        assert not appender.write({"image": "a.png", "report": "again"}) and appender.write({"image": "b.png"})
    assert out.read_text().splitlines()[-1] == '{"image": "b.png"}'
    out.chmod(0o640)
    with files.record_appender(out, replace=True) as appender:
        appender.write({"image": "c.png", "report": "y"})
    assert out.read_text() == '{"image": "c.png", "report": "y"}\n' and out.stat().st_mode & 0o777 == 0o640
