"""The server's access log (one line per request, no content) and its Prometheus /metrics, on the tiny model."""

import http.client
import json
import logging
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cxrllava_jax.serving import observability
from cxrllava_jax.serving.app import create_app
from tests.serving_fixtures import NIH_PNG, LiveServer, data_url, image_message

QUESTION = "Is there a pleural effusion?"
CHAT = ("POST", "/v1/chat/completions")


@pytest.fixture(scope="module")
def server(model):
    live = LiveServer(create_app(model, "tiny", max_batch_size=4, max_queue=4))
    yield live
    live.close()


def metrics(server) -> dict:
    status, text = server.request("GET", "/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text.decode()) for sample in family.samples}


def test_one_access_line_per_request_and_metrics_that_count_them(server, caplog):
    caplog.set_level(logging.INFO, logger="cxrllava.access")
    request = {"model": "tiny", "messages": [image_message(QUESTION, data_url(NIH_PNG))], "temperature": 0,
               "max_tokens": 5}
    before = metrics(server)
    caplog.clear()
    usages = []
    for stream in (False, True):
        if stream:
            conn, response = server.open_stream({**request, "stream_options": {"include_usage": True}})
            events = [json.loads(line[6:]) for line in response.read().decode().splitlines()
                      if line.startswith("data: {")]
            conn.close()
            usages.append(events[-1]["usage"])
            request_id = response.getheader("x-request-id")
        else:
            status, reply = server.post_json("/v1/chat/completions", request)
            assert status == 200
            usages.append(reply["usage"])
    assert server.post_json("/v1/chat/completions", {"model": "tiny"})[0] == 400
    assert server.request("GET", "/health")[0] == 200

    # A request is logged and counted once its response has gone, which the client may see first: wait for the
    # four lines; their order is that of their ends.
    def lines():
        return [r for r in caplog.records if r.name == "cxrllava.access" and r.access["route"] != "/metrics"]

    deadline = time.monotonic() + 60
    while len(lines()) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    after = metrics(server)
    lines = lines()
    logged = sorted((r.access for r in lines), key=lambda f: (f["route"], f["status"]))
    assert [(f["method"], f["route"], f["status"]) for f in logged] == [
        ("GET", "/health", 200), (*CHAT, 200), (*CHAT, 200), (*CHAT, 400)]
    assert request_id in {f["request_id"] for f in logged[1:3]}
    for fields, usage in zip(logged[1:3], usages):
        assert (fields["prompt_tokens"], fields["completion_tokens"]) == (usage["prompt_tokens"],
                                                                          usage["completion_tokens"])
        assert 0 <= fields["queue_s"] <= fields["ttft_s"] <= fields["total_s"]
    assert logged[3]["prompt_tokens"] is None and logged[3]["total_s"] > 0
    text = " ".join(str(r.__dict__) for r in lines)
    assert "effusion" not in text and "base64" not in text  # no content in the log

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("cxrllava_requests_total", method="POST", route=CHAT[1], status="200") == 2
    assert grew("cxrllava_requests_total", method="POST", route=CHAT[1], status="400") == 1
    assert grew("cxrllava_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert grew("cxrllava_completion_tokens_total") == sum(u["completion_tokens"] for u in usages) == 10
    for histogram in ("time_to_first_token", "queue_wait", "request_latency"):
        assert grew(f"cxrllava_{histogram}_seconds_count") == 2
    assert grew("cxrllava_rows_admitted_total") == 2
    assert after[("cxrllava_queue_depth", ())] == 0 and ("cxrllava_batch_rows", ()) in after
    # compiled here, or loaded from the run's compilation cache when another test compiled it first
    assert after[("cxrllava_programs_compiled_total", ())] + after[("cxrllava_programs_loaded_total", ())] >= 1


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_log_formats(log_format, capsys):
    assert set(observability.SERVER_LOGGERS) == {"cxrllava", "cxrllava_jax", "uvicorn"}  # what conftest restores
    observability.configure_logging(log_format)  # undone after the test (conftest.server_logging_restored)
    record = observability.RequestRecord("GET", "/health")
    record.status, record.total_s = 200, 0.25
    observability.access_log.info("request", extra={"access": record.fields()})
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1
    if log_format == "json":
        parsed = json.loads(line)
        assert parsed["logger"] == "cxrllava.access" and parsed["route"] == "/health"
        assert (parsed["status"], parsed["total_s"], parsed["ttft_s"]) == (200, 0.25, None)
    else:
        assert f"request_id={record.request_id} method=GET route=/health status=200 prompt_tokens=- " in line


def test_unknown_paths_share_one_route_label(server):
    assert server.request("GET", "/no/such/path")[0] == 404
    key = ("cxrllava_requests_total", (("method", "GET"), ("route", "(unknown)"), ("status", "404")))
    assert metrics(server)[key] >= 1
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("GET", "/health")
    assert len(conn.getresponse().getheader("x-request-id")) == 16
    conn.close()
