"""`cxrllava serve` on the tiny model, through the official `openai` client and plain HTTP: answers equal the
library's for the same request, streaming, batching, the queue bound, disconnects, and every bad input refused
with a 4xx that names the problem while the server keeps serving."""

import io
import json
import re
import subprocess
import sys
import threading

import numpy as np
import openai
import pytest
from PIL import Image

from cxrllava_jax.domain.images import load_grayscale
from cxrllava_jax.inference.engine import SamplingOptions
from cxrllava_jax.serving.app import create_app
from cxrllava_jax.serving.limits import MIB, Limits
from cxrllava_jax.serving.scheduler import Job
from cxrllava_jax.reference.tiny_models import checkpoint_dir, synthetic_radiograph
from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.studies import Study, studies_in_folder
from cxrllava_jax.serving import requests
from tests.dicom_files import write_dicom, write_two_studies
from tests.serving_fixtures import (NIH_PNG, NON_CHEST_DICOM, LiveServer, data_url, endless_tiny_model, image_message,
                              multipart)

KEY = "test-key-0123456789"
MODEL_ID = "cxr-llava-tiny"
LIMITS = Limits(max_image_bytes=1 * MIB, max_image_pixels=4_000_000, max_output_tokens=400)
GREEDY = dict(temperature=0.0, max_tokens=10)
QUESTION = "Is there a pleural effusion?"


@pytest.fixture(scope="module")
def server(model):
    live = LiveServer(create_app(model, MODEL_ID, limits=LIMITS, api_key=KEY, max_batch_size=8, max_queue=4))
    yield live
    live.close()


@pytest.fixture(scope="module")
def endless_model():
    return endless_tiny_model()


@pytest.fixture(scope="module")
def endless_server(endless_model):
    live = LiveServer(create_app(endless_model, MODEL_ID, limits=LIMITS))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    dicom = write_dicom(folder / "cxr.dcm", np.asarray(load_grayscale(NIH_PNG), np.uint16) * 16, bits_stored=12,
                        BodyPartExamined="CHEST", ViewPosition="PA")
    return [NIH_PNG, synthetic_radiograph(folder / "drawn.png", seed=1), dicom]


def _library(model, turns, image, max_tokens):
    return model.chat(turns, image, temperature=0.0, max_new_tokens=max_tokens)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    status, health = server.request("GET", "/health")  # no key needed: it says nothing about requests
    assert status == 200 and health["status"] == "ok" and health["model"] == MODEL_ID
    assert {"waiting", "running", "programs_compiled", "programs_loaded", "program_seconds"} <= health.keys()


def test_health_counts_the_programs_the_process_compiles():
    """What /health's program counts rest on: a new program is compiled (or loaded from the persistent cache)
    once; running it again adds nothing."""
    import jax

    from cxrllava_jax.serving import compiles

    def programs():
        stats = compiles.counter().stats()
        return stats["programs_compiled"] + stats["programs_loaded"]

    before = programs()
    triple = jax.jit(lambda x: x * 3 + 1)
    triple(np.arange(11, dtype=np.int32)).block_until_ready()
    once = programs()
    triple(np.arange(11, dtype=np.int32)).block_until_ready()
    assert once == before + 1 and programs() == once


def test_image_chat_equals_the_library(model, client, images):
    for image in images:
        follow_up = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "No."},
                     {"role": "user", "content": "Is the heart enlarged?"}]
        for turns in ([{"role": "user", "content": QUESTION}], follow_up):
            messages = [image_message(turns[0]["content"], data_url(image))] + turns[1:]
            reply = client.chat.completions.create(model=MODEL_ID, messages=messages, **GREEDY)
            choice = reply.choices[0]
            assert choice.message.content == _library(model, turns, image, GREEDY["max_tokens"])
            assert reply.usage.prompt_tokens == len(model.encode(turns))
            assert choice.finish_reason == ("length" if reply.usage.completion_tokens == 10 else "stop")


def test_system_prompt_and_sampling_options_reach_the_model(model, client, images):
    turns = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTION}]
    messages = [turns[0], image_message(QUESTION, data_url(images[0]))]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, **GREEDY)
    assert reply.choices[0].message.content == _library(model, turns, images[0], GREEDY["max_tokens"])
    sampled = dict(temperature=0.9, top_p=0.95, seed=7, max_tokens=10)
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, **sampled)
    expected = model.chat(turns, images[0], temperature=0.9, top_p=0.95, seed=7, max_new_tokens=10)
    assert reply.choices[0].message.content == expected


def test_streaming_sends_the_answer_in_pieces(endless_model, endless_server, images):
    client = openai.OpenAI(base_url=f"{endless_server.url}/v1", api_key="unused", max_retries=0)
    turns = [{"role": "user", "content": QUESTION}]
    messages = [image_message(QUESTION, data_url(images[1]))]
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, stream=True, temperature=0,
                                                 max_tokens=24, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == _library(endless_model, turns, images[1], 24)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_answer_endpoints_take_an_uploaded_file(model, server):
    body, content_type = multipart({"temperature": "0", "max_tokens": "10"},
                                   {"file": ("cxr.png", NIH_PNG.read_bytes())})
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {KEY}"}
    status, reply = server.request("POST", "/v1/report", body, headers)
    assert status == 200, reply
    assert reply["report"] == model.write_radiologic_report(NIH_PNG, temperature=0.0, max_new_tokens=10)
    status, reply = server.request("POST", "/v1/differential-diagnosis", body, headers)
    assert status == 200, reply
    assert reply["differential_diagnosis"] == model.write_differential_diagnosis(NIH_PNG, temperature=0.0,
                                                                                 max_new_tokens=10)


def test_preview_is_the_image_the_loader_decodes(server, images):
    dicom = images[2]
    status, png = server.request("POST", "/v1/preview?filename=cxr.dcm", dicom.read_bytes(),
                                 {"Authorization": f"Bearer {KEY}"})
    assert status == 200
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(load_grayscale(dicom)))


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _bad_requests():
    """(what, request body or None for the good request with `change`, headers, status, message pattern)."""
    good = {"model": MODEL_ID, "messages": [image_message(QUESTION, data_url(NIH_PNG))], **GREEDY}

    def with_image(url):
        return {**good, "messages": [image_message(QUESTION, url)]}

    noise = np.random.default_rng(0).integers(0, 256, (1200, 1200), dtype=np.uint8)
    return [
        ("corrupt image", with_image(data_url(NIH_PNG.read_bytes()[:2000], "image/png")), None, 400,
         r"messages\[0\]\.content\[1\]\.image_url: .*cannot decode image"),
        ("non-image", with_image(data_url(b"%PDF-1.4 a report, not a radiograph", "application/pdf")), None, 400,
         r"messages\[0\]\.content\[1\]\.image_url: unsupported media type 'application/pdf'"),
        ("text sent as a PNG", with_image(data_url(b"just some text, not pixels" * 10, "image/png")), None, 400,
         r"cannot decode image"),
        ("remote URL", with_image("https://example.org/cxr.png"), None, 400, r"expected a base64 data: URL"),
        ("oversize bytes", with_image(data_url(_png(noise), "image/png")), None, 413,
         r"larger than the server's limit of 1,048,576 bytes"),
        ("oversize pixels", with_image(data_url(_png(np.zeros((2100, 2100), np.uint8)), "image/png")), None, 413,
         r"4,410,000 pixels; the server accepts at most 4,000,000"),
        ("refused DICOM", with_image(data_url(NON_CHEST_DICOM)), None, 400, r"BodyPartExamined"),
        ("bad JSON", b'{"model": "cxr-llava-tiny", "messages": [', None, 400, r"not valid JSON"),
        ("unknown model", {**good, "model": "gpt-4o"}, None, 404,
         r"model 'gpt-4o' does not exist; this server serves 'cxr-llava-tiny'"),
        ("missing API key", good, {}, 401, r"missing API key"),
        ("wrong API key", good, {"Authorization": "Bearer not-the-key"}, 401, r"wrong API key"),
        ("no image", {**good, "messages": [{"role": "user", "content": QUESTION}]}, None, 400,
         r"holds no image"),
        ("too many tokens asked", {**good, "max_tokens": 100_000}, None, 400, r"max_tokens=100000 is more than .* 400"),
        ("bad temperature", {**good, "temperature": "hot"}, None, 400, r"temperature must be a number"),
        ("several answers", {**good, "n": 3}, None, 400, r"n=3 is not supported"),
        ("prompt past the context", {**good, "messages": [image_message("effusion " * 600, data_url(NIH_PNG))]},
         None, 400, r"tokens \(16 of them image positions\).*context is 512"),
        ("roles out of order", {**good, "messages": good["messages"] + [{"role": "user", "content": "and?"}]}, None,
         400, r"alternates user/assistant"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda case: case[0])
def test_bad_input_is_a_4xx_naming_the_problem(server, client, case):
    _, body, headers, status, pattern = case
    headers = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, reply = server.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json", **headers})
    assert got == status, reply
    assert re.search(pattern, reply["error"]["message"]), reply["error"]["message"]
    # ... and the server keeps serving.
    good = client.chat.completions.create(model=MODEL_ID, messages=[image_message(QUESTION, data_url(NIH_PNG))],
                                          temperature=0, max_tokens=2)
    assert good.choices[0].finish_reason == ("length" if good.usage.completion_tokens == 2 else "stop")


def test_bad_uploads_are_4xx_naming_the_problem(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    body, content_type = multipart({"max_tokens": "4"}, {})
    status, reply = server.request("POST", "/v1/report", body, {"Content-Type": content_type, **auth})
    assert status == 400 and "no 'file' field" in reply["error"]["message"]
    body, content_type = multipart({"beams": "4"}, {"file": ("cxr.png", NIH_PNG.read_bytes())})
    status, reply = server.request("POST", "/v1/report", body, {"Content-Type": content_type, **auth})
    assert status == 400 and "unknown form field 'beams'" in reply["error"]["message"]
    status, reply = server.request("POST", "/v1/report", NIH_PNG.read_bytes(), {"Content-Type": "image/png", **auth})
    assert status == 400 and "multipart/form-data" in reply["error"]["message"]
    status, reply = server.request("POST", "/v1/preview?filename=notes.txt", b"plain text", auth)
    assert status == 400 and "notes.txt: cannot decode image" in reply["error"]["message"]
    status, reply = server.request("GET", "/v1/nothing-here")
    assert status == 404 and "/v1/nothing-here" in reply["error"]["message"]


def _blocking_job(model, image) -> tuple[Job, threading.Event, threading.Event]:
    """A job whose first event blocks the worker thread until released: the scheduler stays busy for as long as
    a test needs, whatever the model writes."""
    entered, release = threading.Event(), threading.Event()

    def sink(event):
        entered.set()
        release.wait(timeout=120)

    turns = [{"role": "user", "content": QUESTION}]
    return Job(model.encode(turns), model.preprocess(image)[None], SamplingOptions(temperature=0.0, max_new_tokens=4),
               sink), entered, release


def test_waiting_requests_form_one_batch_and_a_full_queue_answers_503(model, server, images):
    blocker, entered, release = _blocking_job(model, images[0])
    server.scheduler.submit(blocker)
    assert entered.wait(timeout=120)
    questions = [QUESTION, "Is the heart enlarged?", "Any pneumothorax?", "Describe the lungs."]
    replies = [None] * len(questions)

    def ask(i):
        replies[i] = server.post_json("/v1/chat/completions", {
            "model": MODEL_ID, "messages": [image_message(questions[i], data_url(images[i % 3]))], **GREEDY}, KEY)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions) - 1)]
    for thread in threads:
        thread.start()
    server.wait_for(lambda s: s["waiting"] == 3)
    # A streamed request takes the last place and hangs up while waiting: its place is free again.
    conn, _ = server.open_stream({"model": MODEL_ID, "messages": [image_message(QUESTION, data_url(NIH_PNG))]}, KEY)
    server.wait_for(lambda s: s["waiting"] == 4)
    status, reply = server.post_json("/v1/chat/completions", {
        "model": MODEL_ID, "messages": [image_message(QUESTION, data_url(NIH_PNG))], **GREEDY}, KEY)
    assert status == 503 and "busy" in reply["error"]["message"]
    conn.close()
    server.wait_for(lambda s: s["waiting"] == 3)
    threads.append(threading.Thread(target=ask, args=(len(questions) - 1,)))
    threads[-1].start()
    server.wait_for(lambda s: s["waiting"] == 4)
    before = server.scheduler.stats()
    release.set()
    for thread in threads:
        thread.join(timeout=120)
    after = server.scheduler.stats()
    assert (after["batches"] - before["batches"], after["rows"] - before["rows"]) == (1, 4)
    for i, (status, reply) in enumerate(replies):
        assert status == 200, reply
        expected = _library(model, [{"role": "user", "content": questions[i]}], images[i % 3], GREEDY["max_tokens"])
        assert reply["choices"][0]["message"]["content"] == expected


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(endless_model, endless_server, images):
    before = endless_server.scheduler.stats()
    request = {"model": MODEL_ID, "messages": [image_message(QUESTION, data_url(images[0]))], "temperature": 0,
               "max_tokens": 400}
    conn, response = endless_server.open_stream(request)
    contents = 0
    while contents < 2:  # two chunks of the answer have arrived: it is being written
        line = response.readline()
        assert line, "the stream ended early"
        contents += line.startswith(b"data: {") and b'"content": "' in line and b'"content": ""' not in line
    conn.close()
    endless_server.wait_for(lambda s: s["running"] == 0)
    after = endless_server.scheduler.stats()
    # EOS never ends these answers: only the hang-up can have stopped the batch before its 400 tokens.
    assert after["abandoned_rows"] - before["abandoned_rows"] == 1
    status, reply = endless_server.post_json("/v1/chat/completions", {**request, "max_tokens": 3})
    assert status == 200 and reply["usage"]["completion_tokens"] == 3


def test_the_serve_command(tmp_path):
    """`cxrllava serve` binds to localhost, asks for the key from --api-key-file, and refuses bad set-ups."""
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n")
    command = [sys.executable, "-m", "cxrllava_jax.cli", "serve", "--checkpoint", str(checkpoint_dir()), "--port",
               "0", "--api-key-file", str(key_file)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        match = re.search(r"model 'checkpoint' at http://127\.0\.0\.1:(\d+)/", line)
        assert match, line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{match[1]}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == ["checkpoint"]
        with pytest.raises(openai.AuthenticationError, match="wrong API key"):
            openai.OpenAI(base_url=client.base_url, api_key="guess", max_retries=0).models.list()
    finally:
        process.terminate()
        process.wait(timeout=60)
    key_file.write_text("\n")
    for args, message in [(["--api-key-file", str(key_file)], "the API key file is empty"),
                          (["--api-key-file", str(tmp_path / "none")], "No such file"),
                          (["--checkpoint", str(tmp_path)], "neither a cxrllava-jax checkpoint"),
                          (["--max-batch-size", "0"], "--max-batch-size 0: must be >= 1")]:
        # --port 0 here too: the suite must pass where something else listens on the default port 8000.
        run = subprocess.run(command[:4] + ["--checkpoint", str(checkpoint_dir()), "--port", "0"] + args,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_a_dicom_study_through_the_server(model, server, client, tmp_path):
    """The DICOM study (a PA and a lateral sharing a StudyInstanceUID, a prior PA of an earlier StudyDate) as three
    image_url parts in any order: grouped, ordered and answered as the library answers the study; through the form
    with the prior as prior_file and its report as text; a lateral alone refused naming its tag and its part."""
    files = write_two_studies(tmp_path)
    _, study = studies_in_folder(tmp_path)
    parts = [{"type": "text", "text": prompting.REPORT_QUESTION}] + [
        {"type": "image_url", "image_url": {"url": data_url(files[name], "application/dicom")}}
        for name in ("prior", "lateral", "frontal")]
    reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": parts}], **GREEDY)
    assert reply.choices[0].message.content == model.write_radiologic_report(study, temperature=0.0, max_new_tokens=10)
    assert reply.usage.prompt_tokens == len(model.encode([{"role": "user", "content": prompting.REPORT_QUESTION}],
                                                         study))

    body, content_type = multipart({"temperature": "0", "max_tokens": "10", "prior_report": "Small left effusion."},
                                   {"file": [("pa.dcm", files["frontal"].read_bytes()),
                                             ("lat.dcm", files["lateral"].read_bytes())],
                                    "prior_file": ("old.dcm", files["prior"].read_bytes())})
    status, answer = server.request("POST", "/v1/report", body, {"Content-Type": content_type,
                                                                 "Authorization": f"Bearer {KEY}"})
    assert status == 200, answer
    with_report = Study.of([files["frontal"], files["lateral"]],
                           prior=Study.of(files["prior"], report="Small left effusion."))
    assert answer["report"] == model.write_radiologic_report(with_report, temperature=0.0, max_new_tokens=10)

    lateral = {"type": "image_url", "image_url": {"url": data_url(files["lateral"], "application/dicom")}}
    for content, field, pattern in (
            ([{"type": "text", "text": "Any effusion?"}, lateral], "messages[0].content[1].image_url",
             r"ViewPosition is 'LL'"),
            ([{**lateral, "image_url": {"url": data_url(NIH_PNG)}, "view": "LL"}], "messages[0].content[0].image_url",
             r"only view is lateral"),
            ([lateral, {**lateral, "view": "PA"}], "messages[0].content[1].image_url",
             r"given as a frontal view \('PA'\) but its ViewPosition is 'LL'")):
        status, refused = server.post_json("/v1/chat/completions", {"model": MODEL_ID, "messages": [
            {"role": "user", "content": content}]}, KEY)
        assert status == 400 and refused["error"]["param"] == field, refused
        assert re.search(pattern, refused["error"]["message"]), refused["error"]["message"]


def test_a_request_is_priced_by_every_image(tmp_path):
    """Admission holds the decoding budget for the largest of a request's images, whichever part it is in."""
    small = tmp_path / "small.png"
    Image.new("L", (64, 64), 128).save(small)
    parts = [{"type": "image_url", "image_url": {"url": data_url(path)}} for path in (small, NIH_PNG)]
    generation = requests.parse_chat({"model": MODEL_ID, "messages": [{"role": "user", "content": parts}]}, MODEL_ID,
                                     LIMITS)
    costs = [part.image.decode_bytes for part in generation.images]
    assert costs[0] < costs[1] == generation.decode_bytes
    assert generation.largest_field == "messages[0].content[1].image_url"
