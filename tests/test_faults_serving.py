"""The server under hostile requests: every malformed request is a 4xx JSON body naming the field at fault, before
any work; the HTTP layer's oddities (chunked bodies, hang-ups, huge or duplicated headers) cost one log line at
most; `cxrllava serve` refuses bad settings with one line before the model loads.

One live server (uvicorn on a free port, the session's tiny model) answers every case; most never reach the
model. Cases that generate ask for a few tokens.
"""

import base64
import gzip
import http.client
import io
import json
import logging
import re
import socket

import numpy as np
import pytest
from PIL import Image

from cxrllava_jax import cli
from cxrllava_jax.inference.engine import SamplingOptions
from cxrllava_jax.inference.sampling import TOP_P_FLOOR, SamplingError
from cxrllava_jax.serving import requests, uploads
from cxrllava_jax.serving.app import create_app
from cxrllava_jax.serving.limits import MIB, Limits
from tests.dicom_files import write_dicom
from tests.serving_fixtures import NIH_PNG, LiveServer, data_url, image_message

MODEL_ID = "cxr-llava-tiny"
LIMITS = Limits(max_image_bytes=1 * MIB, max_output_tokens=8, max_text_chars=10_000)


@pytest.fixture(scope="module")
def server(model):
    live = LiveServer(create_app(model, MODEL_ID, limits=LIMITS))
    yield live
    live.close()


def _good(**change) -> dict:
    return {"model": MODEL_ID, "messages": [image_message("Describe.", data_url(NIH_PNG))], "temperature": 0,
            "max_tokens": 2, **change}


def _with_text(text_json: str) -> bytes:
    """The good request with its question replaced by raw JSON text (for escapes json.dumps would not write)."""
    body = json.dumps(_good())
    return body.replace('"Describe."', text_json).encode()


def _nested(depth: int) -> bytes:
    return json.dumps(_good()).replace('"Describe."', "[" * depth + "]" * depth).encode()


PNG = NIH_PNG.read_bytes()


def _hand_dicom() -> bytes:
    """A small DICOM whose tags say it is no chest radiograph (the guard refuses it before decoding)."""
    out = io.BytesIO()
    write_dicom(out, np.tile(np.arange(64, dtype=np.uint16) * 64, (64, 1)), BodyPartExamined="HAND")
    return out.getvalue()


HAND = _hand_dicom()
BAD_JSON = [
    # (case, body, status, param, message pattern)
    ("nested 10,000 deep", _nested(10_000), 400, r"messages\[0\]\.content\[0\]\.text(\[0\])+",
     r"nested more than 16 levels"),
    ("nested 20 deep", _nested(20), 400, r"messages\[0\]\.content\[0\]\.text(\[0\])+", r"nested more than 16"),
    ("5,000-digit max_tokens", json.dumps(_good()).replace('"max_tokens": 2', '"max_tokens": ' + "9" * 5000).encode(),
     400, "max_tokens", r"max_tokens: a number of 5,000 characters"),
    ("5,000-digit float", json.dumps(_good()).replace('"temperature": 0', '"temperature": 0.' + "1" * 5000).encode(),
     400, "temperature", r"a number of 5,002 characters"),
    ("NaN", json.dumps(_good()).replace('"temperature": 0', '"temperature": NaN').encode(), 400, "temperature",
     r"NaN is not a JSON number"),
    ("lone surrogate in text", _with_text(r'"heart \ud800 size"'), 400, r"messages[0].content[0].text",
     r"character 6 is a lone UTF-16 surrogate"),
    ("lone surrogate in a key", json.dumps({**_good(), "\udc00": 1}).encode(), 400, None, r"a key of the request body"),
    ("role as a list", json.dumps(_good(messages=[{"role": ["user"], "content": "hi"}])).encode(), 400,
     "messages[0].role", r"messages\[0\]\.role must be one of .* got \['user'\]"),
    ("role as an object", json.dumps(_good(messages=[{"role": {"a": 1}, "content": "hi"}])).encode(), 400,
     "messages[0].role", r"must be one of"),
    ("not UTF-8", b'{"model": "\xff"}', 400, None, r"not UTF-8 \(byte 11"),
    ("a list, not an object", b"[1, 2]", 400, None, r"must be a JSON object"),
    ("seed 2**32", json.dumps(_good(seed=2**32)).encode(), 400, "seed", r"seed must be an integer in \[0, 2\*\*32\)"),
    ("seed -1", json.dumps(_good(seed=-1)).encode(), 400, "seed", r"got -1"),
    ("seed 1.5", json.dumps(_good(seed=1.5)).encode(), 400, "seed", r"got 1\.5"),
    ("top_p 0", json.dumps(_good(top_p=0)).encode(), 400, "top_p", r"top_p must be a number in \(0, 1\]"),
    ("temperature true", json.dumps(_good(temperature=True)).encode(), 400, "temperature", r"got True"),
    ("max_completion_tokens null leaves max_tokens", json.dumps(_good(max_tokens=99, max_completion_tokens=None))
     .encode(), 400, "max_tokens", r"max_tokens=99 is more than this server's limit of 8"),
    ("max_tokens and max_completion_tokens disagree", json.dumps(_good(max_completion_tokens=3)).encode(), 400,
     "max_completion_tokens", r"disagree"),
    ("n = 2", json.dumps(_good(n=2)).encode(), 400, "n", r"n=2 is not supported"),
    ("unknown field", json.dumps(_good(best_of=3)).encode(), 400, "best_of", r"unknown field 'best_of'"),
    ("stream as a string", json.dumps(_good(stream="yes")).encode(), 400, "stream", r"stream must be true or false"),
    ("include_usage as a number", json.dumps(_good(stream=True, stream_options={"include_usage": 1})).encode(), 400,
     "stream_options.include_usage", r"must be true or false"),
    ("allow_non_frontal as a string", json.dumps(_good(allow_non_frontal="yes")).encode(), 400, "allow_non_frontal",
     r"must be true or false"),
    ("text past the limit", json.dumps(_good(messages=[image_message("a" * 10_001, data_url(NIH_PNG))])).encode(),
     400, "messages[0].content[0].text", r"longer than this server's limit of 10,000 characters"),
    ("indication past the limit with the messages' text", json.dumps(_good(
        messages=[image_message("a" * 5_000, data_url(NIH_PNG))], indication="a" * 5_001)).encode(), 400, "indication",
     r"indication: the request's text is longer than this server's limit of 10,000 characters"),
    ("a text part's text a number", json.dumps(_good(messages=[{"role": "user", "content": [
        {"type": "text", "text": 5}, {"type": "image_url", "image_url": {"url": data_url(NIH_PNG)}}]}])).encode(), 400,
     "messages[0].content[0].text", r"messages\[0\]\.content\[0\]\.text must be a string, got 5"),
    ("model as a 5,000-character string", json.dumps(_good(model="m" * 5000)).encode(), 404, "model",
     r"model 'mmmmmmmmmmmmmmmmmmm\.\.\. \(5,002 characters\) does not exist"),
    ("base64 with a bad padding", json.dumps(_good(messages=[image_message("x", "data:image/png;base64,iVBORw0")]))
     .encode(), 400, "messages[0].content[1].image_url", r"not valid base64"),
    ("base64 with a non-ASCII character", json.dumps(_good(messages=[image_message("x", "data:image/png;base64,é")]))
     .encode(), 400, "messages[0].content[1].image_url", r"outside base64's alphabet"),
    ("a key twice", json.dumps(_good()).replace('"max_tokens": 2', '"max_tokens": 2, "max_tokens": 400').encode(),
     400, "max_tokens", r"the key 'max_tokens' appears twice"),
    ("200,000 values", json.dumps(_good(metadata=[0] * 200_000)).encode(), 400, None,
     r"more than 100,000 JSON values \(200,0\d\d commas\)"),
    ("2,000 messages", json.dumps(_good(messages=[{"role": "user", "content": "a"}] * 2000)).encode(), 400,
     "messages", r"messages holds 2,000 turns; this server takes at most 1,024"),
    ("a study's second image broken", json.dumps(_good(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(NIH_PNG)}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}])).encode(), 400,
     "messages[0].content[1].image_url", r"not valid base64"),
    ("an unknown key in an image part", json.dumps(_good(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(NIH_PNG)}, "angle": 3}]}])).encode(), 400,
     "messages[0].content[0].angle", r"unknown key 'angle'"),
    ("an image part's view oblique", json.dumps(_good(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(NIH_PNG)}, "view": "oblique"}]}])).encode(), 400,
     "messages[0].content[0].view", r"must be PA, AP or a lateral"),
    ("prior_report as a number", json.dumps(_good(prior_report=3)).encode(), 400, "prior_report",
     r"prior_report must be a string"),
    ("prior_report without a prior", json.dumps(_good(prior_report="Clear.")).encode(), 400, "prior_report",
     r"the study: prior_report is given but no image of a prior study"),
    ("every image the prior's", json.dumps(_good(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(NIH_PNG)}, "prior": True}]}])).encode(), 400, "messages",
     r"every image is marked as the prior's"),
    ("a non-frontal DICOM", json.dumps(_good(messages=[image_message("x", data_url(HAND, "application/dicom"))])).encode(), 400,
     "messages[0].content[1].image_url", r"BodyPartExamined.*send allow_non_frontal: true"),
]


@pytest.mark.parametrize("case", BAD_JSON, ids=[case[0] for case in BAD_JSON])
def test_a_bad_chat_request_is_a_4xx_json_naming_the_field(server, case):
    _, body, status, param, pattern = case
    got, reply = server.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert got == status, reply
    error = reply["error"]
    assert error["param"] == param or (param and re.fullmatch(param, error["param"] or "")), error
    assert re.search(pattern, error["message"]), error["message"]
    assert "--allow-non-frontal" not in error["message"]


@pytest.mark.parametrize("case", [
    # (case, multipart body parts as (name, filename or None, bytes), param, message pattern)
    ("two seeds", [("file", "a.png", PNG), ("seed", None, b"1"), ("seed", None, b"2")], "seed",
     r"2 'seed' fields; send exactly one"),
    ("two views for one file", [("file", "a.png", PNG), ("view", None, b"PA"), ("view", None, b"LL")], "view",
     r"2 'view' field\(s\) for 1 'file' file\(s\)"),
    ("a study's second file broken", [("file", "a.png", PNG), ("file", "b.png", b"not a radiograph")], "file[1]",
     r"file\[1\]: b\.png: cannot decode image"),
    ("file sent as text", [("file", None, b"cxr.png")], "file", r"'file' field is text, not a file upload"),
    ("prior_report past the limit", [("file", "a.png", PNG), ("prior_report", None, b"a" * 10_001)], "prior_report",
     r"prior_report: the request's text is longer than this server's limit of 10,000 characters"),
    ("2,000 fields", [(f"f{i}", None, b"1") for i in range(2000)], None, r"more than 16 fields"),
    ("unknown field", [("file", "a.png", PNG), ("beams", None, b"4")], "beams", r"unknown form field 'beams'"),
    ("a 5,000-digit seed", [("file", "a.png", PNG), ("seed", None, b"9" * 5000)], "seed",
     r"seed must be a number, got '9+\.\.\. \(5,002 characters\)"),
    ("seed 2**32", [("file", "a.png", PNG), ("seed", None, b"4294967296")], "seed", r"an integer in \[0, 2\*\*32\)"),
    ("max_tokens Infinity", [("file", "a.png", PNG), ("max_tokens", None, b"Infinity")], "max_tokens",
     r"must be a number"),
    ("top_p 0", [("file", "a.png", PNG), ("top_p", None, b"0")], "top_p", r"top_p must be a number in \(0, 1\]"),
    ("allow_non_frontal maybe", [("file", "a.png", PNG), ("allow_non_frontal", None, b"maybe")], "allow_non_frontal",
     r"must be true or false"),
    ("a non-frontal DICOM", [("file", "hand.dcm", HAND)], "file",
     r"BodyPartExamined.*send allow_non_frontal: true"),
    ("a unicode file name", [("file", "снимок ü.png", b"not a radiograph")], "file",
     r"снимок ü\.png: cannot decode image"),
    ("a 1,000-character file name", [("file", "x" * 1000 + ".png", b"not a radiograph")], "file",
     r": x{100}\.\.\.x{96}\.png: cannot decode image"),
    ("an upload cut short", [("file", "a.png", PNG)], "cut short", r"ends before its closing boundary"),
    ("a 100,000-character part header", [("file", "x" * 100_000 + ".png", b"not a radiograph")], None,
     r"form could not be parsed \(MultipartParseError: Maximum header size exceeded\)"),
], ids=lambda case: case[0])
def test_a_bad_form_is_a_4xx_json_naming_the_field(server, case):
    _, parts, param, pattern = case
    boundary = "b0undary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        + (f'; filename="{filename}"'.encode() if filename is not None else b"") + b"\r\n\r\n" + data + b"\r\n"
        for name, filename, data in parts) + f"--{boundary}--\r\n".encode()
    if param == "cut short":
        body, param = body[:len(body) // 2], None
    got, reply = server.request("POST", "/v1/report", body,
                                {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert got == 400, reply
    assert reply["error"]["param"] == param and re.search(pattern, reply["error"]["message"]), reply["error"]
    assert "--allow-non-frontal" not in reply["error"]["message"]


def test_a_form_gives_each_file_its_view():
    """`-F file=@pa.png -F file=@lat.png -F view=PA -F view=LL`, as the README shows it (was a 500: the repeated
    view field was unpacked as a single one)."""
    generation = requests.parse_answer_form("report", {"view": ["PA", "LL"], "max_tokens": ["2"]},
                                            {"file": [("pa.png", PNG), ("lat.png", PNG)]}, LIMITS)
    assert [(part.field, part.view) for part in generation.images] == [("file[0]", "PA"), ("file[1]", "LL")]
    assert generation.sampling.max_new_tokens == 2


def test_allow_non_frontal_is_a_request_field(model, server):
    status, reply = server.request("POST", "/v1/preview?filename=x.dcm", HAND)
    assert status == 400 and "allow_non_frontal" in reply["error"]["message"]
    assert "--allow-non-frontal" not in reply["error"]["message"]
    status, png = server.request("POST", "/v1/preview?filename=x.dcm&allow_non_frontal=true", HAND)
    assert status == 200 and png.startswith(b"\x89PNG")
    # The chat field reaches the loader: what the job would get, without generating.
    body = _good(messages=[image_message("Describe.", data_url(HAND, "application/dicom"))], allow_non_frontal=True)
    prepared = requests.prepare(requests.parse_chat(body, MODEL_ID, LIMITS), model, LIMITS)
    np.testing.assert_array_equal(prepared.pixels, [model.preprocess(uploads.UploadedImage(HAND, "x.dcm"), True)])


def test_null_means_absent_and_tiny_top_p_means_the_top_token(server):
    # Mislabelled and line-broken base64 (MIME's 76-character lines) is read as what the bytes are.
    relabelled = [image_message("Describe.", f"data:application/dicom;base64,{base64.encodebytes(PNG).decode()}")]
    bodies = [_good(max_tokens=4),
              _good(temperature=1.0, top_p=1e-300, max_tokens=4, max_completion_tokens=None, seed=None, n=None,
                    user="ignored"),
              _good(max_tokens=4, messages=relabelled)]
    replies = [server.post_json("/v1/chat/completions", body) for body in bodies]
    assert [status for status, _ in replies] == [200] * 3, replies
    answers = [(r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"]) for _, r in replies]
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize("values, option", [
    (dict(seed=2**32), "seed"), (dict(seed=-1), "seed"), (dict(seed=1.0), "seed"), (dict(top_p=0.0), "top_p"),
    (dict(temperature=2.5), "temperature"), (dict(max_new_tokens=True), "max_new_tokens"),
])
def test_sampling_ranges_are_one_set(values, option):
    with pytest.raises(SamplingError, match=f"^{option}=") as caught:
        SamplingOptions(**values)
    assert caught.value.option == option
    assert SamplingOptions(top_p=1e-300).top_p == TOP_P_FLOOR > 0
    assert SamplingOptions(temperature=1e-40).temperature == 0.0


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "4294967296", "--seed 4294967296: must be an integer in [0, 2**32)"),
    ("--top-p", "0", "--top-p 0.0: must be a number in (0, 1]"),
    ("--temperature", "2.5", "--temperature 2.5: must be a number in [0, 2]"),
])
def test_the_command_line_has_the_same_ranges(tmp_path, capsys, flag, value, message):
    assert cli.main(["report", "--checkpoint", str(tmp_path / "none"), str(NIH_PNG), flag, value]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cxrllava report: {message}") and len(err.strip().splitlines()) == 1, err


def test_405_names_the_allowed_methods(server):
    status, reply = server.request("GET", "/v1/chat/completions")
    assert status == 405 and "GET /v1/chat/completions" in reply["error"]["message"]
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("PUT", "/v1/report")
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 405 and response.getheader("Allow") == "POST"


def _raw(server, data: bytes, then_close: bool = False) -> bytes:
    """Sends raw bytes; the server's answer (until it closes), or b"" when `then_close` hangs up at once."""
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(data)
        if then_close:
            return b""
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_http_layer_oddities(server, caplog):
    body = json.dumps(_good(seed=2**32)).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # A chunked body is read like any other, and its size is bounded as it arrives.
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    answer = _raw(server, chunked)
    assert _status(answer) == 400 and b"seed must be" in answer
    big = b"x" * (LIMITS.max_body_bytes + 1)
    answer = _raw(server, head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n")
    assert _status(answer) == 413
    # Two Content-Lengths that disagree, or a header past any sane size: refused by the HTTP layer.
    assert _status(_raw(server, head + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n{}")) == 400
    assert _status(_raw(server, head + b"X-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\n{}")) in (400, 431)
    # A wrong Content-Type: the body is still read as JSON (OpenAI's clients always send JSON).
    answer = _raw(server, head.replace(b"application/json", b"text/plain") + b"Content-Length: %d\r\n\r\n" % len(body)
                  + body)
    assert _status(answer) == 400 and b"seed must be" in answer
    # A client that hangs up half way through its body: one line in the log, no traceback (uvicorn logs an
    # application's exception on its own logger, which does not propagate to the root).
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            _raw(server, head + b"Content-Length: 100000\r\n\r\n" + body[:100], then_close=True)
            server.wait_for(lambda _: any("hung up" in r.getMessage() for r in caplog.records), timeout=60)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert server.post_json("/v1/chat/completions", _good(max_tokens=1))[0] == 200


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port 70000: must be in 0..65535"),
    (["--max-image-mb", "-1", "--max-output-tokens", "0"], "--max-output-tokens 0: must be >= 1"),
    (["--max-image-mb", "-1"], "--max-image-mb -1.0: must be a positive size"),
    (["--max-image-mb", "nan"], "--max-image-mb nan"),
    (["--max-queue", "0"], "--max-queue 0: must be >= 1"),
    (["--max-prompt-tokens", "-5"], "--max-prompt-tokens -5: must be >= 1"),
])
def test_serve_refuses_bad_settings_in_one_line(tmp_path, capsys, flags, message):
    # The checkpoint does not exist: a setting refused first proves it is checked before the model loads.
    assert cli.main(["serve", "--checkpoint", str(tmp_path / "none"), "--port", "0", *flags]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"cxrllava serve: {message}" or (message in err and len(err.strip().splitlines()) == 1), err


def test_the_full_depth_preview_keeps_every_value(server, tmp_path):
    """`/v1/preview?depth=full`, the page's window: the file's own values, exactly, and the loader's window."""
    values = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7 + 1000)
    png = io.BytesIO()
    Image.fromarray(values).save(png, format="PNG")
    dicom = io.BytesIO()
    write_dicom(dicom, values, photometric="MONOCHROME1", bits_stored=16, RescaleSlope=2, RescaleIntercept=-1024,
                WindowCenter=5000, WindowWidth=2001)
    for data, name, expected, window, invert in [
            (png.getvalue(), "a.png", values, (values.min(), values.max()), "0"),
            (dicom.getvalue(), "a.dcm", values * 2.0 - 1024, (3999.5, 5999.5), "1")]:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        conn.request("POST", f"/v1/preview?filename={name}&depth=full", body=data)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status == 200 and response.getheader("Content-Encoding") == "gzip", body[:200]
        head = {key: float(response.getheader(f"X-{key}")) for key in
                ("Image-Width", "Image-Height", "Value-Offset", "Value-Scale", "Window-Low", "Window-High")}
        codes = np.frombuffer(gzip.decompress(body), "<u2").reshape(int(head["Image-Height"]), int(head["Image-Width"]))
        np.testing.assert_array_equal(head["Value-Offset"] + codes / head["Value-Scale"], expected)
        assert (head["Window-Low"], head["Window-High"]) == window and response.getheader("X-Invert") == invert
    status, reply = server.request("POST", "/v1/preview?depth=12", png.getvalue())
    assert status == 400 and reply["error"]["param"] == "depth"
