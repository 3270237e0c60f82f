"""``kdtrain serve-teacher``: the toy teacher behind a real uvicorn server on 127.0.0.1, queried with
the official ``openai`` client; greedy output and log-probs checked against Hugging Face's own
``generate`` and a plain forward pass."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from kdtrain.cli import main  # noqa: E402
from kdtrain.serve import _choose, load_app  # noqa: E402
from loopback import serve  # noqa: E402

PROMPTS = ["What is the capital of France?", "What is 3 + 4?", "What is the opposite of 'hot'?",
           "What is the capital of Peru?", "What is 12 + 30?", "Name a fast animal.", "What is 7 + 9?",
           "What is the capital of Kenya?"]


@pytest.fixture(scope="module")
def teacher_url(toy):
    with serve(load_app(toy["teacher"], toy["tokenizer"], "cpu", max_batch=8, model_name="toy")) as url:
        yield url


@pytest.fixture(scope="module")
def hf_teacher(toy):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(toy["teacher"], local_files_only=True).eval()


def _ask(url, content, **kw):
    client = openai.OpenAI(api_key="unused", base_url=url, max_retries=0)
    return client.chat.completions.create(model="toy", messages=[{"role": "user", "content": content}], **kw)


def _prompt_ids(tokenizer, content):
    # The trainer's rendering for a tokenizer without a chat template, written out here.
    return [tokenizer.bos_token_id] + tokenizer.encode(f"user: {content}", add_special_tokens=False)


def test_greedy_equals_hf_generate_and_logprobs_equal_a_forward(teacher_url, hf_teacher, tokenizer):
    content = PROMPTS[0]
    r = _ask(teacher_url, content, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    ids = _prompt_ids(tokenizer, content)
    ref = hf_teacher.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
    ref = ref.tolist()
    stopped = tokenizer.eos_token_id in ref
    gen = ref[: ref.index(tokenizer.eos_token_id)] if stopped else ref
    choice = r.choices[0]
    assert choice.message.content == tokenizer.decode(gen, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if stopped else "length")
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(gen) + stopped
    with torch.no_grad():
        logp = torch.log_softmax(hf_teacher(torch.tensor([ids + gen])).logits[0].double(), -1)
    content_lp = choice.logprobs.content
    assert len(content_lp) == len(gen)
    for j, (tid, entry) in enumerate(zip(gen, content_lp)):
        row = logp[len(ids) - 1 + j]
        assert entry.logprob == pytest.approx(row[tid].item(), abs=1e-4)
        top = row.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert bytes(entry.bytes).decode() == entry.token
    # The pieces spell the text (SentencePiece drops the first piece's leading space when decoding).
    assert "".join(t.token for t in content_lp).lstrip(" ") == choice.message.content


def test_concurrent_batched_requests_equal_one_at_a_time(teacher_url, toy):
    async def ask_all(url):
        client = openai.AsyncOpenAI(api_key="unused", base_url=url, max_retries=0)
        rs = await asyncio.gather(*[
            client.chat.completions.create(model="toy", messages=[{"role": "user", "content": p}], max_tokens=8,
                                           temperature=0 if i % 2 else 0.9, top_p=1.0 if i % 4 else 0.8, seed=i)
            for i, p in enumerate(PROMPTS)])
        await client.close()
        return [(r.choices[0].message.content, r.usage.completion_tokens) for r in rs]

    batched = asyncio.run(ask_all(teacher_url))
    with serve(load_app(toy["teacher"], toy["tokenizer"], "cpu", max_batch=1, model_name="toy")) as url:
        single = asyncio.run(ask_all(url))
    assert batched == single


def test_requests_arriving_close_together_are_generated_as_one_batch(toy, monkeypatch):
    """Eight requests sent 20 ms apart (as a busy client sends them) make one batch of eight, not a
    batch of the first alone while the others wait for it (the gap is widened to 0.5 s so that a
    loaded machine cannot split them)."""
    import kdtrain.serve as serve_module

    sizes = []
    real = serve_module.generate
    monkeypatch.setattr(serve_module, "generate", lambda model, reqs, *a: sizes.append(len(reqs)) or real(model, reqs, *a))
    monkeypatch.setattr(serve_module, "BATCH_GAP", 0.5)

    async def ask_all(url):
        client = openai.AsyncOpenAI(api_key="unused", base_url=url, max_retries=0)

        async def ask(i, p):
            await asyncio.sleep(0.02 * i)
            await client.chat.completions.create(model="toy", messages=[{"role": "user", "content": p}], max_tokens=2)

        await asyncio.gather(*[ask(i, p) for i, p in enumerate(PROMPTS)])
        await client.close()

    with serve(load_app(toy["teacher"], toy["tokenizer"], "cpu", max_batch=8, model_name="toy")) as url:
        asyncio.run(ask_all(url))
    assert sizes == [len(PROMPTS)]


def test_seed_reproduces_a_sample_and_max_tokens_cuts(teacher_url):
    a = _ask(teacher_url, PROMPTS[1], max_tokens=6, temperature=1.0, seed=7)
    b = _ask(teacher_url, PROMPTS[1], max_tokens=6, temperature=1.0, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content
    texts = {_ask(teacher_url, PROMPTS[1], max_tokens=6, temperature=1.0, seed=s).choices[0].message.content
             for s in range(6)}
    assert len(texts) > 1  # other seeds, other samples
    one = _ask(teacher_url, PROMPTS[2], max_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1
    assert one.choices[0].finish_reason in ("length", "stop")


def test_choose_follows_the_nucleus_distribution():
    """Inverse-CDF sampling over a grid of u gives each token its nucleus probability (to 1/N)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]] * 3)
    temperature, top_p = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.8, 1.0, 1.0])
    N = 2000
    counts = torch.zeros(3, 5)
    for i in range(N):
        u = torch.full((3,), (i + 0.5) / N)
        counts[torch.arange(3), _choose(logits, temperature, top_p, u)] += 1
    # Reference written out: sort, keep the smallest prefix reaching top_p, renormalise.
    for row, (T, p) in enumerate([(1.0, 0.8), (0.5, 1.0)]):
        probs = [math.exp(x / T) for x in logits[0].tolist()]
        probs = [x / sum(probs) for x in probs]
        order = sorted(range(5), key=lambda t: -probs[t])
        kept, mass = [], 0.0
        for t in order:
            if mass >= p:
                break
            kept.append(t)
            mass += probs[t]
        expect = [probs[t] / mass if t in kept else 0.0 for t in range(5)]
        assert (counts[row] / N).tolist() == pytest.approx(expect, abs=2 / N)
    assert counts[2].tolist() == [N, 0, 0, 0, 0]  # temperature 0: argmax


def test_bad_requests_get_openai_errors(teacher_url):
    with pytest.raises(openai.NotFoundError, match="serves 'toy'"):
        openai.OpenAI(api_key="x", base_url=teacher_url, max_retries=0).chat.completions.create(
            model="other", messages=[{"role": "user", "content": "hi"}])
    for kw in ({"n": 2}, {"top_logprobs": 21, "logprobs": True}, {"temperature": -1}, {"max_tokens": 0}):
        with pytest.raises(openai.BadRequestError):
            _ask(teacher_url, "hi", **kw)
    models = openai.OpenAI(api_key="x", base_url=teacher_url).models.list()
    assert [m.id for m in models.data] == ["toy"]


def test_serve_teacher_without_tokenizer_is_a_clear_error(toy, capsys):
    assert main(["serve-teacher", str(toy["teacher"])]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer" in err and str(toy["teacher"]) in err
