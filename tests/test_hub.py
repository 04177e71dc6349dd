"""Hugging Face Hub ids wherever a model is taken, resolved offline from a cache laid out as `huggingface_hub` lays
it out (tests run with HF_HUB_OFFLINE=1, conftest.py), holding the tiny release-layout model."""

import socket
import types

import jax
import numpy as np
import pytest
from huggingface_hub import constants

from cxrllava_jax import cli, hub
from cxrllava_jax.errors import InputError
from cxrllava_jax.reference.tiny_models import hub_cache, release_dir, synthetic_radiograph

REPO = "cxrllava-test/tiny-release"
GREEDY = ["--temperature", "0", "--max-new-tokens", "10"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-cache")
    return root, hub_cache(root, REPO, release_dir())


@pytest.fixture
def offline_cache(cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache[0]))
    return cache[1]


def test_ids_and_revisions_resolve_to_the_cached_snapshot(offline_cache, tmp_path, monkeypatch):
    commit = offline_cache.name
    for reference in (REPO, f"{REPO}@main", f"{REPO}@{commit}"):
        assert hub.resolve(reference) == offline_cache
    assert hub.resolve(REPO, revision=commit) == offline_cache
    assert hub.hub_id(offline_cache) == REPO and hub.hub_id(release_dir()) is None
    monkeypatch.chdir(tmp_path)  # a local directory spelled like the id wins
    (tmp_path / REPO).mkdir(parents=True)
    assert hub.resolve(REPO).resolve() == (tmp_path / REPO).resolve()


def test_an_id_neither_cached_nor_reachable_is_one_clear_line(offline_cache, monkeypatch):
    with pytest.raises(InputError, match=r"^--checkpoint=nobody/nothing: not a local directory, not in the "
                                         r"Hugging Face cache \(.*\) and HF_HUB_OFFLINE is set; download it"):
        hub.resolve("nobody/nothing", what="--checkpoint")
    with socket.create_server(("127.0.0.1", 0)) as closed:  # a port nothing listens on once closed
        port = closed.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(InputError, match=rf"the Hub \(http://127.0.0.1:{port}\) cannot be reached"):
        hub.resolve("nobody/nothing")
    with pytest.raises(InputError, match="no such directory"):
        hub.resolve("workdirs/1a/model")  # a path, never sent to the Hub


def test_report_and_serve_take_the_id(offline_cache, model, tmp_path, monkeypatch, capsys):
    image = synthetic_radiograph(tmp_path / "cxr.png", seed=1)
    assert cli.main(["report", str(image), "--checkpoint", REPO, *GREEDY]) == 0
    report = model.write_radiologic_report(image, temperature=0.0, max_new_tokens=10)
    assert f"== {image} ==\n{report}\n" in capsys.readouterr().out
    assert cli.main(["report", str(image), "--checkpoint", "nobody/nothing"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nobody/nothing: not a local directory" in err, err

    import uvicorn

    from cxrllava_jax.serving import app as serving_app

    served = {}
    monkeypatch.setattr(serving_app, "create_app", lambda model, name, **_: served.update(model=model, name=name))
    monkeypatch.setattr(uvicorn, "Config", lambda app, **_: app)  # the command returns at once, serving nothing
    monkeypatch.setattr(uvicorn, "Server", lambda config: types.SimpleNamespace(run=lambda sockets: None))
    assert cli.main(["serve", "--checkpoint", REPO, "--port", "0"]) == 0
    assert served["name"] == "tiny-release"
    loaded, expected = (jax.tree.leaves(m.engine.params) for m in (served["model"], model))
    assert len(loaded) == len(expected) and all(np.array_equal(a, b) for a, b in zip(loaded, expected))
