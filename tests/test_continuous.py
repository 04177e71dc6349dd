"""Continuous batching (`inference.continuous`): prompts that join a running batch mid-decode, greedy or sampled,
write what `CXRLLaVA` writes for each of them alone; the batch grows and shrinks with the rows in use."""

import re

import numpy as np
import pytest

from cxrllava_jax.inference.continuous import RunningBatch, decode_rows, laid_out
from cxrllava_jax.inference.generate import SamplingOptions
from cxrllava_jax.reference.tiny_models import synthetic_radiograph
from tests.serving_fixtures import NIH_PNG, endless_tiny_model

QUESTIONS = ["Is there a pleural effusion?", "Describe the lungs.", "Any consolidation?", "Is the heart enlarged?",
             "What devices are present?"]


@pytest.fixture(scope="module")
def endless_model():
    return endless_tiny_model()


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """(turns, image, sampling): greedy and sampled, budgets of 6 to 21 tokens and a last one of 200, which needs
    more cache slots than the others (EOS never ends an answer)."""
    folder = tmp_path_factory.mktemp("images")
    images = [NIH_PNG] + [synthetic_radiograph(folder / f"cxr{i}.png", seed=i, size=128) for i in range(2)]
    budgets = [6, 11, 16, 21, 200]
    return [([{"role": "user", "content": q}], images[i % 3],
             SamplingOptions(temperature=0.0 if i % 2 == 0 else 0.8, top_p=0.9, seed=i, max_new_tokens=budgets[i]))
            for i, q in enumerate(QUESTIONS)]


def test_rows_that_join_mid_decode_write_what_they_write_alone(endless_model, requests):
    alone = [endless_model.chat(turns, image, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                                max_new_tokens=s.max_new_tokens) for turns, image, s in requests]
    batch = RunningBatch(endless_model.generator, max_rows=4, chunk=8)
    written = {i: [] for i in range(len(requests))}
    sizes = []

    def collect(results):
        for owner, tokens, _ in results:
            written[owner] += tokens
        sizes.append(len(batch.owners))

    def admit(owners):
        turns, images, samplings = zip(*(requests[i] for i in owners))
        collect(batch.admit(owners, [endless_model.encode(t) for t in turns],
                            np.stack([endless_model.preprocess(image) for image in images]),
                            [s.max_new_tokens for s in samplings], samplings))

    admit([0])
    collect(batch.run(3))
    admit([1, 2])  # join row 0 after its 4th token
    collect(batch.run(5))
    admit([3])  # row 0 has ended (6 tokens): its row is taken over
    collect(batch.run(8))
    slots = batch.length
    admit([4])  # joins rows 2 and 3, with more slots for all
    assert batch.length > slots and batch.in_use == 3
    while batch.in_use:
        collect(batch.run(8))
    assert [endless_model.decode(written[i]) for i in range(len(requests))] == alone
    assert [len(written[i]) for i in range(len(requests))] == [s.max_new_tokens for _, _, s in requests]
    assert max(sizes) == 4 and sizes[-1] == 0  # grown for the joiners, shrunk as they ended, dropped when idle


def test_a_released_row_stops_and_its_place_is_taken(endless_model, requests):
    batch = RunningBatch(endless_model.generator, max_rows=2, chunk=4)
    (turns, image, sampling), (turns2, image2, sampling2) = requests[0], requests[2]
    prompt = endless_model.encode(turns)
    pixels = endless_model.preprocess(image)[None]
    batch.admit(["gone"], [prompt], pixels, [400], [sampling])
    batch.run(4)
    batch.release("gone")
    assert batch.in_use == 0
    tokens = batch.admit(["next"], [endless_model.encode(turns2)], endless_model.preprocess(image2)[None], [5],
                         [sampling2])[0][1]
    while batch.in_use:
        tokens += batch.run(4)[0][1]
    assert endless_model.decode(tokens) == endless_model.chat(turns2, image2, temperature=0.0, max_new_tokens=5)


def test_a_decode_step_reads_every_layers_cache_where_it_lies(endless_model, requests):
    """A running batch of several rows keeps one cache array per layer, which a step attending over every slot
    (the batch's usual case) reads in place; the new keys and values are scattered into it in place. The check
    finds the copies a stacked cache costs: each layer sliced out. (One row keeps the stacked cache:
    `keeps_per_layer`.)"""
    batch = RunningBatch(endless_model.generator, max_rows=4, chunk=4)
    prompts = [endless_model.encode(turns) for turns, _, _ in requests[:4]]
    pixels = np.stack([endless_model.preprocess(image) for _, image, _ in requests[:4]])
    samplings = [sampling for _, _, sampling in requests[:4]]
    batch.admit(["a"], prompts[:1], pixels[:1], [8], samplings[:1])
    assert not isinstance(batch.rows.cache["k"], tuple)  # one row: stacked
    batch.admit(list("bcd"), prompts[1:], pixels[1:], [8] * 3, samplings[1:])
    config = endless_model.config.llama
    layer = (len(batch.owners), config.num_kv_heads, batch.length, config.kv_dim)

    def layer_reads(rows) -> list[str]:
        hlo = decode_rows.lower(batch.spec, batch.params, rows, np.int32(4), np.zeros(len(batch.owners), bool),
                                chunk=4).compile().as_text()
        shape = ",".join(map(str, layer))
        pattern = rf"= \w+\[(1,)?{shape}\]\S* (copy|slice|dynamic-slice|fusion)\("
        return [line.strip() for line in hlo.splitlines() if re.search(pattern, line) and "scatter" not in line]

    assert len(batch.rows.cache["k"]) == config.num_layers
    assert layer_reads(batch.rows) == []
    stacked = batch.rows.replace(cache=laid_out(batch.rows.cache, per_layer=False))
    assert len(layer_reads(stacked)) >= 2 * config.num_layers  # k and v of every layer, sliced out
