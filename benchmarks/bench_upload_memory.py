"""The server's peak memory (VmHWM) while many clients upload images that are small as files and large decoded.

    python benchmarks/bench_upload_memory.py [--tree PATH] [--label NAME] [--clients 16] [--max-queue 64 2]

`--tree` is the source tree whose `cxrllava serve` runs (default: this one; pass a checkout of an older commit to
measure it the same way). The server runs the tests' tiny checkpoint on a free port. After one warm-up request
(compiles, loads), its peak-RSS counter is reset (`/proc/PID/clear_refs`), then `--clients` threads post, all at
once, the same 16-bit 6000x6000 PNG (a gradient: ~300 KB as a file, 72 MB as pixels) to `/v1/report` with
`max_tokens=1`, and VmHWM is read from `/proc/PID/status`. A watchdog polls VmRSS and kills the server past
`--cap-gb` (the machine is shared): a killed run reports the cap as a lower bound. Results (statuses, VmHWM
before and after the burst, the load average) are merged into benchmarks/results/upload_memory.json under the
label.
"""

import argparse
import io
import json
import os
import pathlib
import re
import sys
import threading
import time
import urllib.request

import numpy as np
from PIL import Image

from bench_serve import ROOT, Server

sys.path.insert(0, str(ROOT))
NIH_PNG = ROOT / "tests" / "fixtures" / "real-cxr" / "nih" / "00000001_000.png"


def big_png(side: int) -> bytes:
    y, x = np.mgrid[0:side, 0:side]
    pixels = ((x + y) * 5 % 65536).astype(np.uint16)  # a gradient: compresses to little, decodes to 2 bytes a pixel
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", optimize=True)
    return out.getvalue()


def multipart(filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "cxrllava-bench-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"max_tokens\"\r\n\r\n1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def status_kb(pid: int, key: str) -> int:
    text = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M)[1])


def post(server: Server, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(f"{server.url}/v1/report", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return -1  # the connection failed (the watchdog killed the server)


def burst(server: Server, body: bytes, content_type: str, clients: int, cap_kb: int) -> dict:
    statuses, killed, done = [], [], threading.Event()
    pid = server.process.pid

    def watch():
        while not done.is_set():
            try:
                if status_kb(pid, "VmRSS") > cap_kb:
                    killed.append(True)
                    server.process.kill()
                    return
            except (OSError, TypeError):
                return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    threads = [threading.Thread(target=lambda: statuses.append(post(server, body, content_type)))
               for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    seconds = time.perf_counter() - start
    peak = cap_kb if killed else status_kb(pid, "VmHWM")
    return {"statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}, "seconds": round(seconds, 1),
            "vmhwm_mb": round(peak / 1024), "killed_at_cap": bool(killed)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=pathlib.Path, default=ROOT)
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--max-queue", type=int, nargs="+", default=[64, 2])
    parser.add_argument("--cap-gb", type=float, default=6.0)
    args = parser.parse_args()
    from cxrllava_jax.reference.tiny_models import checkpoint_dir

    checkpoint = checkpoint_dir()
    png = big_png(args.side)
    body, content_type = multipart("big16.png", png)
    warm_body, _ = multipart("cxr.png", NIH_PNG.read_bytes())
    results = {}
    for max_queue in args.max_queue:
        server = Server(checkpoint, max_queue, tree=args.tree.resolve())
        try:
            assert post(server, warm_body, content_type) == 200, "the warm-up request failed"
            idle = status_kb(server.process.pid, "VmHWM")
            pathlib.Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
            after_reset = status_kb(server.process.pid, "VmHWM")
            run = burst(server, body, content_type, args.clients, int(args.cap_gb * 2**20))
        finally:
            server.close()
        run.update(vmhwm_idle_mb=round(idle / 1024), rss_at_reset_mb=round(after_reset / 1024),
                   added_mb=run["vmhwm_mb"] - round(after_reset / 1024), load_average=os.getloadavg())
        results[f"max_queue={max_queue}"] = run
        print(f"{args.label}: {args.clients} clients, --max-queue {max_queue}: {json.dumps(run)}", flush=True)
    out = ROOT / "benchmarks" / "results" / "upload_memory.json"
    saved = json.loads(out.read_text()) if out.is_file() else {}
    saved[args.label] = {"tree": str(args.tree), "image": f"{args.side}x{args.side} 16-bit PNG, {len(png):,} bytes",
                         "clients": args.clients, "cap_gb": args.cap_gb, "runs": results}
    out.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main()
