"""`kdtrain annotate`: the stored rows are the teacher's, and a killed run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from kdtrain.annotate import annotate
from kdtrain.data import DataError, load_dataset


@pytest.fixture(scope="module")
def annotated(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("ann") / "out.jsonl"
    annotate(toy["dataset"], out, toy["teacher"], toy["tokenizer"], k=8, batch_size=3)
    return out


def test_annotated_rows_are_the_teachers_top_k(toy, annotated, tokenizer):
    from kdtrain.teacher import load_teacher_model

    teacher = load_teacher_model(toy["teacher"], "cpu")
    lines = annotated.read_text().splitlines()
    assert json.loads(lines[0])["__header__"]["k"] == 8
    rec = json.loads(lines[2])
    prompt = [tokenizer.bos_token_id] + tokenizer.encode(rec["prompt"], add_special_tokens=False)
    ids = torch.tensor([prompt + rec["response_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=ids).logits[0].float(), dim=-1)
    rows = logp[len(prompt) - 1: len(prompt) - 1 + len(rec["response_ids"])].topk(8)
    assert rec["teacher_topk"]["ids"] == rows.indices.tolist()
    torch.testing.assert_close(torch.tensor(rec["teacher_topk"]["logprobs"]), rows.values, rtol=0, atol=1e-6)
    # The toy dataset was written by the same teacher: annotate reproduces its rows.
    toy_rec = json.loads(toy["dataset"].read_text().splitlines()[2])
    assert toy_rec["teacher_topk"]["ids"] == rec["teacher_topk"]["ids"]
    data = load_dataset([annotated], tokenizer, 32000)
    assert len(data) == 10 and data.k == 8


@pytest.mark.parametrize("kept", [0, 4, 9])
def test_resume_after_a_kill_has_no_duplicate_or_missing_record(toy, annotated, tmp_path, kept):
    full = annotated.read_bytes()
    lines = full.split(b"\n")
    torn = b"\n".join(lines[: 1 + kept]) + b"\n" + lines[1 + kept][:25]  # a kill mid-line
    out = tmp_path / "out.jsonl"
    out.write_bytes(torn)
    written = annotate(toy["dataset"], out, toy["teacher"], toy["tokenizer"], k=8, batch_size=3)
    assert written == 10 - kept
    assert out.read_bytes() == full


def test_output_from_another_command_is_refused(toy, annotated, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(annotated.read_bytes())
    with pytest.raises(DataError, match="header differs"):
        annotate(toy["dataset"], out, toy["teacher"], toy["tokenizer"], k=4)
