"""Two servers' throughput, paired: `cxrllava serve` from two source trees, both warm at once, passes alternated.

    git worktree add /tmp/before <commit>
    python benchmarks/compare_serve.py --a /tmp/before --b . --b-extra="--cache-mb 0" [--rounds 8]

On a shared 2-core machine one tree's passes spread by +-20% from minute to minute, so `bench_serve` run once per
tree cannot tell a 10% difference. Here both servers (the small model, `bench_serve`'s workload: 384 greedy chat
completions at 16 clients by default) load and compile first, each until a pass compiles no new program; then
rounds run one pass on each, the order alternating (a b, b a, ...), so that a slow minute falls on both. Reported:
each pass's requests/s and the server's CPU ms per request, with the rows a decode chunk ran on average and the groups
prefilled (from /health: whether the two servers batched alike), the paired ratio b/a of each round and their
median, and how many answers the two servers gave alike (they must all be equal: same model, greedy). Writes
benchmarks/results/compare_serve.json. The servers' /metrics are not read: an older tree may have none.
"""

import argparse
import asyncio
import json
import os
import pathlib
import sys
import tempfile
import time
import urllib.request

import aiohttp
import numpy as np

import bench_serve

ROOT = pathlib.Path(__file__).resolve().parents[1]


BATCHING = ("batches", "chunks", "row_chunks")  # the batcher's counts in /health (both trees keep them)


def health(server: bench_serve.Server) -> dict:
    """Programs the server has compiled or loaded so far, and its batcher's counts (its /health)."""
    with urllib.request.urlopen(server.url + "/health") as reply:
        health = json.load(reply)
    return {"programs": health.get("programs_compiled", 0) + health.get("programs_loaded", 0),
            **{key: health.get(key, 0) for key in BATCHING}}


async def answers(url: str, bodies: list[bytes], clients: int) -> tuple[float, list]:
    """Every body, `clients` at a time -> (wall seconds, (status, answer text) per body)."""
    replies, order = [None] * len(bodies), iter(range(len(bodies)))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client():
            for i in order:
                async with session.post(f"{url}/v1/chat/completions", data=bodies[i],
                                        headers={"Content-Type": "application/json"}) as reply:
                    replies[i] = (reply.status, (await reply.json())["choices"][0]["message"]["content"])

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - start, replies


def one_pass(server: bench_serve.Server, bodies: list[bytes], clients: int) -> dict:
    """One pass's figures; beside them, the rows a decode chunk ran on average and the groups prefilled, which
    show whether the two servers batched alike."""
    before, cpu = health(server), server.cpu_seconds()
    wall, replies = asyncio.run(answers(server.url, bodies, clients))
    after = health(server)
    counts = {key: after[key] - before[key] for key in after}
    return {"requests_per_s": len(bodies) / wall, "server_cpu_ms_per_request": (server.cpu_seconds() - cpu)
            / len(bodies) * 1e3, "programs": counts["programs"], "load": os.getloadavg()[0],
            "rows_per_chunk": counts["row_chunks"] / max(counts["chunks"], 1), "chunks": counts["chunks"],
            "prefill_groups": counts["batches"], "replies": replies}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=pathlib.Path, required=True, help="the tree measured first (the code before)")
    parser.add_argument("--b", type=pathlib.Path, default=ROOT)
    parser.add_argument("--a-extra", default="", help="serve options for a's server")
    parser.add_argument("--b-extra", default="", help='serve options for b\'s server ("--cache-mb 0")')
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "compare_serve.json")
    args = parser.parse_args()
    checkpoint = bench_serve.MODELS["small"][0]()
    with tempfile.TemporaryDirectory() as folder:
        pairs = bench_serve.workload(pathlib.Path(folder))
        distinct = [bench_serve.request_body(turns, image) for turns, image in pairs]
    bodies = [distinct[i % len(distinct)] for i in range(args.requests)]
    servers = {name: bench_serve.Server(checkpoint, max(64, args.clients), tree.resolve(), tuple(extra.split()))
               for name, tree, extra in (("a", args.a, args.a_extra), ("b", args.b, args.b_extra))}
    try:
        for name, server in servers.items():
            for _ in range(bench_serve.MAX_WARM_UP_PASSES):
                compiled = one_pass(server, bodies[:32], 1)["programs"]
                if compiled + one_pass(server, bodies, args.clients)["programs"] == 0:
                    break
        passes, last = {"a": [], "b": []}, {}
        for round_ in range(args.rounds):
            for name in ("a", "b") if round_ % 2 == 0 else ("b", "a"):
                result = one_pass(servers[name], bodies, args.clients)
                last[name] = result.pop("replies")
                passes[name].append({key: round(value, 2) for key, value in result.items()})
                print(f"round {round_} {name}: {result['requests_per_s']:6.2f} req/s, server CPU "
                      f"{result['server_cpu_ms_per_request']:6.1f} ms/request, load {result['load']:.2f}, "
                      f"programs {result['programs']}, {result['chunks']} chunks of {result['rows_per_chunk']:.1f} "
                      f"rows, {result['prefill_groups']} prefills", flush=True)
    finally:
        for server in servers.values():
            server.close()
    ratios = [b["requests_per_s"] / a["requests_per_s"] for a, b in zip(passes["a"], passes["b"])]
    summary = {"trees": {"a": str(args.a), "b": str(args.b)}, "options": {"a": args.a_extra, "b": args.b_extra},
               "clients": args.clients, "requests": args.requests, "cpu_count": os.cpu_count(), "passes": passes,
               "paired_ratio_b_over_a": [round(r, 3) for r in ratios],
               "median_ratio": round(float(np.median(ratios)), 3),
               "median_requests_per_s": {k: float(np.median([p["requests_per_s"] for p in v]))
                                         for k, v in passes.items()},
               "median_server_cpu_ms_per_request": {k: float(np.median([p["server_cpu_ms_per_request"] for p in v]))
                                                    for k, v in passes.items()},
               "answers_alike": sum(x == y for x, y in zip(last["a"], last["b"])), "answers": len(bodies)}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"b/a: median of {len(ratios)} paired rounds {summary['median_ratio']:.3f}; answers alike "
          f"{summary['answers_alike']} of {len(bodies)}; wrote {args.out}")
    return 0 if summary["answers_alike"] == len(bodies) else 1


if __name__ == "__main__":
    sys.exit(main())
