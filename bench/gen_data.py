"""``kdtrain gen-data`` throughput against an endpoint that answers after a fixed delay (no model).

For each concurrency it prints records/s, the ideal ``concurrency / delay`` and their ratio (goal:
at least 90% up to 128), and the client's CPU time per record (goal: under 2 ms), measured with
``time.process_time`` around ``gen_data`` in this process; the server runs in its own process.

    python bench/gen_data.py [--delay 0.2] [--concurrency 1 8 32 128] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPLY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "a fixed answer of a few words"},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}).encode()


def serve(port: int, delay: float) -> None:
    """A bare ASGI app: read the request, wait ``delay`` seconds, answer REPLY."""
    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(delay)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(REPLY)).encode())]})
        await send({"type": "http.response.body", "body": REPLY})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", backlog=4096)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"the delay server on port {port} did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--seconds", type=float, default=4.0, help="ideal duration of each run")
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve is not None:
        return serve(a.serve, a.delay)

    import openai  # noqa: F401 - imported before the clock starts, as in a long run
    import tqdm  # noqa: F401

    from kdtrain.gendata import GenConfig, gen_data

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--delay", str(a.delay)])
    try:
        wait_for(port)
        print(f"delay {a.delay * 1000:.0f} ms, {os.cpu_count()} CPUs")
        print(f"{'concurrency':>11} {'records':>8} {'records/s':>10} {'ideal':>8} {'ratio':>6} "
              f"{'client CPU ms/rec':>18} {'retries':>8}")
        with tempfile.TemporaryDirectory() as tmp:
            for c in a.concurrency:
                n = max(10, round(c / a.delay * a.seconds))
                prompts = Path(tmp) / f"p{c}.txt"
                prompts.write_text("".join(f"bench prompt {i}\n" for i in range(n)), encoding="utf-8")
                cfg = GenConfig(prompts=[str(prompts)], out=f"{tmp}/out{c}.jsonl",
                                endpoint=f"http://127.0.0.1:{port}/v1",
                                model="bench", total=n, concurrency=c, max_tokens=16, cache_dir=f"{tmp}/cache{c}")
                cpu0, t0 = time.process_time(), time.perf_counter()
                s = gen_data(cfg)
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
                assert s["records"] == n, s
                ideal = c / a.delay
                print(f"{c:>11} {n:>8} {n / wall:>10.1f} {ideal:>8.1f} {n / wall / ideal:>6.1%} "
                      f"{cpu / n * 1000:>18.2f} {s['retries']:>8}", flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
