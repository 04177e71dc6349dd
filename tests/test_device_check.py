"""`benchmarks/device_check.py --dry-run`: every part of the GPU check at tiny sizes on CPU, so the script cannot
rot between GPU runs. One run (its own process, as `make device-check-dry-run` starts it) feeds the tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import device_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-check") / "device.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "benchmarks/device_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    return run, json.loads(out.read_text())


def test_every_part_runs_and_passes(dry_run):
    run, result = dry_run
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (result["schema"], result["mode"]) == (device_check.SCHEMA, "dry-run")
    statuses = {name: part["status"] for name, part in result["parts"].items()}
    assert statuses == {name: ("measured" if name in ("device", "decode", "report", "train") else "passed")
                        for name in device_check.PARTS}, {n: p.get("error") for n, p in result["parts"].items()}


def test_the_json_holds_what_a_device_run_writes(dry_run):
    _, result = dry_run
    for name, keys in device_check.RESULT_KEYS.items():
        assert set(keys) <= set(result["parts"][name]["results"]), name
    decode = result["parts"]["decode"]["results"]["runs"]
    assert {(r["weights"], r["batch"]) for r in decode} == {(w, b) for w in ("bf16", "int8")
                                                            for b in device_check.DRY.decode_batches}
    assert all(r["ms_per_token"] > 0 and r["hbm_roofline_fraction"] > 0 for r in decode)
    assert all(r["mfu"] > 0 for r in result["parts"]["train"]["results"]["runs"])


def test_the_table_comes_last(dry_run):
    run, _ = dry_run
    lines = run.stdout.strip().splitlines()
    assert lines[-1].startswith("wrote ")
    assert [line.split()[0] for line in lines[-1 - len(device_check.PARTS):-1]] == list(device_check.PARTS)


def test_a_part_that_would_overrun_is_skipped_with_its_reason():
    check = device_check.Check(device_check.DRY, dry_run=True, budget_s=900.0)
    check.start -= 890.0  # the earlier parts took all but 10 s; training's budget is 150 s
    check.run("train", lambda c: pytest.fail("a part past the budget ran"))
    assert check.parts["train"]["status"] == "skipped"
    assert "would overrun" in check.parts["train"]["reason"]


def test_a_failing_part_is_recorded_and_the_next_one_runs():
    check = device_check.Check(device_check.DRY, dry_run=True, budget_s=100.0)
    check.run("device", lambda c: 1 / 0)
    check.run("kernels", lambda c: {"cases": {}, "checks": {"ok": True}})
    assert check.parts["device"]["status"] == "failed" and "ZeroDivisionError" in check.parts["device"]["error"]
    assert check.parts["kernels"]["status"] == "passed"
