"""Fault suite for the command line and loading: every bad argument, config or part is one or two lines on stderr
naming it, with exit 1 (2 for argparse's usage errors) and never 3; help texts show defaults, choices and --debug;
`CXRLLaVA.from_pretrained` refuses each kind of problem with one error type. In process (cli.main with capsys)
except the absl entry points' own parsing, which a separate process shows as a user meets it."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from cxrllava_jax import cli, errors
from cxrllava_jax.cli import COMMANDS
from cxrllava_jax.convert import checkpoint as checkpoints
from cxrllava_jax.errors import ConfigError, InputError, MismatchError
from cxrllava_jax.evaluation import run
from cxrllava_jax.inference import cli as inference_cli
from cxrllava_jax.inference.api import CXRLLaVA, Conversation
from cxrllava_jax.inference.language_model import LanguageModel
from cxrllava_jax.models import configs as mc
from cxrllava_jax.reference.tiny_models import synthetic_radiograph
from cxrllava_jax.training import loop
from tests import training_setup as setup

ROOT = Path(__file__).resolve().parents[1]
GREEDY = ["--temperature", "0", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return synthetic_radiograph(tmp_path_factory.mktemp("image") / "cxr.png", seed=0)


def _fails(argv, capsys, status=1) -> str:
    """Runs `cxrllava ARGV`: the status it must end with, and one or two lines on stderr without a traceback."""
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected" not in err and 1 <= len(err.strip().splitlines()) <= 2, err
    return err


def _usage_error(argv, capsys) -> str:
    """argparse's refusal: exit 2 and a message naming the flag."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


# ---------------------------------------------------------------- arguments

@pytest.mark.parametrize("dtype", ["float8", "int32", "float16", ""])
def test_dtype_is_a_choice_of_what_works(image, tmp_path, capsys, dtype):
    for command in (["ask", str(image), "Effusion?"], ["complete", "text"], ["serve"]):
        err = _usage_error([*command, "--checkpoint", str(tmp_path), "--dtype", dtype], capsys)
        assert f"argument --dtype: invalid choice: '{dtype}' (choose from 'float32', 'bfloat16')" in err
    with pytest.raises(ConfigError, match=f"dtype='{dtype}': expected one of float32, bfloat16"):
        CXRLLaVA.from_pretrained(tmp_path / "not-read", dtype=dtype)  # refused before the path is looked at
    with pytest.raises(ConfigError, match="runtime.param_dtype"):
        mc.Runtime(param_dtype=dtype)


@pytest.mark.parametrize("flag, value, message", [
    ("--image-size", "100000", "argument --image-size: 100000 is out of range: give a whole number from 8 to 4,096"),
    ("--image-size", "abc", "argument --image-size: 'abc' is not a whole number"),
    ("--seed", "-1", "argument --seed: -1 is out of range: give a whole number from 0 to 4,294,967,295"),
    ("--num", "0", "argument --num: 0 is out of range: give a whole number from 1 to 10,000,000"),
])
def test_synth_bounds_name_the_value(tmp_path, capsys, flag, value, message):
    assert message in _usage_error(["synth", "--out", str(tmp_path / "out"), flag, value], capsys)
    assert not (tmp_path / "out").exists()


def test_paths_of_the_wrong_kind_are_named(image, tmp_path, capsys):
    assert "argument --jsonl: " f"{tmp_path} is a directory; give the name of the file to write in it" in _usage_error(
        ["report", str(image), "--checkpoint", str(tmp_path), "--jsonl", str(tmp_path)], capsys)
    assert "argument --reports: an empty path" in _usage_error(["label", "--reports", "", "--out", "x.csv"], capsys)
    assert f"argument --key: {tmp_path / 'none.csv'}: no such file" in _usage_error(
        ["reader-study", "analyze", "--key", str(tmp_path / "none.csv"), "--ratings", str(image)], capsys)


def test_a_huge_token_budget_is_refused_before_the_model_loads(image, tmp_path, capsys):
    err = _fails(["ask", str(image), "Effusion?", "--checkpoint", str(tmp_path), "--max-new-tokens", "1" + "0" * 20],
                 capsys)
    assert "--max-new-tokens 100000000000000000000: must be an integer in [1, 2**31)" in err


def test_text_that_is_not_utf8_is_refused_before_the_model_loads(image, tmp_path, capsys):
    question = b"Caf\xe9 effusion?".decode("utf-8", "surrogateescape")  # what Python makes of a Latin-1 argument
    err = _fails(["ask", str(image), question, "--checkpoint", str(tmp_path / "never-read")], capsys)
    assert "the text is not UTF-8 (a byte 0xe9 at character 4)" in err


def test_reader_study_refuses_sheets_without_their_columns(tmp_path, capsys):
    key, ratings, out = tmp_path / "key.csv", tmp_path / "reader1.csv", tmp_path / "out.json"
    key.write_text("item,case,source\nitem-1,c1,model\nitem-2,c1,ground_truth\n")
    ratings.write_text("item,score\nitem-1,A\nitem-2,B\n")
    args = ["reader-study", "analyze", "--key", str(key), "--ratings", str(ratings), "--out", str(out)]
    assert "reader1.csv: no 'rating' column; its header is ['item', 'score']" in _fails(args, capsys)
    ratings.write_text("item,rating\nitem-1,\nitem-2,\n")
    assert "no item is rated in" in _fails(args, capsys)
    assert not out.exists()


def test_questions_and_images_of_the_wrong_kind(tmp_path, capsys):
    assert "the question is empty" in _fails(["ask", str(ROOT / "README.md"), " ", "--checkpoint", str(tmp_path)], capsys)
    assert f"{tmp_path}: no DICOM files" in _fails(  # a folder is a DICOM study's
        ["ask", str(tmp_path), "Effusion?", "--checkpoint", str(tmp_path)], capsys)
    assert f"argument IMAGE: {tmp_path / 'none.png'}: no such file or directory" in _usage_error(
        ["ask", str(tmp_path / "none.png"), "Effusion?", "--checkpoint", str(tmp_path)], capsys)


def test_an_output_folder_is_made_and_a_long_list_of_problems_is_cut(tmp_path, capsys):
    reports = tmp_path / "reports.csv"
    reports.write_text("No effusion.\n")
    out = tmp_path / "new" / "folder" / "labels.csv"
    assert cli.main(["label", "--reports", str(reports), "--out", str(out)]) == 0 and out.is_file()
    capsys.readouterr()
    problems = "\n".join(["345 problem(s) with the weights:"] + [f"  missing tensor {i}" for i in range(345)])
    assert errors.report_errors("prog", lambda: (_ for _ in ()).throw(InputError(problems))) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == errors.MAX_LINES and err[-1] == "  ... and 339 more lines (--debug shows them)"


def test_empty_predictions_are_refused(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n")
    with pytest.raises(InputError, match="p.jsonl: no records"):
        run.read_prediction_records(tmp_path / "p.jsonl")


# ---------------------------------------------------------------- help texts

@pytest.mark.parametrize("argv", [[name] for name in COMMANDS] + [["reader-study", "export"],
                                                                  ["reader-study", "analyze"]])
def test_every_command_helps_with_defaults_and_debug(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--debug" in out, out
    if "--dtype" in out:
        assert "{float32,bfloat16}" in out or "{bfloat16,float32}" in out
    if "--quantize" in out:
        assert "{int8,int4}" in out
    if any(flag in out for flag in ("--seed", "--batch-size", "--num", "--layout", "--labeler")):
        assert "(default: " in out


def test_entry_points_parse_as_a_user_meets_them(tmp_path):
    """train.py and eval.py in their own processes (absl reads sys.argv): `--help` exits 0 quickly, listing the
    configs with the demo's variants; bad configs and overrides are one line naming the flag."""
    workdir = f"--workdir={tmp_path / 'w'}"
    cases = {
        "train_help": (["train.py", "--help"], 0, "configs/demo.py:1b_labels"),
        "eval_help": (["eval.py", "--help"], 0, "configs/eval_mimic.py"),
        "variant": (["train.py", "--config=configs/demo.py:2c", workdir], 1,
                    "train.py: --config=configs/demo.py:2c: unknown stage '2c'; the stages are 1a, 1b_labels"),
        "no_variants": (["train.py", "--config=configs/stage1a.py:x", workdir], 1,
                        "train.py: --config=configs/stage1a.py:x: get_config() takes 0 positional arguments"),
        "type": (["train.py", "--config=configs/demo.py:1a", "--config.data.batch_size=abc", workdir], 1,
                 "train.py: --config.data.batch_size=abc: invalid literal for int()"),
        "key": (["train.py", "--config=configs/demo.py:1a", "--config.data.nosuch=1", workdir], 1,
                "override names a key the config does not have"),
        "no_file": (["train.py", "--config=configs/nosuch.py", "--config.data.batch_size=2", workdir], 1,
                    "train.py: --config=configs/nosuch.py: no such config file; see --help for the configs"),
        "old_train_key": (["train.py", "--config=configs/demo.py:1a", "--config.stage=1b", workdir], 1,
                          "train.py: --config.stage: the key is now config.task"),
        "old_eval_key": (["eval.py", "--config=configs/eval_mimic.py", "--config.task=json_labels", workdir], 1,
                         "eval.py: --config.task: the key is now config.answer_kind"),
        "empty_workdir": (["eval.py", "--config=configs/eval_mimic.py", "--workdir="], 1,
                          "eval.py: flag --workdir=: --workdir must name a directory (not empty"),
    }
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    started = {name: (subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), time.perf_counter())
               for name, (argv, _, _) in cases.items()}
    for name, (process, _) in started.items():
        out, err = process.communicate(timeout=300)
        _, status, message = cases[name]
        assert process.returncode == status and message in (out if status == 0 else err), (name, out, err)
        assert "Traceback" not in err and (status == 0 or len(err.strip().splitlines()) == 1), (name, err)
    assert not (tmp_path / "w").exists()


def test_help_does_not_import_jax():
    """What makes `train.py --help` answer in a second: nothing above the flag parsing imports JAX."""
    code = ("import runpy, sys; sys.argv = ['train.py', '--help']\ntry: runpy.run_path('train.py', run_name='__main__')"
            "\nexcept SystemExit as e: assert e.code == 0, e.code\nassert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


# ---------------------------------------------------------------- training configs

@pytest.mark.parametrize("override, message", [
    ({"model.llama": "nosuch"}, "config.model.llama='nosuch': no such preset; known: llama2_13b"),
    ({"frozen": "("}, "config.frozen=('(',): must be a tuple of regular expressions"),
    ({"runtime.dtype": "float16"}, "config.runtime.dtype='float16': must be one of float32, bfloat16"),
    ({"runtime.remat_policy": "keep_all"}, "config.runtime.remat_policy='keep_all': must be 'none', 'full'"),
])
def test_config_values_are_refused_with_their_key(tmp_path, override, message):
    cfg = setup.parse(setup.stage_flags("2b", tmp_path / "data", tmp_path / "tok", steps=2, **override))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loop.train_and_evaluate(cfg, tmp_path / "workdir")
    assert not (tmp_path / "workdir").exists()


def test_a_mesh_the_devices_cannot_fill_is_refused_before_any_work(tmp_path):
    cfg = setup.parse(setup.stage_flags("1a", tmp_path / "data", tmp_path / "tok", steps=2, **{"mesh.data": 3}))
    with pytest.raises(ConfigError, match=r"config.mesh \{'data': 3, 'fsdp': 1, 'tensor': 1\} needs 3 devices; "
                                          r"this process sees 1"):
        loop.train_and_evaluate(cfg, tmp_path / "workdir")
    assert not (tmp_path / "workdir").exists()


# ---------------------------------------------------------------- loading

def _adapter(directory: Path, config, tensors=None) -> Path:
    directory.mkdir()
    a, b = np.full((2, 64), 0.01, np.float32), np.full((64, 2), 0.01, np.float32)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = tensors or {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}
    safetensors.numpy.save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def stage_1a_checkpoint(tmp_path_factory):
    vision = mc.VisionConfig(image_size=32, patch_size=16, width=8, layers=1, head_width=4)
    return checkpoints.save_model(tmp_path_factory.mktemp("1a") / "model", "vit_classifier", vision,
                                  {"head": {"kernel": np.zeros((8, 1), np.float32)}})


@pytest.fixture(scope="module")
def other_model(imported_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a model_config.json that names another kind of model over its config."""
    ckpt = shutil.copytree(imported_checkpoint, tmp_path_factory.mktemp("other") / "ckpt")
    meta = json.loads((ckpt / "model_config.json").read_text())
    (ckpt / "model_config.json").write_text(json.dumps({**meta, "model": "bert"}))
    return ckpt


LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


@pytest.mark.parametrize("name, config, tensors, message", [
    ("bad_json", "{r: 2", None, "adapter_config.json: line 1 column 2: not valid JSON"),
    ("no_r", {k: v for k, v in LORA.items() if k != "r"}, None, "adapter_config.json: no 'r' (the LoRA rank)"),
    ("r_text", {**LORA, "r": "two"}, None, "'r' must be a positive whole number, not 'two'"),
    ("nan", LORA, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.full((2, 64), np.nan, np.float32),
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((64, 2), np.float32)},
     "q_proj.lora_A.weight: 128 of 128 values are NaN or infinite"),
    ("inf", LORA, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 64), np.float32),
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.full((64, 2), np.inf, np.float32)},
     "q_proj.lora_B.weight: 128 of 128 values are NaN or infinite"),
])
def test_bad_adapters_are_refused_before_the_model_loads(image, tmp_path, capsys, monkeypatch, imported_checkpoint,
                                                         name, config, tensors, message):
    adapter = _adapter(tmp_path / name, config, tensors)
    monkeypatch.setattr(checkpoints, "load_model", None)  # never reached: the adapter is read first
    assert message in _fails(["ask", str(image), "Effusion?", "--checkpoint", str(imported_checkpoint),
                              "--adapter", str(adapter)], capsys)
    with pytest.raises(InputError) as error:
        CXRLLaVA.from_pretrained(tmp_path / "never-read", adapter=adapter)
    assert message in str(error.value)


@pytest.mark.parametrize("case, error_type, message", [
    ("missing", InputError, "missing: no such directory"),
    ("a_file", InputError, "a_file: no such directory"),
    ("empty", InputError, "empty is neither a cxrllava-jax checkpoint"),
    ("other", MismatchError, "its \"config\" is not that of the 'bert' model it names"),
    ("stage_1a", MismatchError, "holds a 'vit_classifier' model; inference needs a 'cxr_llava' checkpoint"),
    ("no_tokenizer", InputError, "no tokenizer/ directory"),
    ("no_adapter", InputError, "no-adapter: no such directory"),
])
def test_from_pretrained_refuses_each_kind_of_problem_with_one_type(case, error_type, message, tmp_path, other_model,
                                                                    stage_1a_checkpoint, imported_checkpoint):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    no_tokenizer = shutil.copytree(imported_checkpoint, tmp_path / "no_tokenizer",
                                   ignore=shutil.ignore_patterns("tokenizer", "params"))
    path = {"other": other_model, "stage_1a": stage_1a_checkpoint, "no_tokenizer": no_tokenizer,
            "no_adapter": imported_checkpoint}.get(case, tmp_path / case)
    adapter = tmp_path / "no-adapter" if case == "no_adapter" else None
    with pytest.raises(error_type, match=message.replace("(", r"\(").replace(")", r"\)")):
        CXRLLaVA.from_pretrained(path, adapter=adapter)


def test_serve_and_complete_answer_with_the_adapter_folded_in(imported_checkpoint, tmp_path, monkeypatch, capsys):
    """`--adapter` reaches the weights that answer: the server's model and `complete`'s language model hold the
    adapter's change of layer 0's q_proj, and nothing else changes."""
    import uvicorn

    from cxrllava_jax.serving import app

    adapter = _adapter(tmp_path / "adapter", LORA)
    base = LanguageModel.from_checkpoint(imported_checkpoint).engine.params["params"]
    served = []
    monkeypatch.setattr(app, "create_app", lambda model, *_, **__: served.append(model))
    monkeypatch.setattr(uvicorn.Server, "run", lambda *_, **__: None)
    assert cli.main(["serve", "--checkpoint", str(imported_checkpoint), "--adapter", str(adapter), "--port", "0"]) == 0
    [model] = served
    assert model.provenance["adapter"] == str(adapter)
    llm = model.engine.params["params"]["llm"]
    _assert_only_q_proj_0_changed(base, llm)

    made = []
    load = LanguageModel.from_checkpoint
    monkeypatch.setattr(LanguageModel, "from_checkpoint", lambda *a, **k: made.append(load(*a, **k)) or made[-1])
    capsys.readouterr()
    options = ["--temperature", "0", "--max-new-tokens", "3"]
    assert cli.main(["complete", "--checkpoint", str(imported_checkpoint), "--adapter", str(adapter), "seen",
                     *options]) == 0
    [language_model] = made
    _assert_only_q_proj_0_changed(base, language_model.engine.params["params"])
    assert capsys.readouterr().out == "seen" + language_model.complete("seen", temperature=0, max_new_tokens=3) + "\n"


def _assert_only_q_proj_0_changed(base: dict, adapted: dict):
    from flax import traverse_util

    from cxrllava_jax.convert.layout import relayout

    base = traverse_util.flatten_dict(relayout(base, scan=False), sep="/")
    adapted = traverse_util.flatten_dict(relayout(adapted, scan=False), sep="/")
    assert base.keys() == adapted.keys()
    changed = [k for k in base if not np.array_equal(np.asarray(base[k]), np.asarray(adapted[k]))]
    assert changed == ["layers/block_0/q_proj/kernel"]


def test_complete_refusals(imported_checkpoint, stage_1a_checkpoint, capsys):
    err = _fails(["complete", "--checkpoint", str(imported_checkpoint), "--chat", "hello"], capsys)
    assert "tokenizer: the tokenizer has no chat template" in err and "without --chat" in err
    err = _fails(["complete", "--checkpoint", str(stage_1a_checkpoint), "hello"], capsys)
    assert "holds a 'vit_classifier' model, which has no language model" in err


def test_a_completion_keeps_the_space_it_starts_with(imported_checkpoint, monkeypatch):
    """SentencePiece keeps a word's space in front of it ("▁is"): decoded alone, a continuation loses it."""
    lm = LanguageModel.from_checkpoint(imported_checkpoint)
    prompt = lm.tokenizer("The heart size")["input_ids"]
    whole = lm.tokenizer("The heart size is normal")["input_ids"]
    assert whole[:len(prompt)] == prompt and lm.tokenizer.decode(whole[len(prompt):]).startswith("is")
    monkeypatch.setattr(lm, "continuations", lambda prompts, **options: [whole[len(prompt):]])
    assert lm.complete("The heart size", temperature=0.0) == " is normal"


# ---------------------------------------------------------------- chat and report

def test_chat_commands_and_a_latin1_line(imported_checkpoint, image, monkeypatch, capsys):
    asked = []

    def ask(conversation, question, **options):  # the turns each question is asked after, then it is answered
        asked.append([t["content"] for t in conversation.turns] + [question])
        conversation.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": "answer"}]
        return "answer"

    monkeypatch.setattr(Conversation, "ask", ask)
    lines = iter([b"Caf\xe9?".decode("utf-8", "surrogateescape"), "/help", "First?", "/reset", "Second?", "/nope",
                  "/quit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", str(image), "--checkpoint", str(imported_checkpoint), *GREEDY]) == 0
    out = capsys.readouterr().out
    assert "not asked: the text is not UTF-8" in out and "/reset  forget the conversation" in out
    assert "unknown command /nope" in out
    assert asked == [["First?"], ["Second?"]]  # /reset forgot


def test_report_creates_the_folder_of_its_output(image, tmp_path, monkeypatch):
    class Answer:
        text = "No acute findings."

        def record(self):
            return {}

    class Model:  # what `_report` needs of a loaded model: the folder is the point here, not the text
        provenance = {}

        def iter_generate(self, conversations, paths, **options):
            yield from ((i, Answer()) for i in range(len(paths)))

    monkeypatch.setattr(inference_cli, "_load", lambda args: Model())
    out = tmp_path / "new" / "folder" / "reports.jsonl"
    assert cli.main(["report", str(image), "--checkpoint", str(tmp_path), "--jsonl", str(out), *GREEDY]) == 0
    assert [(r["image"], r["report"]) for r in map(json.loads, out.read_text().splitlines())] == [
        (str(image), "No acute findings.")]


# ---------------------------------------------------------------- Ctrl-C

def test_an_interrupt_lost_in_a_callback_still_stops_the_command(capsys):
    """Ctrl-C landing in a callback Python cannot raise from (JAX's gc hook; a __del__ here) is printed as
    "Exception ignored" and lost; the command must still stop with one line."""

    class RaisesOnDelete:
        def __del__(self):
            raise KeyboardInterrupt

    def work():
        RaisesOnDelete()
        time.sleep(60)  # the re-raised interrupt ends this sleep
        return 0

    assert errors.report_errors("prog", work) == errors.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "prog: interrupted\n"
