"""`kdtrain make-toy` artifacts: seeded bytes, safe loading, and a teacher signal that is real."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdtrain.toy import make_toy


@pytest.mark.smoke
def test_artifacts_exist_and_model_loads_weights_only(toy):
    for key in ("config", "dataset", "model_init"):
        assert toy[key].is_file()
    assert (toy["tokenizer"] / "tokenizer.json").is_file()
    state = torch.load(toy["model_init"], weights_only=True)
    assert sum(v.numel() for v in state.values()) == 4_219_200


def test_same_flags_give_the_same_bytes(toy, tmp_path):
    again = make_toy(tmp_path / "again")
    for rel in ("toy_dataset.jsonl", "toy_config.yaml", "toy_model_init.pt", "tokenizer/tokenizer.json",
                "tokenizer/tokenizer_config.json"):
        assert (toy["dir"] / rel).read_bytes() == (again["dir"] / rel).read_bytes(), rel


def test_flags_shape_the_artifacts(tmp_path):
    paths = make_toy(tmp_path / "t", samples=4, steps=7, dmodel=32, nlayers=1, vocab=32064)
    lines = paths["dataset"].read_text().splitlines()
    assert len(lines) == 1 + 4  # header + samples
    from kdtrain.config import load_config
    from kdtrain.model import build_student

    cfg, _ = load_config([paths["config"]])
    assert (cfg.train.steps, cfg.arch.d_model, cfg.arch.n_layers, cfg.arch.vocab_size) == (7, 32, 1, 32064)
    assert build_student(cfg).get_output_embeddings().weight.shape == (32064, 32)


@pytest.mark.smoke
def test_teacher_signal_is_a_real_model_not_noise(toy):
    """The toy teacher is fitted on the samples: its top-1 often is the actual next token, each
    row is a sorted, normalisable distribution, and every record carries text and reference."""
    records = [json.loads(l) for l in toy["dataset"].read_text().splitlines()[1:]]
    assert len(records) == 10
    hits = total = 0
    counts: dict[int, int] = {}
    for r in records:
        assert r["teacher_text"] and r["reference"] and r["prompt"]
        ids, lps = r["teacher_topk"]["ids"], r["teacher_topk"]["logprobs"]
        assert len(ids) == len(lps) == len(r["response_ids"])
        for row_ids, row_lp, tok in zip(ids, lps, r["response_ids"]):
            assert row_lp == sorted(row_lp, reverse=True)
            assert sum(math.exp(v) for v in row_lp) <= 1 + 1e-5
            hits += row_ids[0] == tok
            total += 1
            counts[tok] = counts.get(tok, 0) + 1
    # Random logits over 32,000 tokens would hit ~0 times, and a position-blind teacher at best
    # as often as the most frequent token (~12%); the fitted teacher reads the context.
    assert hits / total > max(counts.values()) / total + 0.2


@pytest.mark.slow
def test_artifacts_do_not_depend_on_the_cpu_instruction_set(toy, tmp_path):
    """make-toy under the portable kernels (ATEN_CPU_CAPABILITY=default) writes the same bytes as
    under this CPU's best ones (this session's fixture): float32 kernels differ per instruction
    set in their last bits, and nothing stored may carry those bits."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    code = f"from kdtrain.toy import make_toy; make_toy({str(tmp_path / 'portable')!r})"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    for rel in ("toy_dataset.jsonl", "toy_model_init.pt", "teacher/model.safetensors", "toy_config.yaml",
                "tokenizer/tokenizer.json"):
        assert (toy["dir"] / rel).read_bytes() == (tmp_path / "portable" / rel).read_bytes(), rel
