"""`cxrllava serve` under concurrent clients: requests/s and latency at 1, 4, 16 and 32 clients.

    python benchmarks/bench_serve.py   # prints a table, writes benchmarks/results/serve.json

The server is the real command (`cxrllava serve`, its own process) on the tests' tiny checkpoint. Each level
sends the same REQUESTS greedy chat completions (radiographs as data: URLs, reports, differential diagnoses
and questions, at most MAX_TOKENS tokens each) from as many client threads as the level says. Every answer is
checked against `CXRLLaVA.chat` on the same request alone. Each level's figures come from the faster of
REPEATS timed passes, after warm-up passes at every level (they compile the batch shapes the scheduler
happens to form). Goals: zero failed requests, every answer equal, and throughput at 16 clients at least 3x
that at 1 client (batching works); the script exits non-zero when one is missed.
"""

import base64
import http.client
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

import numpy as np

from cxrllava_jax.domain import prompting
from cxrllava_jax.inference.api import CXRLLaVA
from cxrllava_jax.reference.tiny_models import checkpoint_dir, synthetic_radiograph

ROOT = pathlib.Path(__file__).resolve().parents[1]

CLIENTS = (1, 4, 16, 32)
REQUESTS = 64
MAX_TOKENS = 48
MAX_BATCH_SIZE = 32
REPEATS = 3
MODEL_ID = "cxr-llava-tiny"
NIH = sorted((ROOT / "tests" / "fixtures" / "real-cxr" / "nih").glob("*.png"))
TASKS = [prompting.REPORT_PROMPT, prompting.DIFFERENTIAL_PROMPT, "Is there a pleural effusion?",
         "Is the heart enlarged?", "Describe the lungs.", "Is there a pneumothorax?", "Any consolidation?",
         "What devices are present?"]


def workload(folder: pathlib.Path) -> list[tuple[list[dict], pathlib.Path]]:
    """REQUESTS (conversation, image) pairs: 8 prompts x 8 radiographs (the NIH pair and drawn ones)."""
    images = NIH + [synthetic_radiograph(folder / f"cxr{i}.png", seed=i, size=256) for i in range(8 - len(NIH))]
    pairs = [([{"role": "user", "content": task}], image) for task in TASKS for image in images]
    return pairs[:REQUESTS]


def request_body(turns: list[dict], image: pathlib.Path) -> bytes:
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    text = turns[0]["content"].removeprefix(f"{prompting.IMAGE}\n")
    messages = [{"role": "user", "content": [{"type": "text", "text": text},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    return json.dumps({"model": MODEL_ID, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}).encode()


class Server:
    """`cxrllava serve` on a free localhost port."""

    def __init__(self, checkpoint):
        command = [sys.executable, "-m", "cxrllava_jax.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0",
                   "--model-name", MODEL_ID, "--max-batch-size", str(MAX_BATCH_SIZE), "--max-queue", str(REQUESTS)]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for line in self.process.stderr:
            if match := re.search(r"http://([\d.]+):(\d+)/", line):
                self.host, self.port = match[1], int(match[2])
                break
        else:
            raise RuntimeError(f"cxrllava serve exited with {self.process.wait()}")
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep its pipe drained

    def post(self, body: bytes) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def batching(self) -> tuple[int, int]:
        """(batches, rows) the server has run so far, from /health."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("GET", "/health")
            health = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        return health.get("batches", 0), health.get("rows", 0)

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def run_level(server: Server, bodies: list[bytes], clients: int) -> tuple[float, list[float], list]:
    """All bodies, `clients` at a time -> (wall seconds, per-request latencies, per-request (status, reply))."""
    latencies, replies = [0.0] * len(bodies), [None] * len(bodies)
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                replies[i] = server.post(bodies[i])
            except OSError as error:
                replies[i] = (None, {"error": {"message": repr(error)}})
            latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies, replies


def main() -> int:
    checkpoint = checkpoint_dir()
    with tempfile.TemporaryDirectory() as folder:
        requests = workload(pathlib.Path(folder))
        bodies = [request_body(turns, image) for turns, image in requests]
        model = CXRLLaVA.from_pretrained(checkpoint)
        expected = [model.chat(turns, image, temperature=0.0, max_new_tokens=MAX_TOKENS) for turns, image in requests]
        del model
        server = Server(checkpoint)
        try:
            for clients in CLIENTS + CLIENTS[::-1]:
                run_level(server, bodies, clients)
            runs = []
            for clients in CLIENTS:
                batches, rows = server.batching()
                wall, latencies, replies = min((run_level(server, bodies, clients) for _ in range(REPEATS)),
                                               key=lambda run: run[0])
                batches, rows = (now - before for now, before in zip(server.batching(), (batches, rows)))
                failed = sum(status != 200 for status, _ in replies)
                different = sum(status == 200 and reply["choices"][0]["message"]["content"] != answer
                                for (status, reply), answer in zip(replies, expected))
                runs.append({"clients": clients, "requests": len(bodies), "wall_s": round(wall, 3),
                             "requests_per_s": round(len(bodies) / wall, 2),
                             "p50_latency_s": round(float(np.percentile(latencies, 50)), 4),
                             "p99_latency_s": round(float(np.percentile(latencies, 99)), 4),
                             "mean_rows_per_batch": round(rows / batches, 2),
                             "failed": failed, "different_from_library": different})
                run = runs[-1]
                print(f"{clients:>3} clients: {run['requests_per_s']:7.2f} req/s  p50 {run['p50_latency_s']:.3f} s  "
                      f"p99 {run['p99_latency_s']:.3f} s  rows/batch {run['mean_rows_per_batch']:5.2f}  "
                      f"failed {failed}  different {different}", flush=True)
        finally:
            server.close()
    by_clients = {run["clients"]: run for run in runs}
    speedup = by_clients[16]["requests_per_s"] / by_clients[1]["requests_per_s"]
    goals = {"speedup_16_vs_1": 3.0, "failed": 0, "different_from_library": 0}
    met = (speedup >= goals["speedup_16_vs_1"] and all(r["failed"] == 0 and r["different_from_library"] == 0
                                                        for r in runs))
    result = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
              "model": "tiny (test checkpoint)", "max_tokens": MAX_TOKENS, "max_batch_size": MAX_BATCH_SIZE,
              "goals": goals, "speedup_16_vs_1": round(speedup, 2), "goals_met": met, "runs": runs}
    out = ROOT / "benchmarks" / "results" / "serve.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"16 clients vs 1: {speedup:.2f}x (goal >= 3x); goals {'met' if met else 'MISSED'}; wrote {out}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
