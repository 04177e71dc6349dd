"""Fault suite for the commands on the tiny model: a batch survives every bad file, earlier outputs are kept,
identity checks refuse parts that do not belong together, and the converters fail with a message naming the file.
In process (cli.main with capsys) except where a separate process is the point (tests/test_faults_processes.py)."""

import json
import os
import shutil

import numpy as np
import pytest

from cxrllava_jax import cli
from cxrllava_jax.errors import InputError, MismatchError
from cxrllava_jax.inference.api import CXRLLaVA
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
    assert "r.jsonl exists; pass --append or --overwrite" in capsys.readouterr().err
    assert out.read_text() == '{"image": "earlier.png", "report": "kept"}\n'
    assert cli.main(args + ["--append"]) == 0
    assert [r["image"] for r in _jsonl(out)] == ["earlier.png", str(mixed_folder / "a_good.png")]
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
    real_chat = CXRLLaVA.chat

    def chat(self, messages, image, **options):
        seen.append([m["content"] for m in messages])
        return real_chat(self, messages, image, **options)

    monkeypatch.setattr(CXRLLaVA, "chat", chat)
    lines = iter(["Any effusion?", "and <image> here?", "x " * 3000, "Heart size?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", str(mixed_folder / "a_good.png"), "--checkpoint", str(checkpoint), *GREEDY]) == 0
    out = capsys.readouterr().out
    assert "not asked: the text contains <image>" in out and "no longer fits" in out
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
    assert "is a file" in capsys.readouterr().err and onto_file.read_text() == "keep me"
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
