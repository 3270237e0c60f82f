"""CUDA tests on one GPU (`pytest -m gpu`), skipped without CUDA; the several-GPU tests are in
test_distributed.py.

Each runs the same entry points as the CPU suite on the toy, on the GPU, and compares with the
CPU fp32 reference where the numbers must agree.
"""

from __future__ import annotations


import pytest
import torch

from kdtrain.trainer import Trainer

pytestmark = pytest.mark.gpu


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


@pytest.mark.parametrize("dtype", ["8bit", "4bit"])
def test_low_bit_state_on_cuda_trains_like_exact_adamw(make_cfg, tmp_path, dtype):
    """torchao's compiled low-bit step on the GPU (the CPU tests run it eagerly): 8 toy steps
    from the same init stay within 5% of the exact run's loss drop (tests/test_optim.py says why)."""
    pytest.importorskip("torchao.optim", reason="needs kdtrain[lowbit]")
    exact = [r["total"] for r in _first_rows(make_cfg("train.device=cuda"), steps=8)]
    trainer = Trainer(make_cfg("train.device=cuda", f"optimizer.state_dtype={dtype}", "train.steps=8",
                               f"io.output_dir={tmp_path / dtype}"), log=False)
    low = [r["total"] for r in trainer.fit()]
    fall = exact[0] - exact[-1]
    assert fall > 0.5 and low != exact
    assert max(abs(a - b) for a, b in zip(low, exact)) < 0.05 * fall
    assert any(type(s["exp_avg"]) is not torch.Tensor for s in trainer.optimizer.state.values())


def test_the_memory_plan_follows_the_per_process_memory_fraction(make_cfg):
    """A process allowed part of its GPU (``set_per_process_memory_fraction``) plans for that part:
    given a share between the toy's estimates with every layer checkpointed and with none, ``auto``
    checkpoints some layers, where the whole card checkpoints none."""
    from kdtrain.model import AUTO_MEMORY_FRACTION, checkpointed_layers, memory_estimate, usable_gpu_bytes

    dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    before = torch.cuda.get_per_process_memory_fraction(dev)
    trainer = Trainer(make_cfg("train.device=cuda", "train.grad_checkpointing=auto"), log=False)
    cfg, seq = trainer.cfg, trainer.cfg.train.seq_lengths[0]
    trainer._plan(seq)
    assert trainer.checkpointed_layers == 0
    every, none = (memory_estimate(cfg, 1, seq, k)["total"] for k in (cfg.arch.n_layers, 0))
    assert every < none
    share = (every + none) / 2 / AUTO_MEMORY_FRACTION / total
    try:
        torch.cuda.set_per_process_memory_fraction(share, dev)
        assert usable_gpu_bytes(dev) == int(total * share)
        trainer._plan(seq)
        assert 0 < trainer.checkpointed_layers == checkpointed_layers(cfg, 1, seq, int(total * share))
    finally:
        torch.cuda.set_per_process_memory_fraction(before, dev)
