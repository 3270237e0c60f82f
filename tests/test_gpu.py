"""CUDA tests (`pytest -m gpu`): skipped without CUDA; the 2-GPU tests skip below 2 GPUs.

Each runs the same entry points as the CPU suite on the toy, on the GPU, and compares with the
CPU fp32 reference where the numbers must agree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdtrain.trainer import Trainer

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def _first_rows(cfg, steps=3):
    cfg.train.steps = steps
    return Trainer(cfg, log=False).fit()


@pytest.fixture(scope="module")
def cpu_rows(toy, tmp_path_factory):
    from kdtrain.config import load_config

    cfg, _ = load_config([toy["config"]], [f"io.output_dir={tmp_path_factory.mktemp('cpu')}", "train.device=cpu"])
    return _first_rows(cfg)


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 5e-2), ("fp16", 5e-2)])
def test_train_steps_on_cuda_match_the_cpu_reference(make_cfg, cpu_rows, precision, tol):
    """fp32 on the GPU equals the CPU; bf16 autocast and fp16 + grad scaler stay within 5e-2."""
    trainer = Trainer(make_cfg("train.device=cuda", f"train.precision={precision}", "train.steps=3"), log=False)
    assert next(trainer.student.parameters()).is_cuda
    assert (trainer.scaler is not None) == (precision == "fp16")
    before = [p.detach().clone() for p in trainer.student.parameters()]
    rows = trainer.fit()
    assert all(not torch.equal(b, p) for b, p in zip(before, trainer.student.parameters()))
    for r, c in zip(rows, cpu_rows):
        assert r["total"] == pytest.approx(c["total"], rel=tol), (precision, r, c)
    if precision == "fp16":
        assert trainer.scaler.get_scale() > 0


def test_torch_compile_gives_the_same_losses(make_cfg, cpu_rows):
    rows = _first_rows(make_cfg("train.device=cuda", "train.compile=true"))
    for r, c in zip(rows, cpu_rows):
        assert r["total"] == pytest.approx(c["total"], rel=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_loss_on_gpu_equals_cpu_reference(dtype, tol):
    from kdtrain.losses import SparseTeacher, Targets, kd_loss

    g = torch.Generator().manual_seed(0)
    N, d, V, k = 300, 64, 1000, 8
    h, w = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g) / 8
    labels = torch.randint(0, V, (N,), generator=g)
    lp = torch.log_softmax(torch.randn(N, V, generator=g), -1).topk(k, -1)
    weights = {"kl_div": 1.0, "ce_teacher": 0.5, "ce_ground_truth": 0.3}

    def run(device, chunk, dt):
        hh = h.to(device, dt).clone().requires_grad_()
        ww = w.to(device, dt).clone().requires_grad_()
        is_ref = torch.arange(N, device=device) >= 250
        tgt = Targets(labels.to(device), is_ref, ~is_ref, 250, 250, 50,
                      SparseTeacher(lp.indices.to(device), lp.values.to(device), 1.0))
        out = kd_loss(hh, ww, tgt, weights, 2.0, "jsd", 0.3, chunk_size=chunk)
        out["total"].backward()
        return [out[c].float().cpu() for c in ("total", "kl_div", "ce_teacher")] + [hh.grad.float().cpu(),
                                                                                      ww.grad.float().cpu()]

    ref = run("cpu", None, torch.float32)
    got = run("cuda", 128, dtype)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_online_bf16_teacher(make_cfg, toy):
    rows = _first_rows(make_cfg("train.device=cuda", "train.precision=bf16", "kd.teacher=online",
                                f"kd.teacher_path={toy['teacher']}"), steps=4)
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in rows)
    assert rows[0]["kl_div"] > 0


def _torchrun(n: int, toy: dict, out: Path, *overrides: str, resume: bool = False) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "kdtrain", "train", str(toy["config"]), f"io.output_dir={out}", "train.device=cuda",
           "tracing.console_log=false", *overrides] + (["--resume"] if resume else [])
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@two_gpus
def test_fsdp2_on_two_gpus_matches_one_gpu(toy, tmp_path):
    """Same global batch (1 GPU: 2 x accumulation 2; 2 GPUs: 1 x 2 each), fp32: same losses."""
    one = _torchrun(1, toy, tmp_path / "one", "train.steps=4", "train.micro_batch_size=2", "train.grad_accum=2")
    two = _torchrun(2, toy, tmp_path / "two", "train.steps=4", "train.micro_batch_size=1", "train.grad_accum=2")
    for a, b in zip(one, two):
        for key in ("total", "kl_div", "ce_teacher", "ce_ground_truth", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert "val_total" in two[-1] and two[-1]["val_total"] == pytest.approx(one[-1]["val_total"], rel=1e-4)


@two_gpus
def test_sharded_checkpoint_saved_on_two_resumes_on_one_and_two(toy, tmp_path):
    args = ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.micro_batch_size=1",
            "train.grad_accum=2"]
    full = _torchrun(2, toy, tmp_path / "run", *args)
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "dcp").is_dir()
    for n in (2, 1):
        out = tmp_path / f"resume{n}"
        shutil.copytree(tmp_path / "run", out)
        shutil.rmtree(out / "checkpoints" / "step_00000004")
        (out / "metrics.jsonl").write_text("")
        extra = [] if n == 2 else ["train.micro_batch_size=2"]  # same global batch on one GPU
        rows = _torchrun(n, toy, out, *args, *extra, resume=True)
        assert [r["step"] for r in rows] == [3, 4]
        for a, b in zip(rows, full[2:]):
            assert a["total"] == pytest.approx(b["total"], rel=1e-4), n


@two_gpus
@pytest.mark.parametrize("mode", ["cpu_offload", "online_teacher"])
def test_fsdp2_variants_match(toy, tmp_path, mode):
    """CPU-offloaded shards (AdamW on the CPU, gloo for the CPU collectives) give the same
    losses as plain FSDP2; a sharded online teacher gives the same losses as one GPU."""
    args = ["train.steps=3", "train.micro_batch_size=1", "train.grad_accum=2"]
    if mode == "cpu_offload":
        ref = _torchrun(2, toy, tmp_path / "ref", *args)
        got = _torchrun(2, toy, tmp_path / "got", *args, "train.cpu_offload=true")
    else:
        online = ["kd.teacher=online", f"kd.teacher_path={toy['teacher']}"]
        ref = _torchrun(1, toy, tmp_path / "ref", "train.steps=3", "train.micro_batch_size=2", "train.grad_accum=2",
                        *online)
        got = _torchrun(2, toy, tmp_path / "got", *args, *online)
    # The online teacher runs in bf16, whose matmuls may round differently for other batch shapes.
    rel = 1e-4 if mode == "cpu_offload" else 2e-3
    for a, b in zip(ref, got, strict=True):
        for key in ("total", "kl_div", "ce_teacher", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=rel), (mode, key)


@two_gpus
def test_export_from_a_sharded_checkpoint(toy, tmp_path):
    """`kdtrain export` consolidates a DCP checkpoint written by 2 ranks into a plain HF model
    with the same logits as the run's single-GPU twin."""
    from transformers import AutoModelForCausalLM

    from kdtrain.checkpoint import export_hf

    _torchrun(2, toy, tmp_path / "two", "train.steps=2", "train.micro_batch_size=1", "train.grad_accum=2")
    _torchrun(1, toy, tmp_path / "one", "train.steps=2", "train.micro_batch_size=2", "train.grad_accum=2")
    two = AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "two/checkpoints/step_00000002", tmp_path / "h2"))
    one = AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "one/checkpoints/step_00000002", tmp_path / "h1"))
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(two(input_ids=ids).logits, one(input_ids=ids).logits, rtol=1e-3, atol=1e-3)


@two_gpus
def test_more_ranks_than_gpus_fails_cleanly_on_every_rank(toy, tmp_path):
    n = torch.cuda.device_count() + 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "kdtrain",
           "train", str(toy["config"]), f"io.output_dir={tmp_path}", "train.device=cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count(f"{n} processes on this node but it has") == n
