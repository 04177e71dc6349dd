"""The inference engine (`inference.engine`): a request's tokens depend only on the request, whatever joins or
shares its batch (greedy and sampled); rows join mid-decode and leave when they end; the running batch's cache is
read where it lies; finished prefixes and image features are reused, with the output of a cold run."""

import dataclasses
import gc
import re
import weakref

import numpy as np
import pytest

from cxrllava_jax.inference.engine import EngineImage, Request, SamplingOptions, decode_rows, laid_out
from cxrllava_jax.inference.prefix_cache import PrefixCache
from cxrllava_jax.reference.tiny_models import synthetic_radiograph
from tests.serving_fixtures import NIH_PNG, endless_tiny_model

QUESTIONS = ["Is there a pleural effusion?", "Describe the lungs.", "Any consolidation?", "Is the heart enlarged?",
             "What devices are present?"]


@pytest.fixture(scope="module")
def endless_model():
    return endless_tiny_model()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return [NIH_PNG] + [synthetic_radiograph(folder / f"cxr{i}.png", seed=i, size=128) for i in range(3)]


@pytest.fixture(scope="module")
def requests(endless_model, images):
    """Requests with EOS never ending them: greedy and sampled, budgets of 6 to 21 tokens and a last one of 200,
    which needs more cache slots than the others."""
    budgets = [6, 11, 16, 21, 200]
    return [_request(endless_model, [{"role": "user", "content": q}], images[i % 3],
                     SamplingOptions(temperature=0.0 if i % 2 == 0 else 0.8, top_p=0.9, seed=i,
                                     max_new_tokens=budgets[i]))
            for i, q in enumerate(QUESTIONS)]


def _request(model, turns, image, sampling: SamplingOptions) -> Request:
    return Request(model.encode(turns), (EngineImage.of(model.preprocess(image)),), sampling)


def _alone(model, request: Request) -> list[int]:
    return model.engine.sibling(cache_bytes=0).complete([request])[0].tokens


def test_rows_that_join_mid_decode_write_what_they_write_alone(endless_model, requests):
    alone = [_alone(endless_model, r) for r in requests]
    engine = endless_model.engine.sibling(max_rows=4, cache_bytes=0)
    handles, sizes = {}, []

    def admit(*numbers, steps):
        for i in numbers:
            handles[i] = engine.submit(requests[i])
        engine.step(steps=steps)
        sizes.append(len(engine.owners))

    admit(0, steps=3)
    admit(1, 2, steps=5)  # join row 0 after its 4th token
    admit(3, steps=8)  # row 0 has ended (6 tokens): its row is taken over
    slots = engine.length
    admit(4, steps=0)  # joins rows 2 and 3, with more slots for all
    assert engine.length > slots and engine.counts["running"] == 3
    while engine.counts["running"]:
        engine.step(steps=8)
        sizes.append(len(engine.owners))
    assert [handles[i].completion.tokens for i in range(len(requests))] == alone
    assert [len(t) for t in alone] == [r.sampling.max_new_tokens for r in requests]
    assert max(sizes) == 4 and sizes[-1] == 0  # grown for the joiners, shrunk as they ended, dropped when idle


@pytest.mark.parametrize("others", [0, 3, 15])
def test_a_request_writes_the_same_whatever_shares_its_batch(endless_model, requests, images, others):
    """The same sampled request alone and beside 3 or 15 others (other prompts, images, budgets and settings,
    joining at once and later): the same tokens."""
    target = requests[1]  # sampled, 11 tokens
    crowd = [_request(endless_model, [{"role": "user", "content": QUESTIONS[i % 5] + " " * (i % 4)}],
                      images[i % 4], SamplingOptions(temperature=(i % 3) * 0.5, seed=100 + i,
                                                     max_new_tokens=5 + 3 * i))
             for i in range(others)]
    engine = endless_model.engine.sibling(max_rows=16, cache_bytes=0)
    first = [engine.submit(r) for r in crowd[:others // 2]]
    engine.step(steps=2)
    mine = engine.submit(target)
    rest = [engine.submit(r) for r in crowd[others // 2:]]
    while engine.counts["running"] or engine.stats()["waiting"]:
        engine.step(steps=4)
    assert all(h.done for h in first + rest)
    assert mine.completion.tokens == _alone(endless_model, target)
    assert len(mine.completion.tokens) == target.sampling.max_new_tokens


def test_a_cancelled_row_stops_and_its_place_is_taken(endless_model, requests):
    engine = endless_model.engine.sibling(max_rows=2, cache_bytes=0)
    gone = engine.submit(Request(requests[0].prompt, requests[0].images,
                                 SamplingOptions(temperature=0.0, max_new_tokens=400)))
    engine.step(steps=4)
    engine.cancel(gone)
    nxt = engine.submit(requests[2])
    engine.step(steps=4)
    assert engine.counts["abandoned_rows"] == 1 and not gone.done
    while engine.counts["running"]:
        engine.step(steps=4)
    assert nxt.completion.tokens == _alone(endless_model, requests[2])


def test_a_decode_step_reads_every_layers_cache_where_it_lies(endless_model, requests):
    """A running batch of several rows keeps one cache array per layer, which a step attending over every slot
    (the batch's usual case) reads in place; the new keys and values are scattered into it in place. The check
    finds the copies a stacked cache costs: each layer sliced out. (One row keeps the stacked cache:
    `keeps_per_layer`.)"""
    engine = endless_model.engine.sibling(max_rows=4, cache_bytes=0)
    engine.submit(requests[4])
    engine.step(steps=1)
    assert not isinstance(engine.rows.cache["k"], tuple)  # one row: stacked
    for r in requests[1:4]:
        engine.submit(r)
    engine.step(steps=1)
    config = endless_model.config.llama
    layer = (len(engine.owners), config.num_kv_heads, engine.length, config.resolved_head_dim)

    def layer_reads(rows) -> list[str]:
        hlo = decode_rows.lower(engine.spec, engine.params, rows, np.int32(4), np.zeros(len(engine.owners), bool),
                                chunk=4).compile().as_text()
        shape = ",".join(map(str, layer))
        pattern = rf"= \w+\[(1,)?{shape}\]\S* (copy|slice|dynamic-slice|fusion)\("
        return [line.strip() for line in hlo.splitlines() if re.search(pattern, line) and "scatter" not in line]

    assert len(engine.rows.cache["k"]) == config.num_layers
    assert layer_reads(engine.rows) == []
    stacked = engine.rows.replace(cache=laid_out(engine.rows.cache, per_layer=False))
    assert len(layer_reads(stacked)) >= 2 * config.num_layers  # k and v of every layer, sliced out


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_follow_up_prefills_only_what_is_new_and_answers_as_a_cold_run(endless_model, images, temperature):
    """A report, then a question about it (the conversation resent whole, as `chat` and OpenAI clients do), then
    a second question on the same image: each reuses what the one before computed, and writes what a run with
    no cache writes."""
    options = dict(temperature=temperature, seed=4, max_new_tokens=12)
    warm = endless_model.engine.sibling()
    cold = endless_model.engine.sibling(cache_bytes=0)
    report = [{"role": "user", "content": "Write the radiologic report."}]

    def answer(engine, turns):
        endless_model.engine = engine
        return next(endless_model.iter_generate([turns], [images[3]], **options))[1]

    engine_before = endless_model.engine
    try:
        first = answer(warm, report)
        assert first.completion.cached_tokens == 0 and first.text == answer(cold, report).text
        follow_up = report + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Any effusion?"}]
        second = answer(warm, follow_up)
        assert second.completion.cached_tokens >= len(endless_model.encode(report))  # the image and the report
        assert second.text == answer(cold, follow_up).text
        other = [{"role": "user", "content": "Is the heart enlarged?"}]
        third = answer(warm, other)  # a new question on the same image: the system prompt and the image
        places = endless_model.config.num_image_tokens
        assert third.completion.cached_tokens > places and third.text == answer(cold, other).text
        terse = [{"role": "system", "content": "You are terse."}] + other  # another prefix: the image's features
        assert answer(warm, terse).text == answer(cold, terse).text and warm.stats()["image_hits"] == 1
    finally:
        endless_model.engine = engine_before


def test_a_conversation_keeps_its_answers_ids_and_prefills_only_each_new_question(endless_model, images):
    """`CXRLLaVA.conversation` (what `cxrllava chat` runs): the third turn's prompt is the second's, the answer's
    ids as written and its EOS, then the new question; the cache holds all of it but the tokens not yet fed (EOS,
    and an answer's last token when its budget ended it), and the third answer is a cold run's."""
    options = dict(temperature=0.8, seed=3, max_new_tokens=8)
    engine_before = endless_model.engine
    endless_model.engine = endless_model.engine.sibling()
    try:
        conversation = endless_model.conversation(images[3])
        for question in ("Write the radiologic report.", "Any effusion?", "Which side?"):
            kept = conversation.ids
            prompt = endless_model.encode(conversation.turns + [{"role": "user", "content": question}],
                                          conversation.study, kept)
            conversation.ask(question, **options)
            answer = conversation.last.completion
            if kept is not None:
                assert np.array_equal(prompt[:len(kept)], kept) and kept[-1] == endless_model.engine.spec.eos_id
                new = len(prompt) - len(kept)
                assert answer.prompt_tokens - answer.cached_tokens == new + 1 + (answer.finish_reason == "length")
        assert [t["role"] for t in conversation.turns] == ["user", "assistant"] * 3
        cold = _alone(endless_model, Request(prompt, conversation.images, SamplingOptions(**options)))
        assert answer.tokens == cold and len(cold) == 8
    finally:
        endless_model.engine = engine_before


def test_the_cache_keeps_within_its_bound_evicting_the_least_recently_used():
    cache = PrefixCache(max_bytes=300)
    keys = [np.arange(n, dtype=np.int64) + 10 * i for i, n in enumerate([5, 6, 7])]
    for key in keys:
        cache.add_prefix(key, {"k": None}, 100)
    assert cache.longest(np.arange(4, dtype=np.int64))[0] == 4
    cache.use(cache.longest(keys[0])[1], 5)  # the first is used again: the second is now the oldest
    cache.add_features("image", object(), 100)
    assert cache.nbytes == 300 and cache.counts["evicted"] == 1
    assert cache.longest(keys[1])[0] == 0 and cache.longest(keys[0])[0] == 5 and cache.longest(keys[2])[0] == 7
    # A longer prefix replaces the entry it extends; an entry larger than the bound is not kept.
    cache.add_prefix(np.concatenate([keys[0], [99]]), {"k": None}, 100)
    assert len(cache) == 3 and cache.longest(np.concatenate([keys[0], [99, 1]]))[0] == 6
    cache.add_prefix(np.arange(3, dtype=np.int64), {"k": None}, 301)
    assert cache.nbytes == 300 and PrefixCache(0).nbytes == 0


def test_the_cache_holds_a_key_when_one_entry_holds_all_of_it_and_that_entry_is_used_last():
    cache = PrefixCache(max_bytes=200)
    first, second = np.arange(6, dtype=np.int64), np.arange(6, dtype=np.int64) + 100
    cache.add_prefix(first, {"k": None}, 100)
    cache.add_prefix(second, {"k": None}, 100)
    assert cache.holds(first) and cache.holds(first[:4])
    assert not cache.holds(np.concatenate([first, [7]])) and not cache.holds(np.array([0, 1, 9], np.int64))
    cache.add_features("image", object(), 100)  # the oldest goes: `second`, since holding `first` used it
    assert cache.holds(first) and not cache.holds(second)


def test_the_same_conversation_finished_again_is_kept_once(endless_model, requests):
    """A request answered a second time (a retry, a client resending it) finds every position it would keep
    already kept: the entry kept the first time stays (nothing is copied out again), and the answer is the first's.
    One that writes further is kept whole, replacing the entry it extends."""
    engine = endless_model.engine.sibling()

    def finish(request: Request):
        handle = engine.submit(request)
        while not handle.done:
            engine.step()
        # its prompt's key and the tokens fed back (it ends at its budget: its last token was not fed)
        return handle, np.concatenate([handle.key, handle.tokens[:-1]])

    first, key = finish(requests[0])
    entry = engine.cache.longest(key)[1]
    again, _ = finish(requests[0])
    assert again.tokens == first.tokens and again.cached_tokens == len(requests[0].prompt) - 1
    assert engine.cache.longest(key)[1] is entry and len(engine.cache) == 2  # the prefix and the image's features
    longer, longer_key = finish(dataclasses.replace(requests[0], sampling=dataclasses.replace(requests[0].sampling,
                                                                                                max_new_tokens=9)))
    assert longer.tokens[:len(first.tokens)] == first.tokens and len(longer_key) > len(key)
    assert engine.cache.holds(longer_key) and engine.cache.longest(key)[1] is not entry and len(engine.cache) == 2


def test_a_run_lets_go_of_each_request_as_it_ends(endless_model, requests):
    """Over an archive of thousands of images, `run` holds only the requests in flight: a finished request (its
    prompt, its images' pixels, its tokens) is not kept until the run ends (at most the last one taken, which
    Python's `enumerate` holds on to)."""
    engine = endless_model.engine.sibling(max_rows=4, cache_bytes=0)
    kept = []

    def one_by_one():
        for request in requests[:4]:
            image = dataclasses.replace(request.images[0])  # held by this generator and the engine alone
            kept.append(weakref.ref(image))
            yield dataclasses.replace(request, images=(image,))

    for index, _ in engine.run(one_by_one(), max_rows=2):
        gc.collect()
        assert all(ref() is None for ref in kept[:max(index - 1, 0)]), index
