"""``kdtrain gen-data`` against real uvicorn servers on 127.0.0.1 with the official ``openai`` client:
the toy teacher (``serve-teacher``'s app) or a model-free deterministic app, each behind a fault
layer that counts requests and injects 429 / 500 / timeouts / malformed bodies / dropped
connections / 401."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from loopback import Faults, fake_chat_app, serve  # noqa: E402

from kdtrain import align  # noqa: E402
from kdtrain.cli import main  # noqa: E402
from kdtrain.data import load_dataset  # noqa: E402
from kdtrain.gendata import Cache, plan, read_prompts  # noqa: E402

KEY = "sk-test-6f1d2c9e8a7b4d3c"


@pytest.fixture(scope="module")
def toy_server(toy):
    from kdtrain.serve import load_app

    faults = Faults(load_app(toy["teacher"], toy["tokenizer"], "cpu", max_batch=16, model_name="toy"), key=KEY)
    with serve(faults) as url:
        yield url, faults


@pytest.fixture(scope="module")
def fake_server():
    faults = Faults(fake_chat_app(), key=KEY, delay=1.5)
    with serve(faults) as url:
        yield url, faults


@pytest.fixture(params=["aiohttp", "httpx"])
def transport(request, monkeypatch):
    """gen-data's clients over openai's aiohttp transport (aiohttp installed) and over its default httpx
    transport, as where aiohttp is missing: ``openai.DefaultAioHttpClient`` raises RuntimeError then."""
    import openai

    if request.param == "aiohttp":
        pytest.importorskip("aiohttp")
    else:
        def missing(**kwargs):
            raise RuntimeError("To use the aiohttp client you must have installed the package with the `aiohttp` extra")

        monkeypatch.setattr(openai, "DefaultAioHttpClient", missing)
    return request.param


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("KD_TEST_KEY", KEY)


def _prompts(path: Path, n: int, start: int = 0) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i + 1}?", "reference": str(2 * i + 1)}) + "\n"
                            for i in range(start, start + n)), encoding="utf-8")
    return path


def _gen(url, prompts, out, total, *extra) -> list[str]:
    return ["gen-data", "--prompts", *map(str, prompts), "--out", str(out), "--endpoint", url, "--total", str(total),
            "--api-key-env", "KD_TEST_KEY", *map(str, extra)]


def _records(out: Path) -> list[dict]:
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # every line complete
    recs = [json.loads(line) for line in lines[:-1]]
    assert "__header__" in recs[0]
    return recs[1:]


@pytest.mark.smoke
def test_toy_pipeline_serve_gen_data_train(toy_server, tokenizer, tmp_path, make_cfg):
    url, faults = toy_server
    faults.reset()
    prompts = _prompts(tmp_path / "prompts.jsonl", 30)
    out = tmp_path / "kd.jsonl"
    assert main(_gen(url, [prompts], out, 24, "--model", "toy", "--max-tokens", 8, "--concurrency", 8,
                     "--logprobs", 2)) == 0
    recs = _records(out)
    assert len(recs) == 24 and len({r["id"] for r in recs}) == 24
    assert faults.count == 24
    assert all(r["teacher_text"].strip() and r["reference"] and r["metadata"]["usage"] for r in recs)
    assert len(load_dataset([out], tokenizer, 32000)) == 24
    cfg = make_cfg(f"io.train_shards=[{out}]", f"io.val_shards=[{out}]", "train.steps=3", "kd.teacher=none",
                   "distillation.kl_weight=0", "distillation.ce_ground_truth_weight=0")
    from kdtrain.trainer import Trainer

    rows = Trainer(cfg, log=False).fit()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["ce_teacher"] > 0 for r in rows)


def test_endpoint_log_probs_become_a_kl_signal(toy_server, toy, tokenizer, tmp_path, make_cfg, capsys):
    """The front end to end: gen-data --logprobs from the served toy teacher (packed log-probs) ->
    annotate without a teacher -> training with kl_div. The toy teacher shares the student's
    tokenizer, so every response token aligns and each row's first id is the greedy token; the EOS
    that closes each response has no endpoint log-prob (cut by --max-tokens), so no row."""
    url, faults = toy_server
    faults.reset()
    prompts = _prompts(tmp_path / "prompts.jsonl", 12)
    out, annotated = tmp_path / "kd.jsonl", tmp_path / "annotated.jsonl"
    assert main(_gen(url, [prompts], out, 8, "--model", "toy", "--max-tokens", 6, "--temperature", 0,
                     "--logprobs", 4)) == 0
    assert all(set(r["teacher_api_logprobs"]) >= {"k", "vocab", "token", "top_token"} for r in _records(out))
    assert {r["teacher_api_logprobs"]["float"] for r in _records(out)} == {"f4"}  # the server's float32 log-softmax
    capsys.readouterr()
    assert main(["annotate", str(out), str(annotated), "--tokenizer", str(toy["tokenizer"])]) == 0
    recs = _records(annotated)
    assert len(recs) == 8
    aligned = positions = 0
    for rec in recs:
        *rows, eos = rec["teacher_topk"]["ids"]
        assert eos is None and rec["response_ids"][-1] == tokenizer.eos_token_id
        assert all(row is not None and len(row) == 4 for row in rows)
        assert [row[0] for row in rows] == rec["response_ids"][:-1]
        aligned, positions = aligned + len(rows), positions + len(rows) + 1
    assert f"{aligned}/{positions} response positions aligned" in capsys.readouterr().err
    cfg = make_cfg(f"io.train_shards=[{annotated}]", "io.val_shards=[]", "train.steps=2", "kd.teacher=topk",
                   "distillation.kl_weight=1", "distillation.ce_ground_truth_weight=0")
    from kdtrain.trainer import Trainer

    rows = Trainer(cfg, log=False, tokenizer=tokenizer).fit()
    assert all(r["kl_div"] > 0 and math.isfinite(r["kl_div"]) for r in rows)


def test_prompts_dedup_sources_ids_and_formats(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("Hello  there\n\nsecond prompt\nhello there\n", encoding="utf-8")
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"prompt": "SECOND   prompt"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "source": "chat", "reference": "yo"}) + "\n", encoding="utf-8")
    ps = read_prompts([a, b], system="Be brief.")
    assert [(p.source, p.index) for p in ps] == [("a", 0), ("a", 1), ("chat", 0)]
    assert ps[2].reference == "yo" and ps[2].prompt is None
    assert ps[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello  there"}]
    assert [p.prompt for p in read_prompts([a])] == ["Hello  there", "second prompt"]


def test_mix_splits_total_by_ratio_seeded(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{s} question {i}", "source": s}) + "\n"
                         for s, n in (("math", 40), ("chat", 40), ("code", 10)) for i in range(n)), encoding="utf-8")
    prompts = read_prompts([f])
    jobs = plan(prompts, 20, 1, "math=0.5,chat=0.3,code=0.2", seed=3)
    first = [p.source for p, _ in jobs[:20]]
    assert {s: first.count(s) for s in set(first)} == {"math": 10, "chat": 6, "code": 4}
    assert [p.index for p, _ in jobs] == [p.index for p, _ in plan(prompts, 20, 1, "math=0.5,chat=0.3,code=0.2", 3)]
    assert [p.index for p, _ in jobs] != [p.index for p, _ in plan(prompts, 20, 1, "math=0.5,chat=0.3,code=0.2", 4)]
    with pytest.raises(Exception, match="source 'code' 20 of --total 40 .* 10 unique prompts"):
        plan(prompts, 40, 1, "math=1,code=1", 0)
    with pytest.raises(Exception, match="--mix names source.*poetry"):
        plan(prompts, 10, 1, "poetry=1", 0)
    with pytest.raises(Exception, match="--total 91 .* 90 unique prompts"):
        plan(prompts, 91, 1, None, 0)
    assert len(plan(prompts, 91, 2, None, 0)) == 180


@pytest.mark.parametrize("case", ["missing", "empty", "malformed", "deep", "bigint", "no-prompt", "total0", "budget",
                                  "few", "processes"])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path, capsys):
    good = _prompts(tmp_path / "p.jsonl", 3)
    bad = tmp_path / "bad.jsonl"
    args = {"missing": ([tmp_path / "nope.txt"], 2), "empty": ([bad], 2), "malformed": ([good, bad], 2),
            "deep": ([good, bad], 2), "bigint": ([good, bad], 2),
            "no-prompt": ([bad], 2), "total0": ([good], 0), "budget": ([good], 2), "few": ([good], 4),
            "processes": ([good], 2)}[case]
    bad.write_text({"empty": "\n\n", "malformed": '{"prompt": "a"}\n{"prompt": "b"\n',
                    "deep": '{"prompt": "a"}\n{"prompt": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
                    "bigint": '{"prompt": "a"}\n{"prompt": "b", "x": ' + "9" * 5000 + "}\n",
                    "no-prompt": '{"text": "a"}\n'}.get(case, ""), encoding="utf-8")
    extra = {"budget": ["--budget", "ten", "--price-in", "1"], "processes": ["--processes", "-1"]}.get(case, [])
    out = tmp_path / "out.jsonl"
    expect = {"missing": "nope.txt does not exist", "empty": "bad.jsonl is empty", "malformed": "line 2)",
              "deep": "nested too deeply", "bigint": "integer string conversion",
              "no-prompt": "missing field 'prompt'", "total0": "--total must be at least 1",
              "budget": "--budget: invalid float value: 'ten'", "few": "--total 4 needs more",
              "processes": "--processes must be >= 0, got -1"}[case]
    try:
        code = main(_gen("http://127.0.0.1:9/v1", args[0], out, args[1], "--model", "m", *extra))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert expect in err
    if case in ("malformed", "deep", "bigint"):
        assert str(bad) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["p.jsonl", "bad.jsonl"])


def test_faults_are_retried_and_failures_logged(fake_server, tmp_path, capsys, transport):
    url, faults = fake_server
    prompts = _prompts(tmp_path / "p.jsonl", 10)
    out = tmp_path / "out.jsonl"
    faults.reset("429", "ok", "500", "ok", "drop", "ok", "timeout", "ok", "malformed")  # each retry succeeds
    args = _gen(url, [prompts], out, 5, "--model", "m", "--concurrency", 1, "--timeout", 0.5, "--temperature", 0)
    assert main(args) == 0
    recs = _records(out)
    assert len(recs) == 5 and len({r["id"] for r in recs}) == 5
    # 4 faults and their retries + 1 malformed body (logged, replaced by the next prompt) + 1 more answer.
    assert faults.count == 10
    assert faults.times[1] - faults.times[0] >= 1.0  # Retry-After: 1 honoured
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert (summary["retries"], summary["errors"], summary["requests"]) == (4, 1, 10)
    errors = [json.loads(x) for x in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and "malformed" in errors[0]["reason"]
    assert errors[0]["id"] not in {r["id"] for r in recs}


def test_a_body_only_json_reads_is_a_record(fake_server, tmp_path):
    """A body orjson refuses but json reads (a NaN literal in a field gen-data does not use) is
    read, not logged as malformed."""
    url, faults = fake_server
    faults.reset("nan")
    out = tmp_path / "out.jsonl"
    assert main(_gen(url, [_prompts(tmp_path / "p.jsonl", 3)], out, 1, "--model", "m", "--concurrency", 1)) == 0
    [rec] = _records(out)
    assert rec["teacher_text"] == "an answer" and faults.count == 1
    assert not (tmp_path / "out.jsonl.errors.jsonl").exists()


def test_a_closed_connection_and_a_timeout_are_told_apart(fake_server, tmp_path, transport):
    """Without retries each failure is logged with its reason: a timeout, a connection cut mid-body and one
    closed before any answer (which openai's aiohttp transport reports as a connect timeout)."""
    import socket
    import threading

    url, faults = fake_server
    faults.reset("timeout", "drop")
    out = tmp_path / "out.jsonl"
    args = ["--model", "m", "--concurrency", 1, "--timeout", 0.5, "--max-retries", 0]
    assert main(_gen(url, [_prompts(tmp_path / "p.jsonl", 3)], out, 1, *args)) == 0 and len(_records(out)) == 1
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert reasons[0] == "no answer within --timeout 0.5 s (after 1 attempts)"
    assert reasons[1].startswith("connection failed (") and len(reasons) == 2

    with socket.create_server(("127.0.0.1", 0)) as closer:  # reads a request, closes without an answer
        def close_each():
            while True:
                try:
                    conn, _ = closer.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(65536)

        threading.Thread(target=close_each, daemon=True).start()
        endpoint = f"http://127.0.0.1:{closer.getsockname()[1]}/v1"
        assert main(_gen(endpoint, [_prompts(tmp_path / "q.jsonl", 9)], tmp_path / "closed.jsonl", 1, *args)) == 2
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "closed.jsonl.errors.jsonl").read_text().splitlines()]
    assert len(reasons) == 5 and all(r.startswith("connection failed (") for r in reasons)


@pytest.mark.parametrize("case", ["bad-key", "wrong-model", "dead-endpoint", "most-fail"])
def test_failures_every_request_repeats_stop_once_and_write_nothing(case, fake_server, toy_server, tmp_path, capsys,
                                                                    monkeypatch, transport):
    url, faults = toy_server if case == "wrong-model" else fake_server
    faults.reset(*(["echo-key"] * 20 if case == "most-fail" else []))
    if case == "bad-key":
        monkeypatch.setenv("KD_TEST_KEY", "sk-wrong-key")
    prompts = _prompts(tmp_path / "p.jsonl", 20)
    endpoint = "http://127.0.0.1:9/v1" if case == "dead-endpoint" else url
    model = "nope" if case == "wrong-model" else "m"
    code = main(_gen(endpoint, [prompts], tmp_path / "out.jsonl", 5, "--model", model, "--max-retries", 1,
                     "--concurrency", 2))
    assert code == 2
    err = capsys.readouterr().err
    expect = {"bad-key": "set the environment variable KD_TEST_KEY", "wrong-model": "check --model nope",
              "dead-endpoint": "connection failed", "most-fail": "of the last"}[case]
    assert expect in err and "Stopped with 0 of 5 records" in err
    assert err.count("error:") == 1
    if case in ("bad-key", "wrong-model"):
        assert faults.count <= 2  # stopped at the first answer (two were in flight)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["out.jsonl.errors.jsonl", "p.jsonl"] if case in ("dead-endpoint", "most-fail") else ["p.jsonl"])
    assert KEY not in err


@pytest.mark.parametrize("processes", [0, 2])
def test_budget_stops_at_or_under_and_spend_is_usage_times_price(toy_server, tmp_path, capsys, processes):
    url, faults = toy_server
    faults.reset()
    prompts = _prompts(tmp_path / "p.jsonl", 30)
    out = tmp_path / "out.jsonl"
    # Worst case of one request: prompt bound (UTF-8 bytes + 16 per message + 16) and 8 completion tokens.
    price_in, price_out = 1000.0, 20000.0
    worst = ((len("What is 10 + 11?") + 32) * price_in + 8 * price_out) / 1e6
    budget = 5.5 * worst
    assert main(_gen(url, [prompts], out, 30, "--model", "toy", "--max-tokens", 8, "--concurrency", 4,
                     "--budget", budget, "--price-in", price_in, "--price-out", price_out,
                     "--processes", processes)) == 0
    recs = _records(out)
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    spend = sum(r["metadata"]["usage"]["prompt_tokens"] * price_in + r["metadata"]["usage"]["completion_tokens"]
                * price_out for r in recs) / 1e6
    assert summary["spend"] == pytest.approx(spend, rel=1e-12)
    assert spend <= budget
    assert 5 <= len(recs) < 30 and faults.count == len(recs)
    assert summary["stopped"] == "budget"
    assert f"of budget {budget}; stopped: budget" in capsys.readouterr().out


def test_warm_cache_rerun_sends_nothing(toy_server, tmp_path):
    url, faults = toy_server
    prompts = _prompts(tmp_path / "p.jsonl", 12)
    args = ["--model", "toy", "--max-tokens", 6, "--cache-dir", tmp_path / "cache", "--temperature", 0.8]
    faults.reset()
    assert main(_gen(url, [prompts], tmp_path / "a.jsonl", 12, *args)) == 0
    assert faults.count == 12
    assert main(_gen(url, [prompts], tmp_path / "a.jsonl", 12, *args)) == 0  # the same command again
    assert main(_gen(url, [prompts], tmp_path / "b.jsonl", 12, *args)) == 0  # a fresh output, same cache
    assert faults.count == 12
    text = {r["id"]: r["teacher_text"] for r in _records(tmp_path / "a.jsonl")}
    assert {r["id"]: r["teacher_text"] for r in _records(tmp_path / "b.jsonl")} == text
    assert all(r["metadata"]["cached"] for r in _records(tmp_path / "b.jsonl"))
    summary = json.loads((tmp_path / "b.jsonl.summary.json").read_text())
    assert (summary["requests"], summary["cache_hits"], summary["spend"]) == (0, 12, 0.0)
    # Another sampling parameter is another key.
    assert main(_gen(url, [prompts], tmp_path / "c.jsonl", 2, *args, "--top-p", 0.9)) == 0
    assert faults.count == 14


def test_temperature_zero_is_deterministic_and_logprobs_have_k_alternatives(toy_server, tmp_path):
    url, faults = toy_server
    prompts = _prompts(tmp_path / "p.jsonl", 10)
    runs = []
    for name, conc in (("a", 1), ("b", 8)):
        out = tmp_path / f"{name}.jsonl"
        assert main(_gen(url, [prompts], out, 10, "--model", "toy", "--max-tokens", 6, "--temperature", 0,
                         "--concurrency", conc, "--logprobs", 3, "--cache-dir", tmp_path / f"cache-{name}")) == 0
        runs.append({r["id"]: r for r in _records(out)})
    assert {i: r["teacher_text"] for i, r in runs[0].items()} == {i: r["teacher_text"] for i, r in runs[1].items()}
    for rec in runs[0].values():
        assert rec["teacher_api_logprobs"]["k"] == 3  # the packed form
        lps = align.unpack_api_logprobs(rec["teacher_api_logprobs"])
        assert len(lps) == rec["metadata"]["usage"]["completion_tokens"] - (rec["metadata"]["finish_reason"] == "stop")
        assert "".join(t["token"] for t in lps).lstrip(" ") == rec["teacher_text"]
        for t in lps:
            assert len(t["top_logprobs"]) == 3 and bytes(t["bytes"]).decode() == t["token"]
            assert t["top_logprobs"][0]["logprob"] == t["logprob"] <= 0  # greedy: the top token
            assert [a["logprob"] for a in t["top_logprobs"]] == sorted((a["logprob"] for a in t["top_logprobs"]),
                                                                       reverse=True)


def test_endpoint_without_logprobs_warns_once_and_writes_text(tmp_path, capsys):
    faults = Faults(fake_chat_app(logprobs=False))
    prompts = _prompts(tmp_path / "p.jsonl", 4)
    with serve(faults) as url:
        assert main(_gen(url, [prompts], tmp_path / "o.jsonl", 4, "--model", "m", "--logprobs", 5)) == 0
    assert capsys.readouterr().out.count("returned no logprobs") == 1
    assert all("teacher_api_logprobs" not in r for r in _records(tmp_path / "o.jsonl"))


def test_dropped_and_truncated_responses(fake_server, tmp_path):
    url, faults = fake_server
    faults.reset()
    p = tmp_path / "p.txt"
    p.write_text("one\nEMPTY two\nLONG three\nfour\nfive\n", encoding="utf-8")
    assert main(_gen(url, [p], tmp_path / "a.jsonl", 3, "--model", "m", "--max-tokens", 2, "--concurrency", 1)) == 0
    recs = _records(tmp_path / "a.jsonl")
    assert [r["prompt"] for r in recs] == ["one", "LONG three", "four"]
    assert [r["metadata"]["truncated"] for r in recs] == [False, True, False]
    assert main(_gen(url, [p], tmp_path / "b.jsonl", 3, "--model", "m", "--max-tokens", 2, "--concurrency", 1,
                     "--drop-truncated")) == 0
    assert [r["prompt"] for r in _records(tmp_path / "b.jsonl")] == ["one", "four", "five"]
    summary = json.loads((tmp_path / "b.jsonl.summary.json").read_text())
    assert (summary["dropped_empty"], summary["dropped_truncated"]) == (1, 1)


def test_dry_run_bounds_the_cost_and_sends_nothing(fake_server, tmp_path, tokenizer, toy, capsys):
    url, faults = fake_server
    faults.reset()
    prompts = _prompts(tmp_path / "p.jsonl", 6)
    args = _gen(url, [prompts], tmp_path / "o.jsonl", 6, "--model", "m", "--max-tokens", 10, "--price-in", 2,
                "--price-out", 4, "--dry-run")
    assert main([*args, "--tokenizer", str(toy["tokenizer"])]) == 0
    n_prompt = sum(len(tokenizer.encode(f"user: What is {i} + {i + 1}?")) for i in range(6))  # BOS included
    expect = (n_prompt * 2 + 6 * 10 * 4) / 1e6
    assert f"cost at most {expect:.4f}" in capsys.readouterr().out
    assert main(args) == 0  # without a tokenizer: the byte bound, never below the exact count
    bound = float(re.search(r"cost at most ([0-9]+\.[0-9]+)", capsys.readouterr().out).group(1))
    assert bound >= expect
    assert faults.count == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_api_key_is_never_written(toy_server, tmp_path, capsys):
    url, faults = toy_server
    faults.reset("echo-key")
    prompts = _prompts(tmp_path / "p.jsonl", 6)
    assert main(_gen(url, [prompts], tmp_path / "o.jsonl", 5, "--model", "toy", "--max-tokens", 4,
                     "--cache-dir", tmp_path / "cache", "--concurrency", 1)) == 0
    assert (tmp_path / "o.jsonl.errors.jsonl").exists()  # the echoed key went through the errors file
    captured = capsys.readouterr()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 6  # prompts, output, summary, errors, the cache's segment and index
    assert len(Cache(tmp_path / "cache").index) == 5
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in captured.out + captured.err


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _quiet_main(argv, err=os.devnull, group=False):
    # Ctrl-C raises KeyboardInterrupt, as in a terminal, also where pytest itself ignores SIGINT (a
    # background job of a shell without job control).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Fresh stream objects: a forked child must not depend on locks that another thread held at fork time.
    if group:  # a process group of its own, which a signal to the group reaches with its client processes
        os.setpgid(0, 0)
    sys.stdout = open(os.devnull, "w")
    sys.stderr = open(err, "w")
    os._exit(main(argv))


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux's /proc)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie that nobody reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts client processes in Linux's /proc")
def test_kill_at_random_moments_then_rerun_gives_the_uninterrupted_records(tmp_path, monkeypatch):
    """Ten SIGKILLs of ``kdtrain gen-data`` processes, each a random moment after the output has grown
    by a random number of records (so each lands mid-run on any machine), then the same command as a
    fresh ``python -m kdtrain`` with two client processes to completion. Every other killed run sends
    through two client processes, which must exit when their run is killed. The killed processes are
    forked from this one, which has imported kdtrain already: a fresh interpreter per kill would spend
    the test's time importing torch. They flush every 4 records, so kills land between small batches
    and the test stays short."""
    import multiprocessing

    import kdtrain.gendata

    monkeypatch.setattr(kdtrain.gendata, "FLUSH_EVERY", 4)
    total = 200
    prompts = _prompts(tmp_path / "p.jsonl", total + 50)
    rng = random.Random(0)
    killed = tmp_path / "killed.jsonl"
    with serve(Faults(fake_chat_app(delay=0.2))) as url:
        def argv(out, cache, concurrency, processes=0):
            return _gen(url, [prompts], out, total, "--model", "m", "--temperature", 0, "--concurrency", concurrency,
                        "--cache-dir", cache, "--processes", processes)

        orphans = []
        for kill in range(10):
            target = _lines(killed) + rng.randint(1, 8)
            processes = 2 * (kill % 2)  # every other run sends through two client processes
            proc = multiprocessing.get_context("fork").Process(
                target=_quiet_main, args=(argv(killed, tmp_path / "c1", 8, processes),))
            proc.start()
            deadline = time.monotonic() + 30
            while proc.is_alive() and _lines(killed) < target and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            assert proc.is_alive(), "the run ended before its kill"
            children = _children(proc.pid)
            assert len(children) == processes
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            orphans += children
        deadline = time.monotonic() + 30  # the client processes see their socket close and exit
        while any(map(_alive, orphans)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, orphans))
        assert 0 < _lines(killed) < total
        env = {**os.environ, "KD_TEST_KEY": KEY}
        subprocess.run([sys.executable, "-m", "kdtrain", *argv(killed, tmp_path / "c1", 8, 2)], env=env, check=True,
                       capture_output=True)
        assert main(argv(tmp_path / "clean.jsonl", tmp_path / "c2", 64)) == 0
    got, ref = _records(killed), _records(tmp_path / "clean.jsonl")
    assert len(got) == total and len({r["id"] for r in got}) == total
    assert {r["id"]: r["teacher_text"] for r in got} == {r["id"]: r["teacher_text"] for r in ref}


def test_requests_spread_over_clients_keep_the_bound_and_are_retried(tmp_path, monkeypatch, transport):
    """--concurrency 20 runs on ceil(20 / CLIENT_REQUESTS) = 3 clients, each with its own connection pool.
    The server (500 ms per answer) holds exactly 20 requests in the first wave and never more; each client
    holds at most its share of the slots (7, 7, 6), also while the 429 / 500 answers of the second wave are
    retried on it. The clients use the transport the ``transport`` fixture leaves available."""
    import openai

    from kdtrain import gendata

    assert gendata.CLIENT_REQUESTS == 8
    made = []

    class Counted:
        def __init__(self, client):
            self.client, self.now, self.peak, self.sent = client, 0, 0, 0

        async def post(self, *args, **kwargs):
            self.now, self.sent = self.now + 1, self.sent + 1
            self.peak = max(self.peak, self.now)
            try:
                return await self.client.post(*args, **kwargs)
            finally:
                self.now -= 1

        async def close(self):
            await self.client.close()

    real = gendata.make_clients
    monkeypatch.setattr(gendata, "make_clients", lambda cfg, key: made.extend(map(Counted, real(cfg, key))) or made)
    prompts = _prompts(tmp_path / "p.jsonl", 60)
    faults = Faults(fake_chat_app(delay=0.5), key=KEY)
    faults.reset(*["ok"] * 20, "429", "500", "500")
    with serve(faults) as url:
        assert main(_gen(url, [prompts], tmp_path / "o.jsonl", 60, "--model", "m", "--concurrency", 20)) == 0
    recs = _records(tmp_path / "o.jsonl")
    assert len(recs) == 60 and len({r["id"] for r in recs}) == 60
    assert len(made) == 3 and len({id(c.client._client) for c in made}) == 3  # three pools
    assert all(isinstance(c.client._client, openai.DefaultAsyncHttpxClient) == (transport == "httpx") for c in made)
    assert sorted(c.peak for c in made) == [6, 7, 7]
    assert faults.peak == 20
    summary = json.loads((tmp_path / "o.jsonl.summary.json").read_text())
    assert (summary["retries"], summary["requests"]) == (3, 63)
    assert sum(c.sent for c in made) == faults.count == 63


def test_rerun_cuts_a_torn_line_and_refuses_another_commands_file(fake_server, tmp_path, capsys):
    url, faults = fake_server
    faults.reset()
    prompts = _prompts(tmp_path / "p.jsonl", 12)
    out = tmp_path / "o.jsonl"
    args = _gen(url, [prompts], out, 6, "--model", "m", "--temperature", 0, "--cache-dir", tmp_path / "cache")
    assert main(args) == 0
    full = _records(out)
    lines = out.read_bytes().split(b"\n")
    out.write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][:25])  # header, 3 records and a torn one
    assert main([*args, "--dry-run"]) == 0
    assert out.read_bytes().endswith(lines[4][:25])  # a dry run changes nothing
    faults.reset()
    assert main(args) == 0
    assert faults.count == 0  # the missing records come from the cache
    got = _records(out)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in full) and len(got) == 6
    assert main(_gen(url, [prompts], out, 6, "--model", "m", "--temperature", 0.5)) == 2
    assert "was not written by gen-data with this" in capsys.readouterr().err
    for first in (b"[" * 100_000 + b"]" * 100_000, b'{"__header__": ' + b"9" * 5000 + b"}"):  # too deep, too long
        odd = tmp_path / "odd.jsonl"
        odd.write_bytes(first + b"\n")
        assert main(_gen(url, [prompts], odd, 2, "--model", "m", "--temperature", 0)) == 2
        assert "was not written by gen-data with this" in capsys.readouterr().err
        assert odd.read_bytes() == first + b"\n"
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b'{"__head')  # killed while writing the header
    assert main(_gen(url, [prompts], empty, 2, "--model", "m", "--temperature", 0)) == 0
    assert len(_records(empty)) == 2


def test_samples_per_prompt_and_concurrent_runs_sharing_a_cache(fake_server, tmp_path):
    import threading

    url, faults = fake_server
    faults.reset()
    prompts = _prompts(tmp_path / "p.jsonl", 20)
    codes = []

    def run(name):
        codes.append(main(_gen(url, [prompts], tmp_path / f"{name}.jsonl", 30, "--model", "m", "--samples-per-prompt",
                               2, "--cache-dir", tmp_path / "cache", "--concurrency", 4)))

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [0, 0]
    a, b = _records(tmp_path / "a.jsonl"), _records(tmp_path / "b.jsonl")
    assert {r["id"] for r in a} == {f"p:{i}:{j}" for i in range(15) for j in range(2)}
    assert {r["id"]: r["teacher_text"] for r in a} == {r["id"]: r["teacher_text"] for r in b}
    by_id = {r["id"]: r for r in a}
    assert by_id["p:3:1"]["metadata"]["sampling"]["seed"] == 1 and by_id["p:3:0"]["metadata"]["sampling"]["seed"] == 0
    assert by_id["p:3:1"]["teacher_text"] != by_id["p:3:0"]["teacher_text"]
    cache = Cache(tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.idx"))) == 2  # a segment per run
    assert len(cache.index) == 30 and all(cache.get(k)["response"]["choices"] for k in cache.index)


def test_cache_reads_whole_entries_of_every_writer_and_skips_torn_ones(tmp_path):
    """Two writers' segments are both read; a torn index line (a kill mid-write), an index line over
    bytes that never reached the disk (power loss) and a garbled index line are misses, not errors."""
    a, b = Cache(tmp_path), Cache(tmp_path)
    a.put("k1", {"response": 1})
    b.put("k2", {"response": "ü" * 3})
    a.put("k3", {"response": 3})
    a.close(), b.close()
    idx = tmp_path / f"{a.name}.idx"
    with open(idx, "ab") as f:
        f.write(b"k4 999 20\n\x00\x00 x\nk5 0")  # past the data, garbage, torn
    c = Cache(tmp_path)
    assert {k: c.get(k) for k in ("k1", "k2", "k3", "k4", "k5")} == {
        "k1": {"response": 1}, "k2": {"response": "ü" * 3}, "k3": {"response": 3}, "k4": None, "k5": None}
    assert "k4" in c and "k5" not in c and c.name not in (a.name, b.name)
    assert not list(tmp_path.glob(f"{c.name}.*"))  # a run that stores nothing writes nothing


def test_system_message_and_jsonl_messages_make_loadable_records(fake_server, tmp_path, tokenizer):
    url, faults = fake_server
    faults.reset()
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "What is 1 + 1?", "reference": "2"}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."}]})
        + "\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert main(_gen(url, [p], out, 2, "--model", "m", "--system", "You are a teacher.", "--logprobs", 2)) == 0
    recs = {r["id"]: r for r in _records(out)}
    assert recs["p:0:0"]["messages"] == [{"role": "system", "content": "You are a teacher."},
                                         {"role": "user", "content": "What is 1 + 1?"}]
    assert recs["p:1:0"]["messages"][0]["content"] == "Be terse."  # a prompt's own system message is kept
    assert "prompt" not in recs["p:0:0"] and recs["p:0:0"]["reference"] == "2"
    assert len(align.unpack_api_logprobs(recs["p:0:0"]["teacher_api_logprobs"])) == len(recs["p:0:0"]["teacher_text"].split())
    data = load_dataset([out], tokenizer, 32000)
    rendered = tokenizer.decode(data.samples[0].prompt_ids, skip_special_tokens=True)
    assert rendered.startswith("system: ") and "user: " in rendered


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    prompts = _prompts(tmp_path / "p.jsonl", 3)
    (tmp_path / "file").write_text("x")
    assert main(_gen("http://127.0.0.1:9/v1", [prompts], tmp_path / "file" / "o.jsonl", 2, "--model", "m")) == 2
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "p.jsonl"]


@pytest.mark.parametrize("processes", [0, 2])
def test_ctrl_c_flushes_saves_the_summary_and_exits_130(tmp_path, processes):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it): gen-data flushes, counts the
    requests it sent (the 4 in flight too, one of them waiting out a 429's Retry-After, its retry
    counted) and exits 130; its client processes ignore the signal (no traceback) and exit with it."""
    import multiprocessing

    prompts = _prompts(tmp_path / "p.jsonl", 200)
    out, err = tmp_path / "o.jsonl", tmp_path / "err.txt"
    faults = Faults(fake_chat_app(delay=0.2), retry_after=60)
    faults.reset("429")
    with serve(faults) as url:
        args = _gen(url, [prompts], out, 200, "--model", "m", "--concurrency", 4, "--processes", processes)
        proc = multiprocessing.get_context("fork").Process(target=_quiet_main, args=(args, err, True))
        proc.start()
        deadline = time.monotonic() + 30
        while _lines(out) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        children = _children(proc.pid) if Path("/proc/self/task").is_dir() else []
        os.killpg(proc.pid, signal.SIGINT)
        proc.join(timeout=30)
        deadline = time.monotonic() + 10
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert proc.exitcode == 130
    summary = json.loads((tmp_path / "o.jsonl.summary.json").read_text())
    recs = _records(out)
    assert summary["stopped"] == "interrupted" and summary["records"] == len(recs) < 200
    assert summary["requests"] == len(recs) + 4  # the 4 in flight were sent, and may be billed
    assert summary["retries"] == 1
    assert "Traceback" not in err.read_text() and "interrupted with" in err.read_text()
    assert len(children) in ((processes,) if Path("/proc/self/task").is_dir() else (0,))
    assert not any(map(_alive, children))


def test_process_count_follows_the_concurrency(monkeypatch):
    """None up to PROCESS_REQUESTS in flight, then one per PROCESS_REQUESTS, at most one per CPU;
    --processes wins; and where processes cannot be forked, none by default."""
    import multiprocessing
    import threading

    from kdtrain import gendata

    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    per = gendata.PROCESS_REQUESTS

    def count(concurrency, processes=None):
        return gendata.process_count(gendata.GenConfig([], "o", "http://x/v1", "m", 1, concurrency=concurrency,
                                                       processes=processes))

    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(sys, "platform", "linux")
    if "fork" in multiprocessing.get_all_start_methods():
        assert [count(c) for c in (1, per, per + 1, 2 * per, 2 * per + 1, 100 * per)] == [0, 0, 2, 2, 3, 3]
        monkeypatch.setattr(sys, "platform", "darwin")  # forks, but not safely
        assert count(100 * per) == 0 and count(100 * per, processes=2) == 2
        monkeypatch.setattr(sys, "platform", "linux")
    assert count(8, processes=2) == 2 and count(100 * per, processes=0) == 0
    assert count(3, processes=8) == 3  # at most one per request in flight
    monkeypatch.setattr(threading, "active_count", lambda: 2)  # another thread: forking could deadlock
    assert count(100 * per) == 0 and count(100 * per, processes=2) == 2
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    assert count(100 * per) == 0


def test_client_processes_retry_log_and_count_as_in_process(fake_server, tmp_path):
    """The fault script of test_faults_are_retried_and_failures_logged, sent through a client process:
    the same records, retries, requests, errors and Retry-After wait."""
    processes = 1
    url, faults = fake_server
    prompts = _prompts(tmp_path / "p.jsonl", 10)
    out = tmp_path / "out.jsonl"
    faults.reset("429", "ok", "500", "ok", "drop", "ok", "timeout", "ok", "malformed")
    args = _gen(url, [prompts], out, 5, "--model", "m", "--concurrency", 1, "--timeout", 0.5, "--temperature", 0,
                "--processes", processes)
    assert main(args) == 0
    recs = _records(out)
    assert len(recs) == 5 and len({r["id"] for r in recs}) == 5
    assert faults.count == 10 and faults.times[1] - faults.times[0] >= 1.0
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert (summary["retries"], summary["errors"], summary["requests"]) == (4, 1, 10)
    errors = [json.loads(x) for x in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and "malformed" in errors[0]["reason"]


@pytest.mark.parametrize("case", ["bad-key", "most-fail"])
def test_client_processes_stop_the_run_once_on_failures_every_request_repeats(case, fake_server, tmp_path, capsys,
                                                                              monkeypatch):
    """A 401 in a client process stops the run with the in-process message; a window of failed requests,
    each answered by a client process, stops it too; nothing is written but the errors; no key shown."""
    url, faults = fake_server
    faults.reset(*(["echo-key"] * 20 if case == "most-fail" else []))
    if case == "bad-key":
        monkeypatch.setenv("KD_TEST_KEY", "sk-wrong-key")
    code = main(_gen(url, [_prompts(tmp_path / "p.jsonl", 20)], tmp_path / "out.jsonl", 5, "--model", "m",
                     "--max-retries", 1, "--concurrency", 4, "--processes", 2))
    assert code == 2
    err = capsys.readouterr().err
    expect = {"bad-key": "set the environment variable KD_TEST_KEY", "most-fail": "of the last"}[case]
    assert expect in err and "Stopped with 0 of 5 records" in err and err.count("error:") == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["out.jsonl.errors.jsonl", "p.jsonl"] if case == "most-fail" else ["p.jsonl"])
    assert KEY not in err and "sk-wrong-key" not in err
    if case == "most-fail":  # the key a server echoed is redacted in the client process, before it is logged
        assert KEY not in (tmp_path / "out.jsonl.errors.jsonl").read_text()


def test_a_client_process_that_dies_stops_the_run_with_what_to_do(tmp_path, monkeypatch, capsys):
    """SIGKILL to a client process mid-run: gen-data stops with one message (exit 2), keeps the records
    it has, and the same command finishes the run."""
    import threading

    from kdtrain import gendata

    started = []
    real_start = gendata.Workers.start

    async def start(self):
        started.append(self)
        await real_start(self)

    monkeypatch.setattr(gendata.Workers, "start", start)
    prompts = _prompts(tmp_path / "p.jsonl", 60)
    out = tmp_path / "o.jsonl"
    with serve(Faults(fake_chat_app(delay=0.2))) as url:
        args = _gen(url, [prompts], out, 60, "--model", "m", "--concurrency", 4, "--processes", 2)

        def kill_one():
            deadline = time.monotonic() + 60
            while _lines(out) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(started[0].procs[1].pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_one)
        killer.start()
        assert main(args) == 2
        killer.join()
        err = capsys.readouterr().err
        assert "client process 1 ended (exit code -9)" in err and "rerun the same command" in err
        assert err.count("error:") == 1 and "Traceback" not in err
        assert 0 < len(_records(out)) < 60
        assert main(args) == 0
    recs = _records(out)
    assert len(recs) == 60 and len({r["id"] for r in recs}) == 60
    assert len(started) == 2 and not any(p.is_alive() for w in started for p in w.procs)  # none left behind


@pytest.mark.parametrize("processes", [0, 1])
def test_an_error_message_utf8_cannot_encode_is_logged(fake_server, tmp_path, processes):
    """A 400 whose message holds a lone surrogate is logged (escaped) and the run goes on, in process
    and through a client process (whose reply would otherwise never come)."""
    url, faults = fake_server
    faults.reset("surrogate")
    out = tmp_path / "out.jsonl"
    assert main(_gen(url, [_prompts(tmp_path / "p.jsonl", 3)], out, 2, "--model", "m", "--concurrency", 1,
                     "--processes", processes)) == 0
    assert len(_records(out)) == 2
    [error] = [json.loads(x) for x in (tmp_path / "out.jsonl.errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert error["reason"].startswith("400: ") and error["reason"].endswith("bad \\ud800 request")


def test_a_failed_start_leaves_no_client_process_and_sigint_unblocked(monkeypatch):
    """The second client process fails to start: the first is stopped (its socket closed, it exits), the
    error reaches the caller, and SIGINT is not left blocked."""
    import multiprocessing.process

    from kdtrain import gendata

    real, started = multiprocessing.process.BaseProcess.start, []

    def start(self):
        if started:
            raise OSError("no more processes")
        started.append(self)
        real(self)

    import socket

    pairs, socketpair = [], socket.socketpair  # kept here, so only Workers' own cleanup closes them
    monkeypatch.setattr(socket, "socketpair", lambda: pairs.append(socketpair()) or pairs[-1])
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)
    cfg = gendata.GenConfig([], "o", "http://127.0.0.1:9/v1", "m", 1, concurrency=2)
    with pytest.raises(OSError, match="no more processes"):
        gendata.Workers(cfg, 2, None, gendata.Stats())
    [first] = started
    first.join(timeout=30)
    assert first.exitcode == 0  # it saw its socket close and ended
    assert all(sock.fileno() == -1 for pair in pairs for sock in pair)
    if hasattr(signal, "pthread_sigmask"):
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
