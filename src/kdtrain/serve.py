"""``kdtrain serve-teacher``: an OpenAI-compatible chat-completions server over a local HF causal LM.

``POST /v1/chat/completions`` and ``GET /v1/models``, served by FastAPI + uvicorn, so that
``kdtrain gen-data`` (or any OpenAI client) runs against a local teacher offline. Supported:
``messages``, ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0 = greedy),
``top_p``, ``seed``, ``logprobs`` / ``top_logprobs`` (up to 20), ``usage`` and ``finish_reason``
(``stop`` at EOS, ``length`` at ``max_tokens``). ``n > 1`` and streaming are refused with 400.

Prompts. ``messages`` go through the tokenizer's chat template when it has one, else they are
rendered as the trainer renders them (``role: content`` lines after BOS, see ``kdtrain.data``).

Batching. Requests wait in a queue; one worker takes the first and every request that arrives
until ``BATCH_GAP`` passes without one (up to ``max_batch``), and generates for the whole batch at
once on the device (left-padded prompts, a shared KV cache, per-row sampling settings), so
concurrent clients buy throughput. The gap matters: the event loop parses requests sent together
one after another, so taking only what is queued at the first one's arrival starts a batch of one
while the rest wait for it to finish. Each row samples from its own
generator seeded by its request's ``seed`` (an unseeded request draws a random seed), by inverse
CDF on its own probabilities: a seeded request gives the same text whatever it is batched with,
up to floating-point differences of the padded forward.

Log-probabilities are those of the model's own distribution (log-softmax of the raw logits, before
temperature and top-p), as vLLM returns them by default. ``usage.completion_tokens`` counts the
generated tokens including a final EOS; the EOS is not part of the content or its log-probs.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from transformers import LlamaForCausalLM

from .data import DataError, _render_prompt

MAX_TOP_LOGPROBS = 20
BATCH_GAP = 0.01  # s: a batch keeps taking requests until this passes without a new one
# transformers renamed the KV-cache argument and output field from past_key_values to cache in 5.2x.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class Message(BaseModel):
    """One chat message of a request."""

    role: str
    content: str


class ChatRequest(BaseModel):
    """The chat-completions fields this server reads; others are ignored."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-2**63, lt=2**64)  # what a torch generator takes
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    n: int = 1
    stream: bool = False


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    top_logprobs: int | None  # None: no log-probs; 0..20 alternatives per token


@dataclass
class GenResult:
    token_ids: list[int]  # generated tokens, EOS excluded
    logprobs: list[float]  # log-prob of each generated token
    top: list[list[tuple[int, float]]]  # per token, the top alternatives (id, log-prob)
    finish_reason: str  # "stop" (EOS) or "length"
    completion_tokens: int  # generated tokens, EOS included


def _choose(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Next token per row: argmax where temperature is 0, else the inverse CDF at ``u`` of the
    tempered distribution restricted to its top-p nucleus (only rows with top_p < 1 pay for a sort)."""
    probs = torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1)
    nucleus = (top_p < 1) & (temperature > 0)
    if nucleus.any():
        p_sorted, order = probs[nucleus].sort(dim=-1, descending=True)
        outside = (p_sorted.cumsum(-1) - p_sorted) >= top_p[nucleus, None]  # mass before it already reaches top_p
        probs[nucleus] = probs[nucleus].scatter(-1, order, p_sorted.masked_fill(outside, 0.0))
    cdf = probs.cumsum(-1)
    sampled = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).clamp(max=logits.shape[-1] - 1)[:, 0]
    return torch.where(temperature == 0, logits.argmax(-1), sampled)


@torch.no_grad()
def generate(model, reqs: list[GenRequest], eos_id: int, pad_id: int) -> list[GenResult]:
    """Generate for a batch of requests at once (left padding, KV cache)."""
    dev = next(model.parameters()).device
    B, S = len(reqs), max(len(r.prompt_ids) for r in reqs)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    for i, r in enumerate(reqs):
        ids[i, S - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, S - len(r.prompt_ids):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    temperature = torch.tensor([r.temperature for r in reqs], device=dev)
    top_p = torch.tensor([r.top_p for r in reqs], device=dev)
    gens = [torch.Generator().manual_seed(r.seed if r.seed is not None else random.getrandbits(63)) for r in reqs]
    k = max((r.top_logprobs or 0) for r in reqs)
    results = [GenResult([], [], [], "length", 0) for _ in reqs]
    done = [False] * B
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    for step in range(max(r.max_tokens for r in reqs)):
        logits = out.logits[:, -1].float()
        u = torch.cat([torch.rand(1, generator=g) for g in gens]).to(dev)
        nxt = _choose(logits, temperature, top_p, u)
        logp = torch.log_softmax(logits, dim=-1)
        chosen_lp = logp.gather(-1, nxt[:, None])[:, 0].tolist()
        top = logp.topk(k, dim=-1) if k else None
        top_ids, top_lps = (top.indices.tolist(), top.values.tolist()) if k else (None, None)
        for i, (r, res, tok) in enumerate(zip(reqs, results, nxt.tolist())):
            if done[i]:
                continue
            res.completion_tokens += 1
            if tok == eos_id:
                res.finish_reason, done[i] = "stop", True
                continue
            res.token_ids.append(tok)
            res.logprobs.append(chosen_lp[i])
            if r.top_logprobs:
                res.top.append(list(zip(top_ids[i][: r.top_logprobs], top_lps[i][: r.top_logprobs])))
            done[i] = step + 1 >= r.max_tokens
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                    **{CACHE_ARG: getattr(out, CACHE_ARG)})
    return results


class TokenText:
    """Each token's bytes and display text, as the OpenAI API reports them."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.memo: dict[int, bytes] = {}

    def bytes(self, tid: int) -> bytes:
        if tid not in self.memo:
            piece = self.tok.convert_ids_to_tokens(tid)
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece byte fallback
            if m:
                self.memo[tid] = bytes([int(m.group(1), 16)])
            elif "▁" in piece:  # SentencePiece marks a leading space with U+2581
                self.memo[tid] = piece.replace("▁", " ").encode()
            else:
                self.memo[tid] = self.tok.decode([tid]).encode()
        return self.memo[tid]

    def entry(self, tid: int, logprob: float) -> dict:
        b = self.bytes(tid)
        return {"token": b.decode("utf-8", errors="backslashreplace"), "bytes": list(b), "logprob": logprob}


def _error(status: int, message: str, kind: str, code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def create_app(model, tokenizer, model_name: str, max_batch: int = 32):
    """The FastAPI app serving ``model`` as ``model_name``; generation runs batch by batch in a worker."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    text = TokenText(tokenizer)
    queue: asyncio.Queue = asyncio.Queue()

    async def worker():
        while True:
            batch = [await queue.get()]
            while len(batch) < max_batch:  # polled, not a get under wait_for (its cancellation races a put: cpython#86296)
                if queue.empty():
                    await asyncio.sleep(BATCH_GAP)
                    if queue.empty():
                        break
                batch.append(queue.get_nowait())
            try:
                results = await asyncio.to_thread(generate, model, [r for r, _ in batch], tokenizer.eos_token_id,
                                                  tokenizer.pad_token_id)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the failure as a 500
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), res in zip(batch, results):
                if not fut.done():  # the client may have gone away
                    fut.set_result(res)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(worker())
        yield
        task.cancel()

    app = FastAPI(title="kdtrain serve-teacher", lifespan=lifespan)
    app.state.model_name = model_name

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":  # its loc is the character position
            return _error(400, f"invalid request: the body is not valid JSON ({first['msg']} at character "
                               f"{first['loc'][-1]}).", "invalid_request_error")
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(400, f"invalid request: {where}: {first['msg']}", "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # an unparsable body, an unknown path: same shape
        return _error(exc.status_code, f"{exc.detail}.", "invalid_request_error")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "kdtrain"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if req.model != model_name:
            return _error(404, f"The model '{req.model}' does not exist; this server serves '{model_name}'.",
                          "invalid_request_error", "model_not_found")
        if req.n != 1 or req.stream:
            return _error(400, "only n=1 without streaming is supported.", "invalid_request_error")
        try:
            prompt = _render_prompt({"messages": [m.model_dump() for m in req.messages]}, tokenizer, "request", 1)
        except DataError as e:
            return _error(400, str(e), "invalid_request_error")
        room = context - len(prompt)
        if room < 1:
            return _error(400, f"the prompt has {len(prompt)} tokens; the model's context is {context}.",
                          "invalid_request_error", "context_length_exceeded")
        max_tokens = min(req.max_completion_tokens or req.max_tokens or room, room)
        fut = asyncio.get_running_loop().create_future()
        await queue.put((GenRequest(prompt, max_tokens, req.temperature, req.top_p, req.seed,
                                    (req.top_logprobs or 0) if req.logprobs else None), fut))
        res: GenResult = await fut
        logprobs = None
        if req.logprobs:
            tops = res.top or [[]] * len(res.token_ids)
            logprobs = {"content": [{**text.entry(t, lp), "top_logprobs": [text.entry(a, alp) for a, alp in top]}
                                    for t, lp, top in zip(res.token_ids, res.logprobs, tops)]}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": tokenizer.decode(res.token_ids, skip_special_tokens=True)},
                         "logprobs": logprobs, "finish_reason": res.finish_reason}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": res.completion_tokens,
                      "total_tokens": len(prompt) + res.completion_tokens},
        }

    return app


def load_app(model_dir, tokenizer_dir=None, device: str = "auto", max_batch: int = 32, model_name: str | None = None):
    """The app over the checkpoint in ``model_dir`` (tokenizer from ``tokenizer_dir``, default ``model_dir``)."""
    from .config import ConfigError
    from .teacher import load_teacher_model, resolve_device
    from .tokenizer import load_tokenizer

    if max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {max_batch}.")
    dev = resolve_device(device)
    tok_dir = Path(tokenizer_dir or model_dir)
    if not (tok_dir / "tokenizer_config.json").is_file():
        raise ConfigError(f"{tok_dir} holds no tokenizer (no tokenizer_config.json): pass --tokenizer DIR "
                          "(for the toy teacher: --tokenizer toy/tokenizer).")
    tokenizer = load_tokenizer(tok_dir, key="--tokenizer" if tokenizer_dir else "MODEL_DIR")
    model = load_teacher_model(model_dir, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, "MODEL_DIR")
    return create_app(model, tokenizer, model_name or Path(model_dir).resolve().name, max_batch)
