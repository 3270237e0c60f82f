"""``kdtrain serve-teacher`` throughput: generated tokens/s with C concurrent requests against one at
a time, on a random-init model of the toy teacher's shape or of the 1.1B shape of ``bench/throughput.py``.

The server (the real app, real uvicorn on 127.0.0.1) and the ``openai`` async client run in this
process; every request asks for ``--max-tokens`` sampled tokens (temperature 1, its own seed).

    python bench/serve_teacher.py [--model toy|1.1b] [--device auto] [--concurrency 1 32] [--requests 64]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def build(kind: str, device: torch.device, tmp: Path):
    """A random-init Llama of the toy teacher's shape or the 1.1B shape: random weights rarely emit
    EOS, so every request generates its ``--max-tokens`` (the fitted toy teacher stops after a few)."""
    from transformers import LlamaForCausalLM

    from kdtrain.config import ArchConfig
    from kdtrain.model import llama_config
    from kdtrain.tokenizer import build_toy_tokenizer
    from kdtrain.toy import TEACHER_ARCH
    from throughput import ARCH

    tok = build_toy_tokenizer(tmp / "tokenizer")
    arch = ArchConfig(**(TEACHER_ARCH if kind == "toy" else ARCH))
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(arch, pad_id=tok.pad_token_id))
    model = model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    return model.requires_grad_(False).eval(), tok


async def load(url: str, concurrency: int, n: int, max_tokens: int) -> tuple[int, float]:
    import openai

    client = openai.AsyncOpenAI(api_key="unused", base_url=url, max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with gate:
            r = await client.chat.completions.create(
                model="teacher", messages=[{"role": "user", "content": f"Tell me about the number {i}."}],
                max_tokens=max_tokens, temperature=1.0, seed=i)
            return r.usage.completion_tokens

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*[one(i) for i in range(n)]))
    await client.close()
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["toy", "1.1b"], default="toy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    import uvicorn

    from kdtrain.serve import create_app

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = build(a.model, device, Path(tmp))
        app = create_app(model, tok, "teacher", max_batch=max(a.concurrency))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
        threads = torch.get_num_threads()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({threads} threads)"
        print(f"{a.model} teacher on {name}: {a.requests} requests of {a.max_tokens} tokens")
        asyncio.run(load(url, 1, 2, 4))  # warm-up
        base = None
        for c in a.concurrency:
            tokens, wall = asyncio.run(load(url, c, a.requests, a.max_tokens))
            base = base or tokens / wall
            print(f"concurrency {c:4d}: {tokens / wall:10.1f} generated tokens/s ({tokens / wall / base:.1f}x "
                  f"concurrency {a.concurrency[0]}), {tokens} tokens in {wall:.2f} s", flush=True)
        server.should_exit = True
        thread.join()


if __name__ == "__main__":
    main()
