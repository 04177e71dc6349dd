"""`cxrllava serve` under concurrent clients: requests/s and latency at 1, 4, 16 and 32 clients.

    python benchmarks/bench_serve.py [--models tiny small]   # prints tables, writes benchmarks/results/serve.json

The server is the real command (`cxrllava serve`, its own process) on two random-weight models, one at a time:
- tiny: the tests' checkpoint (2 layers of width 64, a 512-piece tokenizer). A decode step costs it ~30 us, so
  its requests are mostly HTTP, JSON, base64 and image decoding, which batching cannot share: on 2 cores this
  measures the server's overhead more than its batching.
- small: a 4-layer, 256-wide LLaMA with LLaMA-2's tokenizer and vocabulary (`tiny_models.small_release_dir`),
  where, as in real serving, decoding is most of a request's cost; still CPU-sized.
Each level sends the same fixed number of greedy chat completions (radiographs as data: URLs, reports,
differential diagnoses and questions, at most MAX_TOKENS tokens each: 64 distinct requests, repeated) from as
many concurrent clients as the level says. The clients are coroutines of one asyncio process (aiohttp, kept-alive
connections, request bodies built beforehand), so that the client costs the 2-core machine little beside
the server it measures. Every answer is checked against `CXRLLaVA.chat` on the same request alone. Untimed
passes over every level first compile the batch shapes the scheduler forms, until a pass compiles nothing new
(the server's /health counts programs); each level's figures come from the fastest of three timed passes of
several seconds, taken round the levels (every pass's requests/s is kept, and the programs still compiled
during them). Beside throughput and latency, the CPU seconds the server and the client spent per request (from
/proc and the process clock) show where the machine's time went. Each level also scrapes the server's /metrics
before and after and reads its access log: both must count exactly the requests and tokens the level sent and
received (`metrics_and_log_agree`). Goals: zero failed requests, every answer equal, metrics and log that agree,
and throughput at 16 clients at least 3x that at 1 client (batching works); the script exits non-zero
when one is missed (the throughput goal is judged on the small model, where what batching shares dominates; the
tiny model's figures are reported beside it).
"""

import argparse
import asyncio
import base64
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from cxrllava_jax import accelerator
from cxrllava_jax.domain import prompting
from cxrllava_jax.inference.api import CXRLLaVA
from cxrllava_jax.reference.tiny_models import checkpoint_dir, small_release_dir, synthetic_radiograph

ROOT = pathlib.Path(__file__).resolve().parents[1]

CLIENTS = (1, 4, 16, 32)
MODELS = {"tiny": (checkpoint_dir, 512), "small": (small_release_dir, 192)}  # -> (its directory, requests/level)
THROUGHPUT_GOAL_MODEL = "small"
MAX_WARM_UP_PASSES = 8  # untimed passes over every level, until one compiles no new batch shape's program
TIMED_PASSES = 3  # per level; its figures are the fastest pass's (as bench_inference's), failures count in all
MAX_TOKENS = 48
MAX_BATCH_SIZE = 32
MODEL_ID = "cxr-llava-tiny"
NIH = sorted((ROOT / "tests" / "fixtures" / "real-cxr" / "nih").glob("*.png"))
PROMPTS = [prompting.REPORT_PROMPT, prompting.DIFFERENTIAL_PROMPT, "Is there a pleural effusion?",
           "Is the heart enlarged?", "Describe the lungs.", "Is there a pneumothorax?", "Any consolidation?",
           "What devices are present?"]


def workload(folder: pathlib.Path) -> list[tuple[list[dict], pathlib.Path]]:
    """64 distinct (conversation, image) pairs: 8 prompts x 8 radiographs (the NIH pair and drawn ones)."""
    images = NIH + [synthetic_radiograph(folder / f"cxr{i}.png", seed=i, size=256) for i in range(8 - len(NIH))]
    return [([{"role": "user", "content": prompt}], image) for prompt in PROMPTS for image in images]


def request_body(turns: list[dict], image: pathlib.Path) -> bytes:
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    text = turns[0]["content"].removeprefix(f"{prompting.IMAGE}\n")
    messages = [{"role": "user", "content": [{"type": "text", "text": text},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    return json.dumps({"model": MODEL_ID, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}).encode()


class Server:
    """`cxrllava serve` on a free localhost port, from the source tree `tree` (another checkout measures the code
    of another commit)."""

    def __init__(self, checkpoint, max_queue: int, tree: pathlib.Path = ROOT, extra: tuple = ()):
        command = [sys.executable, "-m", "cxrllava_jax.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0",
                   "--model-name", MODEL_ID, "--max-batch-size", str(MAX_BATCH_SIZE), "--max-queue", str(max_queue),
                   *extra]
        # This process holds its reference model's device memory too: the server gets the other share.
        env = {**os.environ, "PYTHONPATH": str(tree), **accelerator.shared_memory_env(2)}
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tree, env=env)
        for line in self.process.stderr:
            if match := re.search(r"http://([\d.]+):(\d+)/", line):
                self.url = f"http://{match[1]}:{match[2]}"
                break
        else:
            raise RuntimeError(f"cxrllava serve exited with {self.process.wait()}")
        self.chat_lines = 0  # access-log lines of chat completions answered with 200
        threading.Thread(target=self._read_log, daemon=True).start()  # keeps its pipe drained

    def _read_log(self):
        for line in self.process.stderr:
            self.chat_lines += " cxrllava.access " in line and " route=/v1/chat/completions status=200 " in line

    def wait_for_log(self, lines: int, timeout: float = 60.0):
        """A request's line is written once its response has gone: the client may have it a moment before."""
        deadline = time.monotonic() + timeout
        while self.chat_lines < lines and time.monotonic() < deadline:
            time.sleep(0.01)

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = pathlib.Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=60)


async def run_level(url: str, bodies: list[bytes], clients: int) -> dict:
    """All bodies, `clients` at a time on kept-alive connections -> wall time, latencies, replies, /health."""
    latencies, replies = [0.0] * len(bodies), [None] * len(bodies)
    next_index = iter(range(len(bodies)))
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:

        async def client():
            for i in next_index:
                start = time.perf_counter()
                try:
                    async with session.post(f"{url}/v1/chat/completions", data=bodies[i], headers=headers) as reply:
                        replies[i] = (reply.status, await reply.json())
                except aiohttp.ClientError as error:
                    replies[i] = (None, {"error": {"message": repr(error)}})
                latencies[i] = time.perf_counter() - start

        async def health() -> dict:
            async with session.get(f"{url}/health") as reply:
                return {**await reply.json(), **scraped(await (await session.get(f"{url}/metrics")).text())}

        before = await health()
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        after = await health()
    return {"wall": wall, "client_cpu": cpu, "latencies": latencies, "replies": replies,
            **{key: after[key] - before[key] for key in ("batches", "rows", "chunks", "row_chunks", *METRICS)},
            "programs": sum(after[key] - before[key] for key in ("programs_compiled", "programs_loaded"))}


METRICS = {"requests": ("cxrllava_requests_total", {"method": "POST", "route": "/v1/chat/completions",
                                                    "status": "200"}),
           "prompt_tokens": ("cxrllava_prompt_tokens_total", {}),
           "completion_tokens": ("cxrllava_completion_tokens_total", {})}


def scraped(text: str) -> dict:
    """The /metrics samples this benchmark checks, by METRICS' names (0 before the first request)."""
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return {key: samples.get((name, tuple(sorted(labels.items()))), 0.0) for key, (name, labels) in METRICS.items()}


def measure(server: Server, bodies: list[bytes], expected: list[str], clients: int) -> dict:
    server_cpu, log_lines = server.cpu_seconds(), server.chat_lines
    run = asyncio.run(run_level(server.url, bodies, clients))
    server_cpu = server.cpu_seconds() - server_cpu
    replies, n = run["replies"], len(bodies)
    failed = sum(status != 200 for status, _ in replies)
    sent = {"requests": n - failed, **{key: sum(reply["usage"][key] for status, reply in replies if status == 200)
                                       for key in ("prompt_tokens", "completion_tokens")}}
    server.wait_for_log(log_lines + sent["requests"])
    counted = {"metrics": {key: int(run[key]) for key in METRICS}, "access_log_lines": server.chat_lines - log_lines}
    different = sum(status == 200 and reply["choices"][0]["message"]["content"] != expected[i % len(expected)]
                    for i, (status, reply) in enumerate(replies))
    return {"clients": clients, "requests": n, "wall_s": round(run["wall"], 3),
            "requests_per_s": round(n / run["wall"], 2),
            "p50_latency_s": round(float(np.percentile(run["latencies"], 50)), 4),
            "p99_latency_s": round(float(np.percentile(run["latencies"], 99)), 4),
            "mean_rows_admitted_together": round(run["rows"] / max(run["batches"], 1), 2),
            "mean_rows_per_decode_chunk": round(run["row_chunks"] / max(run["chunks"], 1), 2),
            "server_cpu_ms_per_request": round(server_cpu / n * 1e3, 3),
            "client_cpu_ms_per_request": round(run["client_cpu"] / n * 1e3, 3),
            "programs_compiled_or_loaded": run["programs"], "failed": failed, "different_from_library": different,
            "sent": sent, "counted": counted,
            "metrics_and_log_agree": counted == {"metrics": sent, "access_log_lines": sent["requests"]}}


def bench_model(name: str, clients: list[int], requests: int | None, extra: list[str],
                tree: pathlib.Path = ROOT) -> dict:
    """Every level on one model: its runs, 16 clients' throughput over 1 client's, failures, differences."""
    directory, default_requests = MODELS[name]
    checkpoint = directory()
    with tempfile.TemporaryDirectory() as folder:
        pairs = workload(pathlib.Path(folder))
        distinct = [request_body(turns, image) for turns, image in pairs]
        model = CXRLLaVA.from_pretrained(checkpoint)
        expected = [model.chat(turns, image, temperature=0.0, max_new_tokens=MAX_TOKENS) for turns, image in pairs]
        del model
    bodies = [distinct[i % len(distinct)] for i in range(requests or default_requests)]
    server = Server(checkpoint, max_queue=max(clients), tree=tree, extra=extra)
    try:
        for warm_up_passes in range(1, MAX_WARM_UP_PASSES + 1):
            if sum(asyncio.run(run_level(server.url, bodies, level))["programs"] for level in clients) == 0:
                break
        # Passes go round the levels, so that a machine slower for a while slows every level alike.
        passes = {level: [] for level in clients}
        for _ in range(TIMED_PASSES):
            for level in clients:
                passes[level].append(measure(server, bodies, expected, level))
        runs = []
        for level in clients:
            run = {**max(passes[level], key=lambda p: p["requests_per_s"]),
                   "requests_per_s_each_pass": [p["requests_per_s"] for p in passes[level]],
                   **{key: sum(p[key] for p in passes[level]) for key in ("failed", "different_from_library",
                                                                        "programs_compiled_or_loaded")},
                   "metrics_and_log_agree": all(p["metrics_and_log_agree"] for p in passes[level])}
            runs.append(run)
            print(f"{name:>5} {level:>3} clients: {run['requests_per_s']:7.2f} req/s "
                  f"(passes {', '.join(map(str, run['requests_per_s_each_pass']))})  p50 {run['p50_latency_s']:.3f} "
                  f"s  p99 {run['p99_latency_s']:.3f} s  rows/chunk {run['mean_rows_per_decode_chunk']:5.2f}  CPU "
                  f"ms/request server {run['server_cpu_ms_per_request']:.2f} "
                  f"client {run['client_cpu_ms_per_request']:.2f}  failed {run['failed']}  "
                  f"different {run['different_from_library']}  programs {run['programs_compiled_or_loaded']}  "
                  f"/metrics and log {'agree' if run['metrics_and_log_agree'] else 'DISAGREE'}",
                  flush=True)
    finally:
        server.close()
    by_clients = {run["clients"]: run for run in runs}
    speedup = (by_clients[16]["requests_per_s"] / by_clients[1]["requests_per_s"]
               if {1, 16} <= by_clients.keys() else 0)
    return {"checkpoint": checkpoint.name, "warm_up_passes": warm_up_passes, "speedup_16_vs_1": round(speedup, 2),
            "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--requests", type=int, help="requests per level (default: 512 tiny, 192 small)")
    parser.add_argument("--clients", type=int, nargs="+", default=CLIENTS, help="levels (default %(default)s)")
    parser.add_argument("--cache-mb", help="the server's prefix cache (the workload repeats its 64 requests, which a "
                        "cache answers with almost no prefill; 0 measures batching alone)")
    parser.add_argument("--tree", type=pathlib.Path, default=ROOT,
                        help="the source tree whose server is measured (another checkout: another commit's code)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = parser.parse_args()
    accelerator.share_memory(2)  # this process and the server it starts, on one GPU
    load_before = os.getloadavg()
    extra = [] if args.cache_mb is None else ["--cache-mb", args.cache_mb]
    models = {name: bench_model(name, args.clients, args.requests, extra, args.tree.resolve())
              for name in args.models}
    goals = {"speedup_16_vs_1": 3.0, "speedup_judged_on": THROUGHPUT_GOAL_MODEL, "failed": 0,
             "different_from_library": 0, "metrics_and_log_agree": True}
    correct = all(run["failed"] == 0 and run["different_from_library"] == 0 and run["metrics_and_log_agree"]
                  for result in models.values() for run in result["runs"])
    judged = models.get(THROUGHPUT_GOAL_MODEL, {}).get("speedup_16_vs_1", 0)
    met = correct and judged >= goals["speedup_16_vs_1"]
    result = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "max_tokens": MAX_TOKENS, "max_batch_size": MAX_BATCH_SIZE,
              "server_options": extra, "tree": str(args.tree), "goals": goals, "goals_met": met, "models": models}
    out = args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, model in models.items():
        print(f"{name}: 16 clients vs 1: {model['speedup_16_vs_1']:.2f}x")
    print(f"goal >= 3x on the {THROUGHPUT_GOAL_MODEL} model, no failure, no difference, /metrics and log agree: "
          f"{'met' if met else 'MISSED'}; wrote {out}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
