#!/usr/bin/env python3
"""Load test of `pipeline serve` (standard library only, loopback only, bounded).

Starts `pipeline serve --port 0` on 127.0.0.1 with a tiny model (trained here in a few seconds
unless --model is given), sends N concurrent `POST /api/generate` requests (N <= 200, each with
a timeout), and checks that every one is answered with images (200) or refused (429), none lost,
the server alive afterwards. Reports the counts, wall time, latency, and the server's peak RSS
(VmHWM from /proc). Exits 1 if a request was lost or the server died.

    python3 scripts/load_test.py                      # 50 requests, tiny model, --queue 8
    python3 scripts/load_test.py --requests 50 --queue 8 --model runs/animals/ldm
"""

import argparse
import base64
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_model import tiny_model  # noqa: E402

MAX_REQUESTS = 200
REQUEST_TIMEOUT_S = 120
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def proc_status(pid, key):
    """A `VmXXX:` line of /proc/PID/status, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def generate(host, port, body, results, i):
    """One request; records (status, images, seconds) or the exception."""
    start = time.monotonic()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
        conn.request("POST", "/api/generate", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        images = 0
        if resp.status == 200:
            answer = json.loads(payload)
            images = sum(1 for b in answer["images"] if base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n")
        elif resp.status == 429:
            json.loads(payload)  # the refusal is a JSON error
        results[i] = (resp.status, images, time.monotonic() - start)
    except Exception as e:  # a lost request: counted, never raised
        results[i] = (f"lost: {e!r}", 0, time.monotonic() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--binary", default=os.path.join(ROOT, "target/release/pipeline"))
    p.add_argument("--model", help="an LDM run folder (default: train a tiny one)")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--queue", type=int, default=8, help="the server's --queue")
    p.add_argument("--n", type=int, default=4, help="images per request")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args()
    if not 1 <= a.requests <= MAX_REQUESTS:
        sys.exit(f"--requests {a.requests}: expected 1 to {MAX_REQUESTS}")
    with tempfile.TemporaryDirectory() as work:
        model = a.model or tiny_model(a.binary, work)
        server = subprocess.Popen(
            [a.binary, "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
             "--queue", str(a.queue), "--max-images", str(max(a.n, 1)), "--device", "cpu"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = server.stdout.readline()
            if not line.startswith("serving http://"):
                sys.exit(f"the server did not start: {line!r}")
            host, port = line.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            port = int(port)
            rss_idle = proc_status(server.pid, "VmRSS")
            body = {"class": "top-left", "n": a.n, "steps": a.steps, "seed": 1}
            results = [None] * a.requests
            threads = [threading.Thread(target=generate, args=(host, port, body, results, i))
                       for i in range(a.requests)]
            start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(REQUEST_TIMEOUT_S + 10)
            wall = time.monotonic() - start
            alive = server.poll() is None
            after = None
            if alive:
                conn = http.client.HTTPConnection(host, port, timeout=30)
                conn.request("GET", "/api/model")
                after = conn.getresponse().status
                conn.close()
            peak = proc_status(server.pid, "VmHWM") if alive else float("nan")
        finally:
            server.terminate()
            server.wait(timeout=30)
    ok = [r for r in results if r and r[0] == 200]
    busy = [r for r in results if r and r[0] == 429]
    other = [r for r in results if not r or r[0] not in (200, 429)]
    figures = {
        "requests": a.requests,
        "queue": a.queue,
        "images_per_request": a.n,
        "steps": a.steps,
        "answered_200": len(ok),
        "images": sum(r[1] for r in ok),
        "refused_429": len(busy),
        "other_or_lost": len(other),
        "wall_s": round(wall, 2),
        "slowest_200_s": round(max((r[2] for r in ok), default=0), 2),
        "slowest_429_ms": round(1000 * max((r[2] for r in busy), default=0), 1),
        "server_rss_idle_mib": round(rss_idle, 1),
        "server_peak_rss_mib": round(peak, 1),
        "server_alive": alive,
        "api_model_after": after,
    }
    print(json.dumps(figures, indent=2))
    for r in other:
        print("not answered:", r, file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=2)
    lost = other or not alive or after != 200 or figures["images"] != len(ok) * a.n
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
