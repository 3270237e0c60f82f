"""Test-only helpers for the endpoint tests: a uvicorn server on 127.0.0.1 in a thread, a fault layer
wrapped around any ASGI app (scripted faults, request counter, key check), and a deterministic
model-free chat app for runs that need speed rather than a model."""

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from collections import deque


@contextlib.contextmanager
def serve(app):
    """Run ``app`` on a free loopback port; yields the base URL ``http://127.0.0.1:PORT/v1``."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class Faults:
    """ASGI middleware: counts chat-completions requests and answers the next ones with the faults
    queued in ``script``: ``"429"`` (with ``Retry-After: retry_after``), ``"500"``, ``"timeout"`` (waits
    ``delay`` s, then answers normally), ``"malformed"`` (200 with a cut JSON body), ``"nan"`` (200 with a body that
    holds a NaN literal, which json reads and orjson refuses), ``"drop"`` (the
    connection closes mid-body), ``"echo-key"`` (400 quoting the request's Authorization header),
    ``"surrogate"`` (400 whose message holds a lone surrogate);
    ``"ok"`` answers normally. ``peak`` is the most chat-completions requests it held at once.
    With ``key`` set, a request without ``Authorization: Bearer <key>`` gets 401."""

    def __init__(self, app, key: str | None = None, delay: float = 3.0, retry_after: int = 1):
        self.app, self.key, self.delay, self.retry_after = app, key, delay, retry_after
        self.script: deque[str] = deque()
        self.count = self.active = self.peak = 0
        self.times: list[float] = []

    def reset(self, *script: str) -> None:
        self.script, self.count, self.times, self.peak = deque(script), 0, [], 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            return await self.app(scope, receive, send)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await self._chat(scope, receive, send)
        finally:
            self.active -= 1

    async def _chat(self, scope, receive, send):
        self.count += 1
        self.times.append(time.monotonic())
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        if self.key is not None and auth != f"Bearer {self.key}":
            return await _json(send, 401, {"error": {"message": "Incorrect API key provided.", "type": "auth"}})
        fault = self.script.popleft() if self.script else None
        if fault == "429":
            return await _json(send, 429, {"error": {"message": "slow down", "type": "rate_limit"}},
                               [(b"retry-after", str(self.retry_after).encode())])
        if fault == "500":
            return await _json(send, 500, {"error": {"message": "boom", "type": "server_error"}})
        if fault == "surrogate":  # JSON may escape a lone surrogate, which UTF-8 cannot encode
            return await _raw(send, 400, b'{"error": {"message": "bad \\ud800 request", "type": "invalid"}}',
                              b"application/json")
        if fault == "echo-key":
            return await _json(send, 400, {"error": {"message": f"bad request with {auth}", "type": "invalid"}})
        if fault == "malformed":
            return await _raw(send, 200, b'{"id": "x", "choices": [{"message": {"content": "cut', b"application/json")
        if fault == "nan":
            return await _raw(send, 200, b'{"id": "x", "object": "chat.completion", "created": 0, "model": "m", '
                              b'"choices": [{"index": 0, "message": {"role": "assistant", "content": "an answer"}, '
                              b'"finish_reason": "stop", "logprobs": null}], "usage": {"prompt_tokens": 3, '
                              b'"completion_tokens": 2, "total_tokens": 5}, "x_score": NaN}', b"application/json")
        if fault == "drop":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})
            await send({"type": "http.response.body", "body": b'{"id": "x", "cho', "more_body": True})
            raise ConnectionAbortedError("dropped on purpose")  # uvicorn closes the connection
        if fault == "timeout":
            await asyncio.sleep(self.delay)
        return await self.app(scope, receive, send)


async def _raw(send, status: int, body: bytes, ctype: bytes, headers=()):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def _json(send, status: int, obj: dict, headers=()):
    await _raw(send, status, json.dumps(obj).encode(), b"application/json", headers)


def fake_chat_app(delay: float = 0.0, logprobs: bool = True):
    """A chat-completions app without a model: the reply is a function of (messages, seed, temperature)
    alone, after ``delay`` seconds. A prompt containing EMPTY gets an empty reply, LONG a reply cut at
    ``max_tokens`` (finish_reason "length"). ``usage`` counts words."""
    from fastapi import FastAPI, Request

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        await asyncio.sleep(delay)
        content = body["messages"][-1]["content"]
        digest = hashlib.sha256(json.dumps([body["messages"], body.get("seed"), body.get("temperature")])
                                .encode()).hexdigest()
        words = [] if "EMPTY" in content else [f"w{digest[i:i + 4]}" for i in range(0, 4 * 6, 4)]
        finish = "stop"
        if "LONG" in content:
            words, finish = words[: body.get("max_tokens", 3)], "length"
        lp = None
        if logprobs and body.get("logprobs"):
            k = body.get("top_logprobs") or 0
            lp = {"content": [{"token": w, "bytes": list(w.encode()), "logprob": -0.5,
                               "top_logprobs": [{"token": w, "bytes": list(w.encode()), "logprob": -0.5}][:k]}
                              for w in words]}
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                             "logprobs": lp, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                          "total_tokens": prompt_tokens + len(words)}}

    return app
