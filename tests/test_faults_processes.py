"""Fault cases where a separate process is the point: what a user sees on stderr (no traceback, one or two lines),
two processes writing one output, and SIGKILL at each write point of each command that writes. Processes of one
test run side by side to keep the suite fast."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cxrllava_jax.cli import COMMANDS
from cxrllava_jax.reference.tiny_models import release_dir, synthetic_radiograph
from tests.sigkill import kill_when

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
GREEDY = ["--temperature", "0", "--max-new-tokens", "2"]


def start(argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        process.kill()
    return process.returncode, out, err


def cxrllava(*args) -> list[str]:
    return ["-m", "cxrllava_jax.cli", *map(str, args)]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return synthetic_radiograph(tmp_path_factory.mktemp("img") / "cxr.png", seed=0)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "latin1.csv").write_bytes("Caf\xe9\n".encode("latin-1"))
    (root / "dup.jsonl").write_text('{"id": 1, "generated": "a", "reference": "b"}\n' * 2)
    (root / "a_file").write_text("x")
    return root


def test_every_command_reports_bad_input_without_a_traceback(bad_inputs, image, imported_checkpoint, tmp_path):
    """Each subcommand and entry point on a bad input: a non-zero exit and one or two lines on stderr naming the
    problem (nothing more at exit either); `--debug` brings the traceback back."""
    bad, missing = bad_inputs, tmp_path / "missing"
    cut = shutil.copytree(imported_checkpoint, tmp_path / "cut")
    for f in (cut / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[:100])
    cases = {
        "synth": (cxrllava("synth", "--out", bad / "a_file" / "data", "--num", 2), "a_file"),
        "refine": (cxrllava("refine", "--reports", missing, "--out", tmp_path / "o.csv"), "missing"),
        "label": (cxrllava("label", "--reports", bad / "latin1.csv", "--out", tmp_path / "l.csv"), "not UTF-8"),
        "reader-study": (cxrllava("reader-study", "export", "--predictions", bad / "dup.jsonl", "--sheet",
                                  tmp_path / "s.csv", "--key", tmp_path / "k.csv"), "repeats line 1"),
        "import-torch": (cxrllava("import-torch", "--src", missing, "--out", tmp_path / "i"), "no such directory"),
        "export-torch": (cxrllava("export-torch", "--checkpoint", missing, "--out", tmp_path / "e"),
                         "missing: no such directory"),
        "export-torch cut checkpoint": (cxrllava("export-torch", "--checkpoint", cut, "--out", tmp_path / "e2"),
                                        "cannot read the parameters"),
        "report": (cxrllava("report", image, "--checkpoint", missing), "missing: no such directory"),
        "ask": (cxrllava("ask", image, "Effusion?", "--checkpoint", missing), "missing: no such directory"),
        "chat": (cxrllava("chat", image, "--checkpoint", missing), "missing: no such directory"),
        "train.py unknown key": (["train.py", "--config=configs/demo.py:1a", f"--workdir={tmp_path / 't'}",
                                  "--config.no_such_key=1"], "no_such_key"),
        "train.py every_steps=0": (["train.py", "--config=configs/demo.py:1a", f"--workdir={tmp_path / 't'}",
                                    "--config.checkpoint.every_steps=0"], "config.checkpoint.every_steps=0"),
        "train.py workdir under a file": (["train.py", "--config=configs/demo.py:1a",
                                           f"--workdir={bad / 'a_file' / 'w'}"], "a_file"),
        "eval.py": (["eval.py", "--config=configs/eval_mimic.py", f"--predictions={bad / 'dup.jsonl'}",
                     f"--workdir={tmp_path / 'ev'}"], "repeats line 1"),
        "report --debug": (cxrllava("report", image, "--checkpoint", missing, "--debug"), "Traceback"),
    }
    # A subcommand added later gets at least its usage error checked.
    cases.update({name: (cxrllava(name, "--no-such-flag"), "usage") for name in COMMANDS if name not in cases})
    running = {name: start(argv) for name, (argv, _) in cases.items()}
    for name, process in running.items():
        status, _, err = finish(process)
        assert status != 0 and cases[name][1] in err, f"{name}: exit {status}\n{err}"
        if name.endswith("--debug"):
            continue
        lines = err.strip().splitlines()
        assert "Traceback" not in err, f"{name}:\n{err}"
        # Ours are one or two lines; argparse's are its usage (however many lines it wraps to), then one error line.
        usage = lines[0].startswith("usage:") and ": error: " in lines[-1]
        assert 1 <= len(lines) <= 2 or usage, f"{name}:\n{err}"
    assert not (tmp_path / "t").exists() and not (tmp_path / "ev").exists()  # refused before anything was written


def test_report_killed_then_resumed_by_two_processes_records_every_image_once(imported_checkpoint, image, tmp_path):
    """`report --jsonl` killed half way, then resumed by two processes sharing the file: every image has exactly one
    record, each line whole JSON, and the file's earlier records are kept (those written before the kill are
    skipped, and neither resumer writes what the other wrote meanwhile)."""
    images = [shutil.copy(image, tmp_path / f"cxr{i:02d}.png") for i in range(24)]
    out = tmp_path / "reports.jsonl"
    out.write_text('{"image": "earlier.png", "report": "kept"}\n')
    argv = cxrllava("report", *images, "--checkpoint", imported_checkpoint, "--jsonl", out, "--batch-size", 1,
                    "--temperature", "0", "--max-new-tokens", 8)
    kill_when(start([*argv, "--append"]), lambda: out.read_bytes().count(b"\n") >= 4, "3 records written")
    resumers = [start([*argv, "--resume"]) for _ in range(2)]
    for resumer in resumers:
        status, _, err = finish(resumer)
        assert status == 0 and "of 24 images already have a record" in err, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0] == {"image": "earlier.png", "report": "kept"}
    assert sorted(r["image"] for r in records[1:]) == sorted(map(str, images)) and all("report" in r for r in records)


@pytest.fixture(scope="module")
def earlier_outputs(tmp_path_factory, imported_checkpoint, image):
    """Inputs, and outputs of an earlier run of each writing command, to kill a second run over."""
    root = tmp_path_factory.mktemp("earlier")
    (root / "reports.csv").write_text("No effusion.\nMild cardiomegaly.\n")
    records = [{"id": str(i), "image": str(image), "generated": "No effusion.", "reference": "Small effusion."}
               for i in range(3)]
    (root / "pred.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name in ("labels.csv", "refined.csv", "sheet.csv", "key.csv"):
        (root / name).write_text(f"earlier {name}\n")
    for workdir in ("eval1", "eval5", "eval_swap"):
        (root / workdir).mkdir()
        (root / workdir / "results.json").write_text('{"earlier": true}\n')
    (root / "reports.jsonl").write_text('{"image": "earlier.png", "report": "kept"}\n')
    (root / "replaced.jsonl").write_text("".join(f'{{"image": "earlier{i}.png", "report": "kept"}}\n' for i in range(56)))
    (root / "synth").mkdir()
    (root / "synth" / "mimic-cxr-2.0.0-split.csv").write_text("earlier split\n")
    return root


def test_sigkill_at_each_write_point_keeps_earlier_outputs(earlier_outputs, imported_checkpoint, image, tmp_path):
    """A kill (an OOM, a pre-emption) at any write point leaves every earlier output whole: files are renamed
    into place only when complete, records are appended whole, sets of outputs (a dataset, an evaluation, an
    export) take their place only when complete, and --overwrite keeps the old output until the new one exists."""
    r = earlier_outputs
    kill = lambda point, n, *argv: ["tests/kill_at_write.py", point, str(n), *map(str, argv)]  # noqa: E731
    cases = {
        "label": (kill("replace", 1, "cxrllava", "label", "--reports", r / "reports.csv", "--out", r / "labels.csv",
                       "--overwrite"), ["labels.csv"]),
        "refine": (kill("replace", 1, "cxrllava", "refine", "--reports", r / "reports.csv", "--out",
                        r / "refined.csv", "--overwrite"), ["refined.csv"]),
        "reader-study export": (kill("replace", 1, "cxrllava", "reader-study", "export", "--predictions",
                                     r / "pred.jsonl", "--sheet", r / "sheet.csv", "--key", r / "key.csv",
                                     "--overwrite"), ["sheet.csv", "key.csv"]),
        "eval.py first file": (kill("replace", 1, "eval.py", "--config=configs/eval_mimic.py",
                                    f"--predictions={r / 'pred.jsonl'}", f"--workdir={r / 'eval1'}", "--overwrite",
                                    "--config.bootstrap_samples=10"), ["eval1/results.json"]),
        "eval.py results.json": (kill("replace", 6, "eval.py", "--config=configs/eval_mimic.py",
                                      f"--predictions={r / 'pred.jsonl'}", f"--workdir={r / 'eval5'}", "--overwrite",
                                      "--config.bootstrap_samples=10"), ["eval5/results.json"]),
        "eval.py swap": (kill("swap", 1, "eval.py", "--config=configs/eval_mimic.py",
                              f"--predictions={r / 'pred.jsonl'}", f"--workdir={r / 'eval_swap'}", "--overwrite",
                              "--config.bootstrap_samples=10"), ["eval_swap/results.json"]),
        "report --overwrite": (kill("append", 2, "cxrllava", "report", image, image, "--checkpoint",
                                    imported_checkpoint, "--jsonl", r / "replaced.jsonl", "--overwrite",
                                    "--batch-size", 1, *GREEDY), ["replaced.jsonl"]),
        "synth --overwrite": (kill("swap", 1, "cxrllava", "synth", "--out", r / "synth", "--num", 2, "--image-size",
                                   32, "--overwrite"), ["synth/mimic-cxr-2.0.0-split.csv"]),
        "report --append": (kill("append", 2, "cxrllava", "report", image, image, "--checkpoint", imported_checkpoint,
                                 "--jsonl", r / "reports.jsonl", "--append", "--batch-size", 1, *GREEDY),
                            []),
        "export-torch": (kill("swap", 1, "cxrllava", "export-torch", "--checkpoint", imported_checkpoint,
                              "--out", tmp_path / "export", "--dtype", "float32"), []),
        "import-torch": (kill("swap", 1, "cxrllava", "import-torch", "--src", release_dir(), "--out",
                              tmp_path / "imported"), []),
    }
    before = {name: (r / name).read_bytes() for _, kept in cases.values() for name in kept}
    running = {name: start(argv) for name, (argv, _) in cases.items()}
    for name, process in running.items():
        status, _, err = finish(process)
        assert status == -signal.SIGKILL, f"{name} was not killed at its write point: exit {status}\n{err}"
        for kept in cases[name][1]:
            assert (r / kept).read_bytes() == before[kept], f"{name} damaged {kept}"
    lines = (r / "reports.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"image": "earlier.png", "report": "kept"}
    assert len(lines) == 2 and "report" in json.loads(lines[1])  # the first new record whole, the second never begun
    assert not (tmp_path / "export").exists() and not (tmp_path / "imported").exists()
    for workdir in ("eval1", "eval5", "eval_swap"):  # no new label files beside the old results
        assert [p.name for p in (r / workdir).iterdir()] == ["results.json"], workdir
    assert [p.name for p in (r / "synth").iterdir()] == ["mimic-cxr-2.0.0-split.csv"]



PREFETCH_SCRIPT = '''
import os, signal, sys, time
from cxrllava_jax.inference import prefetch

def worker_pid(item):
    return os.getpid()

if __name__ == "__main__":
    items = prefetch.ahead(worker_pid, range(3), workers=1, window=1)
    print(next(items)[1](), flush=True)
    try:
        os.killpg(0, signal.SIGINT)  # Ctrl-C: the terminal interrupts the whole process group
        time.sleep(30)
    except KeyboardInterrupt:
        pass
    time.sleep(0.5)  # time for an interrupted worker to print its traceback
    os.kill(os.getpid(), signal.SIGKILL)  # the command dies without shutting its pool down
'''


def test_prefetch_workers_leave_interrupts_to_the_command_and_end_with_it(tmp_path):
    """A Ctrl-C prints no worker's traceback, and a worker whose command was killed ends instead of waiting forever
    for work (`prefetch._worker_started`)."""
    (tmp_path / "script.py").write_text(PREFETCH_SCRIPT)
    code, out, err = finish(start([str(tmp_path / "script.py")], start_new_session=True), timeout=60)
    assert code == -signal.SIGKILL and "Traceback" not in err, err
    worker = int(out.split()[0])
    for _ in range(100):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        subprocess.run(["sleep", "0.1"])
    pytest.fail(f"the prefetch worker {worker} outlived its command")


def test_prefetch_skips_an_input_that_kills_its_worker():
    """A file whose decoding kills its worker process is an InputError naming it; those before and after it (on
    their way in the same pool) are still worked on, and a work's own error reaches the caller as it was."""
    from cxrllava_jax.errors import InputError
    from cxrllava_jax.inference import prefetch
    from tests.prefetch_work import dies_on_crash

    got = []
    for index, outcome in prefetch.ahead(dies_on_crash, ["a", "crash", "b", "bad", "c"], workers=2, window=3):
        try:
            got.append((index, outcome()))
        except InputError as error:
            got.append((index, str(error)))
    assert got == [(0, "A"), (1, "crash: reading it ended its worker process abruptly (killed by the system, e.g. for "
                               "memory, or a crash in an image decoder)"), (2, "B"), (3, "bad: not an image"), (4, "C")]
