"""What an operator sees of the server: one access-log line per request and Prometheus metrics at `GET /metrics`.

The access line (logger `cxrllava.access`) names the request (id, also sent back as `X-Request-Id`), its route
and status, its prompt and completion tokens, how long it waited for a place in the batch (`queue_s`), the time
to its first token (`ttft_s`) and to the end of its response (`total_s`), all from when the server received it.
It never holds the image or any text. `configure_logging("json")` makes every line of the server's loggers one
JSON object; "text" writes `key=value` pairs.

Metrics (`prometheus-client`, one registry per app): requests by route and status, prompt and completion tokens,
histograms of time to first token, queue wait and latency; read at scrape time from the scheduler's and the
compile counter's own statistics (what /health shows): queue depth, rows in the batch, programs compiled.
"""

import json
import logging
import sys
import time
import uuid

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response

from cxrllava_jax.serving.scheduler import Finished

access_log = logging.getLogger("cxrllava.access")
SERVER_LOGGERS = {"cxrllava": logging.INFO, "cxrllava_jax": logging.INFO, "uvicorn": logging.WARNING}  # and levels
# Seconds: a tiny model on a CPU answers in tens of milliseconds, a 7B one on a busy server in tens of seconds.
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    """The app's Prometheus registry: request counters and histograms the access log feeds, and the scheduler's
    and compile counter's statistics read when scraped."""

    def __init__(self, scheduler, programs):
        self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter("cxrllava_requests", "HTTP requests answered, by route and status",
                                                  ["method", "route", "status"], registry=self.registry)
        self.prompt_tokens = prometheus_client.Counter("cxrllava_prompt_tokens", "prompt tokens of answered requests",
                                                       registry=self.registry)
        self.completion_tokens = prometheus_client.Counter("cxrllava_completion_tokens", "tokens generated",
                                                           registry=self.registry)
        self.ttft = prometheus_client.Histogram("cxrllava_time_to_first_token_seconds", "receipt to first token",
                                                buckets=_BUCKETS, registry=self.registry)
        self.queue_wait = prometheus_client.Histogram("cxrllava_queue_wait_seconds",
                                                      "submitted to admitted into the batch", buckets=_BUCKETS,
                                                      registry=self.registry)
        self.latency = prometheus_client.Histogram("cxrllava_request_latency_seconds",
                                                   "receipt to the end of the response (generation routes)",
                                                   buckets=_BUCKETS, registry=self.registry)
        self.registry.register(_LiveStats(scheduler, programs))

    def observe(self, record: "RequestRecord"):
        self.requests.labels(record.method, record.route, str(record.status)).inc()
        if record.prompt_tokens is None:  # not a generation (the page, /health, a refused request)
            return
        self.prompt_tokens.inc(record.prompt_tokens)
        self.completion_tokens.inc(record.completion_tokens or 0)
        self.latency.observe(record.total_s)
        for histogram, value in ((self.ttft, record.ttft_s), (self.queue_wait, record.queue_s)):
            if value is not None:
                histogram.observe(value)

    async def endpoint(self, request: Request) -> Response:
        return Response(prometheus_client.generate_latest(self.registry),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)


class _LiveStats:
    """Gauges and counters read from the scheduler and the compile counter at each scrape."""

    def __init__(self, scheduler, programs):
        self.scheduler, self.programs = scheduler, programs

    def collect(self):
        stats, programs = self.scheduler.stats(), self.programs.stats()
        yield GaugeMetricFamily("cxrllava_queue_depth", "requests waiting for a place in the batch",
                                value=stats["waiting"])
        yield GaugeMetricFamily("cxrllava_batch_rows", "requests in the running batch", value=stats["running"])
        yield CounterMetricFamily("cxrllava_rows_admitted", "requests admitted into the batch", value=stats["rows"])
        for kind in ("compiled", "loaded"):
            yield CounterMetricFamily(f"cxrllava_programs_{kind}", f"XLA programs {kind} by this process",
                                      value=programs[f"programs_{kind}"])


class RequestRecord:
    """One request's access-log fields; generation routes fill the token counts and times (see `watch`)."""

    def __init__(self, method: str, route: str):
        self.request_id, self.method, self.route, self.status = uuid.uuid4().hex[:16], method, route, 0
        self.received = time.monotonic()
        self.submitted = self.prompt_tokens = self.completion_tokens = None
        self.job = None
        self.total_s = None

    @property
    def queue_s(self) -> float | None:
        admitted = getattr(self.job, "admitted_at", None)
        return None if admitted is None else max(0.0, admitted - self.submitted)

    @property
    def ttft_s(self) -> float | None:
        first = getattr(self.job, "first_token_at", None)
        return None if first is None else first - self.received

    def fields(self) -> dict:
        def rounded(value):
            return None if value is None else round(value, 4)

        return {"request_id": self.request_id, "method": self.method, "route": self.route, "status": self.status,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "queue_s": rounded(self.queue_s), "ttft_s": rounded(self.ttft_s), "total_s": rounded(self.total_s)}


def watch(request: Request, job, prompt_tokens: int):
    """Ties a job about to be submitted to its request's record: its prompt tokens, its completion tokens when it
    finishes (its sink is wrapped), and the times the scheduler notes on it (`admitted_at`, `first_token_at`)."""
    record = request.state.access
    record.job, record.prompt_tokens, record.submitted = job, prompt_tokens, time.monotonic()
    sink = job.sink

    def observed(event):
        if isinstance(event, Finished):
            record.completion_tokens = event.completion_tokens
        sink(event)

    job.sink = observed


class AccessLog:
    """ASGI middleware: a RequestRecord per HTTP request (in `request.state.access`), logged and counted once the
    response has been sent (a stream: when it ends), with its id in the `X-Request-Id` header."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        record = RequestRecord(scope["method"], path if path in self.routes else "(unknown)")
        scope.setdefault("state", {})["access"] = record

        async def send_noting_status(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", record.request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            record.total_s = time.monotonic() - record.received
            self.metrics.observe(record)
            access_log.info("request", extra={"access": record.fields()})


def configure_logging(log_format: str):
    """The server's loggers (`cxrllava.*`, the library's, uvicorn's warnings and errors) write one line per record
    to stderr: `key=value` text, or with "json" one JSON object."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if log_format == "json" else _TextFormatter())
    for name, level in SERVER_LOGGERS.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "access", None)
        head = f"{self.formatTime(record)} {record.levelname} {record.name}"
        if fields is not None:
            return head + " " + " ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())
        text = f"{head} {record.getMessage()}"
        return text + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        fields = getattr(record, "access", None)
        line.update(fields if fields is not None else {"message": record.getMessage()})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)
