"""``kdtrain gen-data`` throughput against an endpoint that answers after a fixed delay (no model).

    python bench/gen_data.py [--delay 0.2] [--concurrency 1 8 32 128] [--seconds 4] [--min-records 40]
                             [--client-cpu N [N ...]] [--processes N] [--no-aiohttp]

The server is a bare ASGI app on uvicorn in its own process; it reads the request, waits ``--delay``
and answers a fixed chat completion. Each row is one ``gen_data`` call in this process (imports and a
warm-up run done before) with ``max(--min-records, concurrency / delay * --seconds)`` prompts, and
prints:

- records/s, the ideal ``concurrency / delay`` and their ratio (goal: at least 90% up to 128);
- "procs": gen-data's client processes for the row (0: this process sends the requests; by default
  none up to 32 in flight, else one per 32; ``--processes N`` sets it);
- client CPU ms per record: the user + system time (``getrusage``) of this process and of the client
  processes over the call, divided by the records (goal: under 2 ms), then user and system apart,
  and "net": the same less the fixed CPU of a call (see below), what a record costs in a long run;
  "client %" and "server %" are the client side's and the server's CPU time over the wall time
  (100% = one core busy), which shows which one, if either, ran out of CPU (the server's read from
  /proc, "-" where there is none);
- "bare ms/req": the CPU per request of the same clients (``make_clients``, made before the clock
  starts) posting one request over and over at the same concurrency, no gen-data around them: the
  floor that the openai client and its HTTP stack set; ``--no-bare`` skips it;
- "own ms/rec": the CPU per record of the same ``gen_data`` call with clients that answer at once
  without HTTP (``Stub``): gen-data's own work (plan, cache, output, bookkeeping, and with client
  processes the messages to and from them);
- the 1-minute load average after the row (this process and the server count in it).

Before the table it prints the CPU, the clients' HTTP transport (openai's aiohttp one where aiohttp
is installed, else its default httpx one; ``--no-aiohttp`` picks the default one anyway, as where
aiohttp is missing), the fixed CPU cost of one ``gen_data`` call (a rerun that finds every record done:
clients, TLS context, prompts, output), which each row's figure includes, and the load average.
``--client-cpu N [N ...]`` pins this process and its client processes (not the server) to those CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
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


def cpu_self() -> float:
    """User + system seconds of this process and of its ended children (see ``usage``)."""
    return sum(usage())


def usage() -> tuple[float, float]:
    """(user, system) seconds of this process and of its ended children (the client processes; the
    server runs to the end)."""
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + c.ru_utime, r.ru_stime + c.ru_stime


def cpu_of(pid: int) -> float | None:
    """User + system seconds of another process, from /proc (None where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bare(cfg, n: int) -> float:
    """CPU seconds of ``n`` requests posted by gen-data's clients in a plain loop, ``cfg.concurrency`` at once."""
    from kdtrain.gendata import make_clients, sampling_params

    body = {"model": cfg.model, "messages": [{"role": "user", "content": "bench prompt 0"}],
            **sampling_params(cfg, 0)}

    async def main():
        clients = make_clients(cfg, None)
        left = [n]

        async def worker(client):
            while left[0] > 0:
                left[0] -= 1
                await client.post("/chat/completions", cast_to=bytes, body=body)

        cpu0 = cpu_self()
        await asyncio.gather(*(worker(clients[i % len(clients)]) for i in range(cfg.concurrency)))
        cpu = cpu_self() - cpu0
        for client in clients:
            await client.close()
        return cpu

    return asyncio.run(main())


class Stub:
    """A client that answers REPLY at once: gen-data's own work per record, without HTTP."""

    async def post(self, path, cast_to, body):
        await asyncio.sleep(0)
        return REPLY

    async def close(self):
        pass


def own(run, cfg) -> float:
    """CPU seconds of a ``gen_data`` call whose clients are Stubs."""
    from kdtrain import gendata

    make_clients, gendata.make_clients = gendata.make_clients, lambda cfg, key: [Stub()]
    try:
        cpu0 = cpu_self()
        run(cfg)
        return cpu_self() - cpu0
    finally:
        gendata.make_clients = make_clients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--seconds", type=float, default=4.0, help="ideal duration of each run")
    ap.add_argument("--min-records", type=int, default=40, help="records of a run at least")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare-client column")
    ap.add_argument("--client-cpu", type=int, nargs="+", default=None,
                    help="pin this process and the client processes (not the server) to these CPUs")
    ap.add_argument("--processes", type=int, default=None, help="gen-data's --processes (default: its own)")
    ap.add_argument("--no-aiohttp", action="store_true", help="openai's default httpx transport even with aiohttp")
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve is not None:
        return serve(a.serve, a.delay)

    import openai
    import tqdm  # noqa: F401 - imported before the clock starts, as in a long run

    if a.no_aiohttp:  # what openai does where aiohttp is missing
        def missing(**kwargs):
            raise RuntimeError("the aiohttp transport is off (--no-aiohttp)")

        openai.DefaultAioHttpClient = missing

    from kdtrain import gendata
    from kdtrain.gendata import GenConfig, gen_data

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--delay", str(a.delay)])
    if a.client_cpu is not None:
        os.sched_setaffinity(0, set(a.client_cpu))
    try:
        wait_for(port)
        with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet:
            def run(cfg: GenConfig) -> dict:
                with contextlib.redirect_stderr(quiet):  # the progress bar
                    return gen_data(cfg)

            def config(name: str, n: int, c: int) -> GenConfig:
                prompts = Path(tmp) / f"{name}.txt"
                prompts.write_text("".join(f"bench prompt {i}\n" for i in range(n)), encoding="utf-8")
                return GenConfig(prompts=[str(prompts)], out=f"{tmp}/{name}.jsonl", endpoint=f"http://127.0.0.1:{port}/v1",
                                 model="bench", total=n, concurrency=c, max_tokens=16, cache_dir=f"{tmp}/cache-{name}",
                                 processes=a.processes)

            warm = config("warm", 16, 8)
            run(warm)  # imports and first-use costs
            cpu0 = cpu_self()
            run(warm)  # every record done: only the fixed cost of a call
            fixed = cpu_self() - cpu0
            transport = "httpx" if isinstance(gendata._http_client(True), openai.DefaultAsyncHttpxClient) else "aiohttp"
            pinned = "" if a.client_cpu is None else f", client pinned to CPUs {a.client_cpu}"
            print(f"{cpu_name()}, {os.cpu_count()} CPUs{pinned}; Python {platform.python_version()}, openai "
                  f"{openai.__version__} ({gendata._http_module().__name__}, {transport} transport), "
                  f"{gendata.CLIENT_REQUESTS} requests per client")
            print(f"delay {a.delay * 1000:.0f} ms; fixed CPU per gen_data call {fixed * 1000:.0f} ms (included below); "
                  f"load average {os.getloadavg()[0]:.2f}")
            head = (f"{'concurrency':>11} {'procs':>5} {'records':>7} {'records/s':>9} {'ideal':>6} {'ratio':>6} "
                    f"{'CPU ms/rec':>10} {'user':>5} {'sys':>5} {'net':>5} {'client %':>8} {'server %':>8} "
                    f"{'bare ms/req':>11} {'own ms/rec':>10} {'load':>5}")
            print(head, flush=True)
            for c in a.concurrency:
                n = max(a.min_records, round(c / a.delay * a.seconds))
                cfg = config(f"c{c}", n, c)
                r0, srv0, t0 = usage(), cpu_of(server.pid), time.perf_counter()
                s = run(cfg)
                wall = time.perf_counter() - t0
                r1, srv1 = usage(), cpu_of(server.pid)
                assert s["records"] == n and s["requests"] == n, s
                user, system = r1[0] - r0[0], r1[1] - r0[1]
                srv = f"{(srv1 - srv0) / wall:.0%}" if srv0 is not None and srv1 is not None else "-"
                floor = "-" if a.no_bare else f"{bare(cfg, n) / n * 1000:.2f}"
                alone = f"{own(run, config(f's{c}', n, c)) / n * 1000:.2f}"
                ideal = c / a.delay
                print(f"{c:>11} {gendata.process_count(cfg):>5} {n:>7} {n / wall:>9.1f} {ideal:>6.0f} "
                      f"{n / wall / ideal:>6.1%} "
                      f"{(user + system) / n * 1000:>10.2f} {user / n * 1000:>5.2f} {system / n * 1000:>5.2f} "
                      f"{(user + system - fixed) / n * 1000:>5.2f} "
                      f"{(user + system) / wall:>8.0%} {srv:>8} {floor:>11} {alone:>10} {os.getloadavg()[0]:>5.2f}", flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
