"""``kdtrain gen-data``: a KD JSONL dataset from prompts and a teacher behind an OpenAI-compatible
chat-completions endpoint (a hosted model, vLLM, SGLang, Ollama, or ``kdtrain serve-teacher``).

Prompts. Files ending in ``.jsonl`` / ``.json`` hold one object per line with ``prompt`` or
``messages``, optionally ``reference`` and ``source`` (default: the file's stem); other files
are plain text, one prompt per line. Prompts whose normalised text (case-folded, whitespace
collapsed) repeats an earlier one are dropped. Without ``--mix`` the prompts are used in file
order, each ``--samples-per-prompt`` times (sample ``j`` is sent with seed ``--seed + j``);
``--mix a=0.7,b=0.3`` splits ``--total`` over the sources by those ratios (largest remainder)
and draws each source's prompts in an order shuffled with ``--seed``. Asking for more records
than there are unique prompts × samples is an error, never repetition.

Records. ``id`` is ``source:index:sample`` (``index`` counts the source's prompts in file order),
so a rerun of the same command finds what is done. Output is append-only KD JSONL v1 after a
``__header__`` line naming the model, endpoint and sampling settings; records are appended as
responses arrive and flushed + fsynced every ``FLUSH_EVERY`` records or ``FLUSH_SECONDS``. On a
rerun, a torn last line is cut off and the ids already present are skipped, so a killed run
finishes with exactly ``--total`` records. Ctrl-C flushes, saves the summary and exits 130. A response cut by ``--max-tokens`` is kept with
``metadata.truncated`` (``--drop-truncated`` drops it); an empty response is dropped; each
dropped or failed request is replaced by the next prompt of the plan.

Cache. Every well-formed response is stored under ``--cache-dir`` by the sha256 of (endpoint,
model, messages, every sampling parameter), appended to segment files of the run's own (see
``Cache``), so a kill or a concurrent writer never leaves a torn entry. A cached response costs
nothing and sends no request. The API key is not part of the key and is never written anywhere.

Budget. Spend = prompt tokens × ``--price-in`` + completion tokens × ``--price-out`` (per
million), from the ``usage`` each response reports. A request is sent only if the spend so far
plus the worst case of every request in flight, including itself, stays within ``--budget``:
the worst case is ``--max-tokens`` completion tokens and a prompt bound of its UTF-8 bytes +
``TEMPLATE_TOKENS`` per message (every token of a byte-level BPE or byte-fallback SentencePiece
covers at least one byte). ``--dry-run`` prints the upper bound of the whole run's cost, with
exact prompt token counts when ``--tokenizer`` names the teacher's tokenizer, and sends nothing.

Failures. 429, 5xx, timeouts and dropped connections are retried (exponential backoff with
jitter, or the server's ``Retry-After``) up to ``--max-retries`` times; a request that still
fails, another 4xx or a malformed body goes to ``OUT.errors.jsonl`` and the run goes on. A 401,
403 or 404 (bad key, wrong model or URL) stops the run at once; so does a window of recent
requests that mostly failed. A run that stops before its first record leaves nothing behind.

Clients. Requests go through the official ``openai`` async client's generic POST, spread over one
client (with its own connection pool) per ``CLIENT_REQUESTS`` requests in flight, over openai's
aiohttp transport where aiohttp is installed (the ``gen`` extra installs it; a quarter to a third
less CPU per request) and its default httpx transport otherwise; see ``make_clients``. Past
``PROCESS_REQUESTS`` in flight the clients live in client processes, one per ``PROCESS_REQUESTS``
(``--processes``); see ``Workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import orjson

from . import align
from .config import ConfigError
from .data import DataError

MAX_LOGPROBS = 20  # the OpenAI API's limit on top_logprobs
TEMPLATE_TOKENS = 16  # prompt-bound allowance per message (and one more for the reply header)
FLUSH_EVERY, FLUSH_SECONDS = 32, 1.0
WINDOW, WINDOW_MIN_FAILS = 10, 5  # stop when >= 5 of the last 10 requests failed for good, most of them
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0
CLIENT_REQUESTS = 8  # requests in flight per client (see make_clients)
PROCESS_REQUESTS = 32  # requests in flight per client process (see Workers)


@dataclass
class GenConfig:
    """The options of ``kdtrain gen-data`` (see ``kdtrain gen-data --help``)."""

    prompts: list[str]
    out: str
    endpoint: str
    model: str
    total: int
    concurrency: int = 16
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    system: str | None = None
    samples_per_prompt: int = 1
    mix: str | None = None
    logprobs: int = 0
    budget: float | None = None
    price_in: float = 0.0
    price_out: float = 0.0
    cache_dir: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    dry_run: bool = False
    tokenizer: str | None = None
    drop_truncated: bool = False
    max_retries: int = 5
    timeout: float = 120.0
    processes: int | None = None  # client processes; None: see process_count


@dataclass
class Prompt:
    source: str
    index: int
    messages: list[dict]  # as sent, --system included
    prompt: str | None  # the plain prompt, when the input was one and no --system was added
    reference: str | None


@dataclass
class Stats:
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    errors: int = 0
    written: int = 0
    dropped_empty: int = 0
    dropped_truncated: int = 0
    truncated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spend: float = 0.0
    stopped: str | None = None
    error_reasons: Counter = field(default_factory=Counter)


class Fatal(Exception):
    """A failure every further request would repeat (bad key, unknown model or URL)."""


# ---------------------------------------------------------------- prompts and plan


def _norm(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {' '.join(m['content'].split()).casefold()}" for m in messages)


def read_prompts(paths: list[str], system: str | None = None) -> list[Prompt]:
    """Unique prompts of every file, in order; DataError naming file, line and field on bad input."""
    prompts, seen, counts = [], set(), Counter()
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"prompts file {path} does not exist (--prompts).")
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"prompts file {path} cannot be read as UTF-8 text: {e}.") from None
        is_jsonl = path.suffix in (".jsonl", ".json")
        found = 0
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            found += 1
            where = f"(file {path}, line {line_no})"
            if is_jsonl:
                rec = _parse_prompt_line(line, where)
                source = rec.get("source") or path.stem
                if "messages" in rec and "prompt" not in rec:
                    messages, text = rec["messages"], None
                else:
                    text = rec["prompt"]
                    messages = [{"role": "user", "content": text}]
                reference = rec.get("reference")
            else:
                source, text, reference = path.stem, line.strip(), None
                messages = [{"role": "user", "content": text}]
            if system is not None and messages[0]["role"] != "system":
                messages, text = [{"role": "system", "content": system}, *messages], None
            index = counts[source]
            counts[source] += 1
            key = _norm(messages)
            if key in seen:
                continue
            seen.add(key)
            prompts.append(Prompt(source, index, messages, text, reference))
        if not found:
            raise DataError(f"prompts file {path} is empty: add one prompt per line (text) or one JSON object "
                            "with 'prompt' or 'messages' per line (.jsonl).")
    return prompts


def _parse_prompt_line(line: str, where: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON {where}: {e.msg} at column {e.colno}.") from None
    except RecursionError:
        raise DataError(f"unreadable JSON {where}: nested too deeply.") from None
    except ValueError as e:  # an integer past Python's digit limit
        raise DataError(f"unreadable JSON {where}: {e}.") from None
    if not isinstance(rec, dict):
        raise DataError(f"line is not a JSON object {where}.")
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise DataError(f"field 'prompt' must be a non-empty string {where}.")
    elif "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise DataError(f"field 'messages' must be a non-empty list of {{role, content}} strings {where}.")
    else:
        raise DataError(f"missing field 'prompt' (or 'messages') {where}.")
    for key in ("reference", "source"):
        if rec.get(key) is not None and (not isinstance(rec[key], str) or not rec[key].strip()):
            raise DataError(f"field '{key}' must be a non-empty string {where}.")
    return rec


def _parse_mix(mix: str) -> dict[str, float]:
    ratios = {}
    for part in mix.split(","):
        name, _, value = part.partition("=")
        try:
            ratios[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--mix {mix!r}: '{part}' is not source=ratio (e.g. --mix math=0.7,chat=0.3).") from None
        if not name.strip() or not ratios[name.strip()] > 0:
            raise ConfigError(f"--mix {mix!r}: '{part}' needs a source name and a ratio > 0.")
    return ratios


def plan(prompts: list[Prompt], total: int, samples: int, mix: str | None, seed: int) -> list[tuple[Prompt, int]]:
    """Every (prompt, sample) the run may use, in order: the first ``total`` that succeed make the dataset."""
    if not mix:
        if total > len(prompts) * samples:
            raise DataError(f"--total {total} needs more records than the prompts give: {len(prompts)} unique "
                            f"prompts × --samples-per-prompt {samples} = {len(prompts) * samples}; add prompts "
                            "or raise --samples-per-prompt.")
        return [(p, j) for p in prompts for j in range(samples)]
    ratios = _parse_mix(mix)
    by_source: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_source.setdefault(p.source, []).append(p)
    unknown = sorted(set(ratios) - set(by_source))
    if unknown:
        raise ConfigError(f"--mix names source(s) {', '.join(unknown)} that no prompt has; the sources are "
                          f"{', '.join(sorted(by_source))} (a JSONL 'source' field, else the file's stem).")
    scale = total / sum(ratios.values())
    quota = {s: int(r * scale) for s, r in ratios.items()}
    for s in sorted(ratios, key=lambda s: (quota[s] - ratios[s] * scale, s))[: total - sum(quota.values())]:
        quota[s] += 1  # largest remainder
    jobs: dict[str, list[tuple[Prompt, int]]] = {}
    for s in sorted(ratios):
        pool = list(by_source[s])
        random.Random(f"{seed}:{s}").shuffle(pool)
        if quota[s] > len(pool) * samples:
            raise DataError(f"--mix gives source '{s}' {quota[s]} of --total {total} records but it has "
                            f"{len(pool)} unique prompts × --samples-per-prompt {samples} = {len(pool) * samples}; "
                            "add prompts, lower its ratio or raise --samples-per-prompt.")
        jobs[s] = [(p, j) for p in pool for j in range(samples)]
    # Source s's i-th job sits at (i + 0.5) / quota: the first ``total`` jobs are exactly the quotas,
    # and replacements for dropped records keep the mix.
    order = sorted(((i + 0.5) / quota[s] if quota[s] else math.inf, s, i) for s in jobs for i in range(len(jobs[s])))
    return [jobs[s][i] for _, s, i in order]


# ---------------------------------------------------------------- cache and output


def sampling_params(cfg: GenConfig, sample: int) -> dict:
    params = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
              "seed": cfg.seed + sample}
    if cfg.logprobs:
        params.update(logprobs=True, top_logprobs=cfg.logprobs)
    return params


def cache_key(endpoint: str, model: str, messages: list[dict], params: dict) -> str:
    blob = json.dumps({"endpoint": endpoint.rstrip("/"), "model": model, "messages": messages, "params": params},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class Cache:
    """Append-only segment files under ``root``, one pair per writer (a run).

    A run appends each response as one JSON line to its own ``<pid>-<random>.jsonl``, then the line's
    ``key offset length`` to ``.idx`` beside it, each with one ``write`` and no fsync: a kill -9 loses
    nothing the kernel has, and a writer never touches another's files, so concurrent runs cannot tear
    an entry. An index line is written after its entry and read only when whole (newline-terminated);
    an entry that does not parse (power loss) is a miss. A run reads every index when it starts, so it
    sees what earlier runs stored; a response that another run stores meanwhile is seen by the next
    run. Two appends per response replace a file per response (create, write, rename), whose directory
    updates were the largest CPU cost of gen-data's own per-record work (0.15 ms idle, over 1 ms with
    other jobs writing to the disk).
    """

    def __init__(self, root: Path):
        self.root = root
        self.index: dict[str, tuple[str, int, int]] = {}
        self.name = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.fds: tuple[int, int] | None = None
        self.readers: dict[str, object] = {}  # segment name -> its file, opened on the first get
        self.size = 0
        for idx in sorted(root.glob("*.idx")) if root.is_dir() else ():
            for line in idx.read_bytes().split(b"\n")[:-1]:  # the last piece is "" or a torn line
                try:
                    key, offset, length = line.decode().split()
                    self.index.setdefault(key, (idx.stem, int(offset), int(length)))
                except (UnicodeDecodeError, ValueError):  # not written through (power loss): a miss
                    continue

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> dict | None:
        where = self.index.get(key)
        if where is None:
            return None
        name, offset, length = where
        try:
            f = self.readers.get(name)
            if f is None:
                f = self.readers[name] = open(self.root / f"{name}.jsonl", "rb")
            return json.loads(os.pread(f.fileno(), length, offset))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # not written through (power loss)
            return None

    def put(self, key: str, entry: dict) -> None:
        if self.fds is None:
            self.root.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
            self.fds = (os.open(self.root / f"{self.name}.jsonl", flags, 0o644),
                        os.open(self.root / f"{self.name}.idx", flags, 0o644))
        data = json.dumps(entry, ensure_ascii=False).encode() + b"\n"
        _write_all(self.fds[0], data)
        _write_all(self.fds[1], f"{key} {self.size} {len(data)}\n".encode())
        self.index[key] = (self.name, self.size, len(data))
        self.size += len(data)

    def close(self) -> None:
        if self.fds is not None:
            for fd in self.fds:
                os.close(fd)
            self.fds = None
        for f in self.readers.values():
            f.close()
        self.readers.clear()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Output:
    """The append-only KD JSONL file: created with its header at the first record, flushed in batches."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        self.ids: set[str] = set()
        self.pending: list[str] = []
        self.last_flush = time.monotonic()
        self.f = None
        self.keep = 0  # bytes of whole lines already in the file; a torn tail is cut at the first write
        if path.exists():
            self._resume()

    def _resume(self) -> None:
        raw = self.path.read_bytes()
        self.keep = raw.rfind(b"\n") + 1  # a line without its newline was torn by a kill
        if self.keep == 0:  # killed before its first line was whole: start afresh
            return
        try:
            lines = raw[: self.keep].decode("utf-8").split("\n")[:-1]
            head = json.loads(lines[0])["__header__"]
        except (ValueError, RecursionError, KeyError, TypeError):  # not UTF-8, not JSON, too deep, huge numbers
            head = None
        if head != self.header:
            raise ConfigError(f"{self.path} exists but was not written by gen-data with this --endpoint, --model and "
                              "sampling settings; choose another --out or remove the file.")
        for n, line in enumerate(lines[1:], start=2):
            try:
                self.ids.add(json.loads(line)["id"])
            except (ValueError, RecursionError, KeyError, TypeError):
                raise DataError(f"{self.path} line {n} is not a gen-data record; the file was edited or written "
                                "by something else: choose another --out.") from None

    def add(self, rec: dict) -> None:
        self.ids.add(rec["id"])
        self.pending.append(json.dumps(rec, ensure_ascii=False) + "\n")
        if len(self.pending) >= FLUSH_EVERY or time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            os.truncate(self.path, self.keep)
            self.f = open(self.path, "a", encoding="utf-8")
            if self.keep == 0:
                self.f.write(json.dumps({"__header__": self.header}) + "\n")
        self.f.write("".join(self.pending))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.pending.clear()
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self.f is not None:
            self.f.close()


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- requests


def prompt_bound(messages: list[dict]) -> int:
    """An upper bound on the prompt's tokens for byte-covering tokenizers (see the module docstring)."""
    return sum(len(m["content"].encode()) + TEMPLATE_TOKENS for m in messages) + TEMPLATE_TOKENS


def _cost(cfg: GenConfig, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * cfg.price_in + completion_tokens * cfg.price_out) / 1e6


def _retry_after(e) -> float | None:
    headers = getattr(getattr(e, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(headers[name]) * scale
        except (KeyError, ValueError):
            continue
    return None


def _check_body(body) -> str | None:
    """Why a chat-completions body is unusable, or None."""
    try:
        choice = body["choices"][0]
        if not isinstance(choice["message"]["content"], (str, type(None))):
            return "message.content is not a string"
    except (KeyError, IndexError, TypeError):
        return "no choices[0].message.content"
    return None


def make_clients(cfg: GenConfig, key: str | None) -> list:
    """``ceil(concurrency / CLIENT_REQUESTS)`` official async clients, each with its own connection pool.

    The connection pool of the client's httpx stack checks every one of its connections (expiry, a
    readability poll) when a request starts and when one ends, so a single client serving 128 requests
    does O(128) work per request; a client per ``CLIENT_REQUESTS`` keeps that work constant. Run.run
    gives each request one of the clients' slots, so no pool ever holds more than its share. The clients
    share one TLS context, made the way the HTTP stack makes its default one: each would otherwise load
    the CA bundle, tens of ms of CPU per client.

    Where aiohttp is installed, the clients are ``openai.DefaultAioHttpClient``: openai's aiohttp
    transport under the same client, which takes a quarter to a third less CPU per request than the
    default httpx transport (no httpcore pool, h11 or anyio layers; bench/gen_data.py). Otherwise, or
    with an openai too old to offer it, they use the default transport.
    """
    import openai

    make_tls = getattr(_http_module(), "create_ssl_context", None)
    verify = make_tls() if make_tls else True
    n = -(-cfg.concurrency // CLIENT_REQUESTS)
    # Local servers need no key, but the client insists on one.
    return [openai.AsyncOpenAI(api_key=key or "unset", base_url=cfg.endpoint, max_retries=0, timeout=cfg.timeout,
                               http_client=_http_client(verify)) for _ in range(n)]


def _http_client(verify):
    """openai's aiohttp client where it can be made, else its default httpx client (same defaults)."""
    import openai

    aiohttp_client = getattr(openai, "DefaultAioHttpClient", None)  # openai 1.x added it
    if aiohttp_client is not None:
        try:
            return aiohttp_client(verify=verify)
        except RuntimeError:  # aiohttp (openai's "aiohttp" extra) is not installed
            pass
    return openai.DefaultAsyncHttpxClient(verify=verify)


def _http_module():
    """The httpx package the installed openai client is built on (``httpx2`` from openai 3, ``httpx`` before)."""
    import openai

    return sys.modules[openai.DefaultAsyncHttpxClient.__mro__[1].__module__.partition(".")[0]]


def _timed_out(e: BaseException) -> bool:
    """Whether an ``APITimeoutError`` was a timeout. openai's aiohttp transport reports every aiohttp
    connection error (a refused or dropped connection too) as a connect timeout; a real timeout has a
    ``TimeoutError`` among its causes on either transport."""
    while e is not None:
        if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


async def _request(client, cfg: GenConfig, messages: list[dict], params: dict, stats: Stats, redact):
    """(content, latency) or (None, reason) after retries; raises Fatal for failures every request would repeat."""
    import openai

    for attempt in itertools.count():
        t0 = time.monotonic()
        wait = None
        try:
            stats.requests += 1
            # The client's generic POST: its status errors, timeouts and connection handling, without
            # the typed request transform of chat.completions.create (most of its CPU per request).
            content = await client.post("/chat/completions", cast_to=bytes,
                                        body={"model": cfg.model, "messages": messages, **params})
            return content, time.monotonic() - t0
        except openai.AuthenticationError as e:
            where = "" if os.environ.get(cfg.api_key_env) else " (it is not set)"
            raise Fatal(f"the endpoint rejected the API key (401: {redact(e.message)}): set the environment "
                        f"variable {cfg.api_key_env} (--api-key-env){where} to a valid key.") from None
        except openai.PermissionDeniedError as e:
            raise Fatal(f"the endpoint refused access (403: {redact(e.message)}): check the key in "
                        f"{cfg.api_key_env} and its permissions for --model {cfg.model}.") from None
        except openai.NotFoundError as e:
            raise Fatal(f"the endpoint answered 404 ({redact(e.message)}): check --model {cfg.model} (the models "
                        f"the endpoint serves are at {cfg.endpoint.rstrip('/')}/models) and --endpoint "
                        "(it should end in /v1).") from None
        except (openai.RateLimitError, openai.InternalServerError) as e:
            reason, wait = f"{e.status_code}: {redact(e.message)}", _retry_after(e)
        except openai.APIStatusError as e:
            if e.status_code < 500 and e.status_code not in (408, 409):
                return None, f"{e.status_code}: {redact(e.message)}"
            reason, wait = f"{e.status_code}: {redact(e.message)}", _retry_after(e)
        except openai.APIConnectionError as e:  # APITimeoutError included
            if isinstance(e, openai.APITimeoutError) and _timed_out(e):
                reason = f"no answer within --timeout {cfg.timeout} s"
            else:
                cause = _root_cause(e)
                reason = f"connection failed ({type(cause).__name__}: {redact(str(cause))})"
        if attempt == cfg.max_retries:
            return None, f"{reason} (after {attempt + 1} attempts)"
        stats.retries += 1
        if wait is None:
            wait = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt) * random.uniform(0.5, 1.0)
        else:
            wait *= random.uniform(1.0, 1.1)
        await asyncio.sleep(wait)


def _parse(content: bytes) -> tuple[dict | None, str | None]:
    """(body, None) for a usable chat-completions body, else (None, why)."""
    try:  # orjson: a body with K = 20 log-probs is mostly numbers, which it reads ~5x faster
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses (NaN, lone surrogates) json reads, and the checks judge
            body = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, f"malformed JSON body from the endpoint: {e}"
    why = _check_body(body)
    return (body, None) if why is None else (None, f"malformed response: {why}")


# ---------------------------------------------------------------- client processes


def process_count(cfg: GenConfig) -> int:
    """Client processes for the run (0: this process sends the requests): ``--processes`` (at most one
    per request in flight), or by default none up to ``PROCESS_REQUESTS`` in flight, else one per
    ``PROCESS_REQUESTS`` (at most one per CPU this process may use), where they can be forked (see
    ``Workers``)."""
    if cfg.processes is not None:
        return min(cfg.processes, cfg.concurrency)
    if cfg.concurrency <= PROCESS_REQUESTS or not _can_fork():
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(-(-cfg.concurrency // PROCESS_REQUESTS), cpus)


def _can_fork() -> bool:
    """Whether this process can fork safely: the platform forks (macOS does, but its system libraries
    may crash in a forked child, which is why Python spawns there), and no other thread runs (one
    that holds a lock at the fork leaves it held in the child)."""
    return "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" \
        and threading.active_count() == 1


def _clean(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates, from a server's error message) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _frame(meta, content: bytes = b"") -> bytes:
    """A message between gen-data and a client process: two lengths, orjson ``meta``, raw ``content``."""
    m = orjson.dumps(meta)
    return struct.pack("!II", len(m), len(content)) + m + content


async def _read_frame(reader: asyncio.StreamReader) -> tuple[object, bytes]:
    m, c = struct.unpack("!II", await reader.readexactly(8))
    data = await reader.readexactly(m + c)
    return orjson.loads(data[:m]), data[m:]


class Workers:
    """Client processes that send the run's requests, for more in flight than one event loop can serve.

    One event loop spends about 1.3-1.6 ms of CPU per request on a fast core (bench/gen_data.py), most
    of it in the ``openai`` client and its HTTP stack; at 128 in flight and 200 ms a response that is
    a whole core, so the loop falls behind (82-86% of the ideal rate on a quiet Xeon; 88-92% with two
    processes, 91-94% with four). With ``n`` processes each sends its share of the requests in flight
    through its own clients (``make_clients`` over its share) and ``_request``, and answers each with
    the raw body and its latency, or the failure reason. This process counts a request when it hands
    it over; the client process tells each retry and each attempt after the first as ``_request``
    counts it (``_Told``), so the counts match those of requests sent in process, also when the run
    stops with requests in flight.

    Everything else stays here: the plan, the budget, the cache, the output and the failure window,
    so kill -9, Ctrl-C and the budget behave as with requests sent in process. A client process
    ignores SIGINT (blocked in this thread while the processes start) and exits when its socket
    closes (this process ended, however it ended); one that ends early stops the run (``Fatal``),
    and a rerun goes on. Processes are forked where ``_can_fork`` (milliseconds; nothing to import
    again); else, only when ``--processes`` asks, forked from a forkserver (which imports gen-data
    once per process that uses it, and the caller's ``__main__``: a script that calls ``gen_data``
    needs the usual ``if __name__ == "__main__":`` guard), else spawned.
    """

    def __init__(self, cfg: GenConfig, n: int, key: str | None, stats: Stats):
        methods = multiprocessing.get_all_start_methods()
        method = "fork" if _can_fork() else "forkserver" if "forkserver" in methods else "spawn"
        if method == "forkserver":  # its server imports gen-data once; each process is forked from it
            multiprocessing.get_context(method).set_forkserver_preload([__name__, "openai", "aiohttp"])
        if method == "fork":  # imported once here rather than in each process
            import openai  # noqa: F401

            with contextlib.suppress(ImportError):
                import aiohttp  # noqa: F401
        ctx = multiprocessing.get_context(method)
        self.stats = stats
        self.procs, self.socks = [], []
        self.writers: list[asyncio.StreamWriter] = []
        self.waiting: dict[int, tuple[int, asyncio.Future]] = {}  # job -> (process, its result)
        self.jobs = itertools.count()
        self.listeners: list[asyncio.Task] = []
        mask = hasattr(signal, "pthread_sigmask")
        if method != "fork":  # started now: its start unblocks SIGINT
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
        if mask:  # a Ctrl-C now waits until every process ignores it (a forkserver started now too)
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            if method == "forkserver":
                from multiprocessing import forkserver

                forkserver.ensure_running()
            for i in range(n):
                ours, theirs = socket.socketpair()
                self.socks.append(ours)
                # A forked process holds copies of this side's sockets; it closes them, or it would not
                # see the EOF when this process ends (nor would the processes forked before it).
                close = [s.fileno() for s in self.socks] if method == "fork" else []
                share = max(len(range(i, cfg.concurrency, n)), 1)
                proc = ctx.Process(target=_client_process, args=(theirs, replace(cfg, concurrency=share), key, close),
                                   name=f"gen-data client {i}", daemon=True)
                try:
                    proc.start()
                finally:
                    theirs.close()
                self.procs.append(proc)
        except BaseException:
            self.stop()
            raise
        finally:
            if mask:  # a Ctrl-C that came meanwhile is raised here, after a failed start's cleanup
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    async def start(self) -> None:
        for i, sock in enumerate(self.socks):
            reader, writer = await asyncio.open_connection(sock=sock)
            self.writers.append(writer)
            self.listeners.append(asyncio.create_task(self._listen(i, reader)))

    def _ended(self, i: int) -> Fatal:
        return Fatal(f"gen-data's client process {i} ended (exit code {self.procs[i].exitcode}); rerun the same "
                     "command to continue.")

    async def _listen(self, i: int, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                meta, content = await _read_frame(reader)
                if meta[1] in ("requests", "retries"):  # counted as it happens (see _Told)
                    setattr(self.stats, meta[1], getattr(self.stats, meta[1]) + 1)
                    continue
                _, fut = self.waiting.pop(meta[0], (None, None))
                if fut is not None and not fut.done():
                    fut.set_result((meta, content))
        except Exception as e:  # noqa: BLE001 - the process ended (EOF), or a frame was unreadable
            await asyncio.to_thread(self.procs[i].join, 1.0)
            error = self._ended(i) if isinstance(e, (asyncio.IncompleteReadError, OSError)) else \
                Fatal(f"gen-data's client process {i} sent an unreadable message ({type(e).__name__}: {e}).")
            for j, fut in list(self.waiting.values()):
                if j == i and not fut.done():
                    fut.set_exception(error)

    async def request(self, i: int, messages: list[dict], params: dict):
        """As ``_request``, sent by client process ``i``."""
        if self.listeners[i].done():
            raise self._ended(i)
        job, fut = next(self.jobs), asyncio.get_running_loop().create_future()
        self.waiting[job] = (i, fut)
        self.stats.requests += 1
        try:
            self.writers[i].write(_frame([job, messages, params]))
            (_, kind, info), content = await fut
        finally:
            self.waiting.pop(job, None)
        if kind == "fatal":
            raise Fatal(info)
        return (content, info) if kind == "ok" else (None, info)

    async def aclose(self) -> None:
        for writer in self.writers:
            writer.close()
        for task in self.listeners:
            task.cancel()
        await asyncio.gather(*self.listeners, return_exceptions=True)

    def stop(self) -> None:
        """Close the sockets (each process exits at the EOF) and wait; terminate what lingers."""
        for sock in self.socks:
            sock.close()
        deadline = time.monotonic() + 10.0
        for proc in self.procs:
            proc.join(timeout=max(deadline - time.monotonic(), 0.1))
            if proc.is_alive():
                proc.terminate()
                proc.join()


class _Told(Stats):
    """A client process's counts for one request: each retry, and each attempt after the first (the main
    process counted that one when it handed the request over), is told to the main process at once."""

    def __init__(self, job: int, writer: asyncio.StreamWriter):
        super().__init__()
        self.job, self.writer = job, writer

    def __setattr__(self, name: str, value) -> None:
        if name == "retries" and value > 0 or name == "requests" and value > 1:
            self.writer.write(_frame([self.job, name]))
        super().__setattr__(name, value)


def _client_process(sock: socket.socket, cfg: GenConfig, key: str | None, close: list[int]) -> None:
    """The body of a client process (see Workers): requests in, results out, until the socket closes.
    ``key`` is the main process's API key (a forkserver's environment is that of its start)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    for fd in close:
        os.close(fd)
    if key is None:
        os.environ.pop(cfg.api_key_env, None)
    else:
        os.environ[cfg.api_key_env] = key

    def redact(text: str) -> str:
        return text.replace(key, "***") if key else text

    async def main():
        reader, writer = await asyncio.open_connection(sock=sock)
        clients = make_clients(cfg, key)
        free = deque(clients[i % len(clients)] for i in range(cfg.concurrency))
        tasks = set()

        async def one(job: int, messages: list[dict], params: dict) -> None:
            client, content = free.popleft() if free else clients[job % len(clients)], b""
            try:
                content, info = await _request(client, cfg, messages, params, _Told(job, writer), redact)
                kind = "fail" if content is None else "ok"
            except Fatal as e:
                kind, info = "fatal", str(e)
            except Exception as e:  # noqa: BLE001 - told to the main process, which stops the run
                kind, info = "fatal", f"gen-data's client process failed: {type(e).__name__}: {redact(str(e))}"
            finally:
                free.append(client)
            try:
                reply = _frame([job, kind, _clean(info) if isinstance(info, str) else info], content or b"")
            except Exception as e:  # noqa: BLE001 - a reply always comes, or the main process would wait
                reply = _frame([job, "fatal", f"gen-data's client process cannot answer: {type(e).__name__}"])
            writer.write(reply)

        try:
            while True:
                try:
                    (job, messages, params), _ = await _read_frame(reader)
                except (asyncio.IncompleteReadError, OSError):
                    break
                task = asyncio.create_task(one(job, messages, params))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in clients:
                await client.close()
            writer.close()

    asyncio.run(main())


# ---------------------------------------------------------------- the run


class Run:
    """One gen-data run: the plan, the output, the cache, the counters."""

    def __init__(self, cfg: GenConfig, jobs: list[tuple[Prompt, int]]):
        self.cfg = cfg
        self.host = urlparse(cfg.endpoint).netloc or cfg.endpoint
        header = {"format": "kd-jsonl-v1", "generator": "kdtrain gen-data", "model": cfg.model,
                  "endpoint_host": self.host, "sampling": sampling_params(cfg, 0)}
        self.out = Output(Path(cfg.out), header)
        self.errors_path = Path(cfg.out).with_name(Path(cfg.out).name + ".errors.jsonl")
        self.cache = Cache(Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out).parent / ".gen-data-cache")
        self.stats = Stats()
        self.already = len(self.out.ids)
        self.jobs = [(p, j) for p, j in jobs if self._id(p, j) not in self.out.ids]
        self.warned_logprobs = False
        self.recent: deque[bool] = deque(maxlen=WINDOW)
        self.t0 = time.monotonic()

    @staticmethod
    def _id(p: Prompt, j: int) -> str:
        return f"{p.source}:{p.index}:{j}"

    def _key(self, p: Prompt, j: int) -> str:
        return cache_key(self.cfg.endpoint, self.cfg.model, p.messages, sampling_params(self.cfg, j))

    def _record(self, p: Prompt, j: int, entry: dict, cached: bool) -> dict | None:
        """The KD JSONL record of a response, or None when it is dropped."""
        body = entry["response"]
        choice = body["choices"][0]
        text, finish, usage = choice["message"]["content"] or "", choice.get("finish_reason"), body.get("usage")
        if not text.strip():
            self.stats.dropped_empty += 1
            return None
        truncated = finish == "length"
        if truncated and self.cfg.drop_truncated:
            self.stats.dropped_truncated += 1
            return None
        self.stats.truncated += truncated
        rec = {"id": self._id(p, j)}
        rec.update({"prompt": p.prompt} if p.prompt is not None else {"messages": p.messages})
        rec["teacher_text"] = text
        if p.reference is not None:
            rec["reference"] = p.reference
        if self.cfg.logprobs:
            content = (choice.get("logprobs") or {}).get("content")
            if content:  # packed (align.pack_api_logprobs): a tenth of the JSON to decode, lossless
                try:
                    rec["teacher_api_logprobs"] = align.pack_api_logprobs(content)
                except align.AlignError:  # what the packed form cannot hold (no bytes, K varying, ...):
                    rec["teacher_api_logprobs"] = content  # kept as returned; annotate names file, line, position
            elif not self.warned_logprobs:
                self.warned_logprobs = True
                print(f"warning: the endpoint returned no logprobs for --logprobs {self.cfg.logprobs}; "
                      "writing text-only records.", flush=True)
        rec["metadata"] = {"source": p.source, "model": self.cfg.model, "endpoint_host": self.host,
                           "sampling": sampling_params(self.cfg, j), "usage": usage, "finish_reason": finish,
                           "truncated": truncated, "latency_s": entry["latency_s"], "timestamp": entry["timestamp"],
                           "cached": cached}
        return rec

    def _accept(self, p: Prompt, j: int, entry: dict, cached: bool) -> None:
        rec = self._record(p, j, entry, cached)
        if rec is not None:
            self.out.add(rec)
            self.stats.written += 1

    def _charge(self, body: dict) -> None:
        usage = body.get("usage") or {}
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(pt, int) or not isinstance(ct, int):
            if self.cfg.budget is not None:
                raise Fatal("the endpoint reports no usage (prompt_tokens, completion_tokens), so spend cannot be "
                            "measured: drop --budget for this endpoint.")
            return
        self.stats.prompt_tokens += pt
        self.stats.completion_tokens += ct
        self.stats.spend += _cost(self.cfg, pt, ct)

    def _fail(self, p: Prompt, j: int, reason: str) -> None:
        reason = _clean(reason)
        self.stats.errors += 1
        self.stats.error_reasons[reason.split(" (after")[0][:120]] += 1
        _append_jsonl(self.errors_path, {"id": self._id(p, j), "source": p.source, "reason": reason,
                                         "timestamp": datetime.now(timezone.utc).isoformat()})
        self.recent.append(False)
        fails = self.recent.count(False)
        if fails >= WINDOW_MIN_FAILS and fails > len(self.recent) / 2:
            common = self.stats.error_reasons.most_common(1)[0][0]
            raise Fatal(f"{fails} of the last {len(self.recent)} requests failed (most often: {common}); "
                        f"check --endpoint {self.cfg.endpoint} and --model {self.cfg.model}. Details in "
                        f"{self.errors_path}.")

    async def run(self, senders: list, bar) -> None:
        """Send the plan's requests through ``senders`` (each ``await send(messages, params)`` gives what
        ``_request`` gives: a client of this process, or a client process)."""
        cfg, stats = self.cfg, self.stats
        pending = deque(self.jobs)
        # One slot per request in flight, spread over the senders; a request holds its slot through its
        # retries and gives it back when it ends, so no sender ever has more than its share in flight.
        free = deque(senders[i % len(senders)] for i in range(cfg.concurrency))
        in_flight: dict[asyncio.Task, tuple[Prompt, int, str, float, object]] = {}
        finished: asyncio.Queue = asyncio.Queue()  # tasks land here as they end: O(1) per request
        reserved, shown = 0.0, 0.0
        try:
            while True:
                while pending and len(in_flight) < cfg.concurrency and \
                        self.already + stats.written + len(in_flight) < cfg.total:
                    p, j = pending[0]
                    key = self._key(p, j)
                    entry = self.cache.get(key)
                    if entry is not None:
                        pending.popleft()
                        stats.cache_hits += 1
                        self._accept(p, j, entry, cached=True)
                        bar.update(self.already + stats.written - bar.n)
                        continue
                    worst = _cost(cfg, prompt_bound(p.messages), cfg.max_tokens)
                    if cfg.budget is not None and stats.spend + reserved + worst > cfg.budget:
                        if not in_flight:
                            stats.stopped = "budget"
                        break
                    pending.popleft()
                    reserved += worst
                    send = free.popleft()
                    task = asyncio.create_task(send(p.messages, sampling_params(cfg, j)))
                    task.add_done_callback(finished.put_nowait)
                    in_flight[task] = (p, j, key, worst, send)
                if not in_flight:
                    break
                done = [await finished.get()]
                while not finished.empty():
                    done.append(finished.get_nowait())
                for task in done:
                    p, j, key, worst, send = in_flight.pop(task)
                    free.append(send)
                    reserved -= worst
                    content, info = task.result()
                    body, why = _parse(content) if content is not None else (None, info)
                    if body is None:
                        self._fail(p, j, why)
                        continue
                    self.recent.append(True)
                    self._charge(body)
                    entry = {"response": body, "latency_s": round(info, 4),
                             "timestamp": datetime.now(timezone.utc).isoformat()}
                    self.cache.put(key, entry)
                    self._accept(p, j, entry, cached=False)
                bar.update(self.already + stats.written - bar.n)
                if time.monotonic() - shown > 0.5:
                    bar.set_postfix_str(self._postfix(), refresh=False)
                    shown = time.monotonic()
            bar.set_postfix_str(self._postfix())
            if stats.stopped is None and self.already + stats.written < cfg.total:
                stats.stopped = "out of prompts"
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            self.out.close()
            self.cache.close()

    def _postfix(self) -> str:
        s, dt = self.stats, max(time.monotonic() - self.t0, 1e-9)
        return (f"req/s {s.requests / dt:.1f} tok/s {(s.prompt_tokens + s.completion_tokens) / dt:.0f} "
                f"spend {s.spend:.4f} cache {s.cache_hits} retries {s.retries} errors {s.errors}")

    def summary(self) -> dict:
        s, dt = self.stats, time.monotonic() - self.t0
        return {"out": str(self.cfg.out), "records": len(self.out.ids), "total": self.cfg.total,
                "written_now": s.written, "requests": s.requests, "cache_hits": s.cache_hits, "retries": s.retries,
                "errors": s.errors, "errors_file": str(self.errors_path) if s.errors else None,
                "dropped_empty": s.dropped_empty, "dropped_truncated": s.dropped_truncated,
                "truncated": s.truncated, "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                "spend": s.spend, "budget": self.cfg.budget, "price_in": self.cfg.price_in,
                "price_out": self.cfg.price_out, "elapsed_s": round(dt, 3),
                "requests_per_s": round(s.requests / dt, 3) if dt else None,
                "tokens_per_s": round((s.prompt_tokens + s.completion_tokens) / dt, 1) if dt else None,
                "stopped": s.stopped, "sampling": sampling_params(self.cfg, 0), "model": self.cfg.model,
                "endpoint_host": self.host}


def _validate(cfg: GenConfig) -> None:
    checks = [
        (cfg.total >= 1, f"--total must be at least 1, got {cfg.total}."),
        (cfg.concurrency >= 1, f"--concurrency must be at least 1, got {cfg.concurrency}."),
        (cfg.max_tokens >= 1, f"--max-tokens must be at least 1, got {cfg.max_tokens}."),
        (0 <= cfg.temperature <= 2, f"--temperature must be in [0, 2], got {cfg.temperature}."),
        (0 < cfg.top_p <= 1, f"--top-p must be in (0, 1], got {cfg.top_p}."),
        (cfg.samples_per_prompt >= 1, f"--samples-per-prompt must be at least 1, got {cfg.samples_per_prompt}."),
        (0 <= cfg.logprobs <= MAX_LOGPROBS, f"--logprobs must be in [0, {MAX_LOGPROBS}] (the API's limit), got "
                                            f"{cfg.logprobs}."),
        (cfg.price_in >= 0 and cfg.price_out >= 0, "--price-in and --price-out must be >= 0 (per million tokens)."),
        (cfg.budget is None or cfg.budget >= 0, f"--budget must be >= 0, got {cfg.budget}."),
        (cfg.budget is None or cfg.price_in > 0 or cfg.price_out > 0,
         "--budget needs --price-in and/or --price-out (per million tokens) to measure spend."),
        (cfg.max_retries >= 0, f"--max-retries must be >= 0, got {cfg.max_retries}."),
        (cfg.timeout > 0, f"--timeout must be > 0 seconds, got {cfg.timeout}."),
        (cfg.processes is None or cfg.processes >= 0, f"--processes must be >= 0, got {cfg.processes}."),
        (urlparse(cfg.endpoint).scheme in ("http", "https"),
         f"--endpoint {cfg.endpoint!r} must be an http(s) URL, e.g. http://127.0.0.1:8000/v1."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def dry_run(cfg: GenConfig, run: Run) -> dict:
    """The upper bound of the run's cost; nothing is sent or written."""
    todo = run.jobs[: max(cfg.total - run.already, 0)]
    tok = None
    if cfg.tokenizer:
        from .data import _render_prompt
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
    uncached = [p for p, j in todo if run._key(p, j) not in run.cache]
    cached, sends = len(todo) - len(uncached), len(uncached)
    prompt_tokens = sum(len(_render_prompt({"messages": p.messages}, tok, "prompts", 0)) if tok else
                        prompt_bound(p.messages) for p in uncached)
    info = {"records_planned": cfg.total, "already_in_output": run.already, "cached": cached, "requests": sends,
            "prompt_tokens_max": prompt_tokens, "completion_tokens_max": sends * cfg.max_tokens,
            "prompt_tokens_from": f"tokenizer {cfg.tokenizer}" if tok else
            f"UTF-8 bytes + {TEMPLATE_TOKENS} per message (an upper bound)",
            "cost_max": _cost(cfg, prompt_tokens, sends * cfg.max_tokens)}
    return info


def gen_data(cfg: GenConfig) -> dict:
    """Run ``kdtrain gen-data``; returns the summary (also saved as ``OUT.summary.json``)."""
    _validate(cfg)
    jobs = plan(read_prompts(cfg.prompts, cfg.system), cfg.total, cfg.samples_per_prompt, cfg.mix, cfg.seed)
    run = Run(cfg, jobs)
    if cfg.dry_run:
        return dry_run(cfg, run)
    for option, path in (("--out", run.out.path.parent), ("--cache-dir", run.cache.root)):
        existing = path.absolute()
        while not existing.exists():  # the directories are made at the first write
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ConfigError(f"{option}: {path} cannot be written ({existing} is not a writable directory).")
    key = os.environ.get(cfg.api_key_env)

    def redact(text: str) -> str:  # servers may echo the key in an error message
        return text.replace(key, "***") if key else text

    n = process_count(cfg) if run.jobs and run.already < cfg.total else 0
    workers = None

    async def main():
        from tqdm import tqdm

        class Bar(tqdm):
            monitor_interval = 0  # no monitor thread, which would outlive the bar: a later run could not fork

        if workers:
            await workers.start()
            senders, clients = [functools.partial(workers.request, i) for i in range(n)], []
        else:
            clients = make_clients(cfg, key)
            senders = [functools.partial(_request, c, cfg, stats=run.stats, redact=redact) for c in clients]
        with Bar(total=cfg.total, initial=run.already, unit="rec", desc="gen-data", mininterval=0.5) as bar:
            try:
                await run.run(senders, bar)
            finally:
                for client in clients:
                    await client.close()
                if workers:
                    await workers.aclose()

    try:
        if n:  # forked before the event loop and the progress bar's thread
            workers = Workers(cfg, n, key, run.stats)
        asyncio.run(main())
    except KeyboardInterrupt:  # the output was flushed as the tasks were cancelled
        run.stats.stopped = "interrupted"
        if run.out.path.exists():
            _write_json(run.out.path.with_name(run.out.path.name + ".summary.json"), run.summary())
        print(f"\ninterrupted with {len(run.out.ids)} of {cfg.total} records in {cfg.out}; rerun the same command "
              "to continue.", file=sys.stderr)
        raise SystemExit(130) from None
    except Fatal as e:
        run.stats.stopped = "failures"
        if run.out.path.exists():
            _write_json(run.out.path.with_name(run.out.path.name + ".summary.json"), run.summary())
        raise ConfigError(f"{e} Stopped with {len(run.out.ids)} of {cfg.total} records in {cfg.out}.") from None
    finally:
        if workers:
            workers.stop()
    summary = run.summary()
    if run.out.path.exists():
        _write_json(run.out.path.with_name(run.out.path.name + ".summary.json"), summary)
    return summary
