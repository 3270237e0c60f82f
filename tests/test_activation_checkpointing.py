"""``train.grad_checkpointing: auto``: per sequence length, the fewest decoder layers to checkpoint
for ``kdtrain info``'s memory estimate to fit the GPU; the layers chosen recompute, the others don't,
and the step is the same either way. ``train.reshard_after_forward: auto``: sharded layers keep
their gathered weights for the backward where that fits with the same layers checkpointed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdtrain.config import load_config
from kdtrain.model import AUTO_MEMORY_FRACTION, checkpointed_layers, memory_estimate, reshards_after_forward
from kdtrain.trainer import Trainer

WORKER = str(Path(__file__).resolve().parents[1] / "configs" / "worker_9b.yaml")


def test_partly_checkpointed_activations_interpolate_between_none_and_all():
    """Each checkpointed layer keeps only its input (tokens x d_model in bf16) instead of its
    working set: the activations term moves linearly from none checkpointed to all."""
    cfg, _ = load_config([WORKER], [])
    L, S = cfg.arch.n_layers, 4096
    none, every = (memory_estimate(cfg, 4, S, k)["activations"] for k in (0, L))
    assert every == L * S * cfg.arch.d_model * 2
    for k in (1, 7, L - 1):
        assert memory_estimate(cfg, 4, S, k)["activations"] == pytest.approx(none + k / L * (every - none))
    # The default follows the config: every layer when grad_checkpointing is true (or auto), none when false.
    assert memory_estimate(cfg, 4, S)["activations"] == every
    off, _ = load_config([WORKER], ["train.grad_checkpointing=false"])
    assert memory_estimate(off, 4, S)["activations"] == none


def test_auto_checkpoints_the_fewest_layers_that_fit():
    cfg, _ = load_config([WORKER], ["train.grad_checkpointing=auto"])
    L = cfg.arch.n_layers
    gib = 2**30
    for world, seq, gpu in [(2, 8192, 139.8), (4, 8192, 79.2), (2, 16384, 139.8), (4, 16384, 79.2)]:
        k = checkpointed_layers(cfg, world, seq, int(gpu * gib))
        fits = [memory_estimate(cfg, world, seq, j)["total"] <= AUTO_MEMORY_FRACTION * gpu * gib for j in (k - 1, k)]
        assert 0 < k < L and fits == [False, True], (world, seq, k)
    assert checkpointed_layers(cfg, 4, 4096, 10**15) == 0  # memory to spare: nothing recomputed
    assert checkpointed_layers(cfg, 1, 16384, 10 * gib) == L  # nothing fits: all, the least memory
    # Longer sequences and fewer GPUs never checkpoint fewer layers.
    ks = [checkpointed_layers(cfg, 4, s, int(79.2 * gib)) for s in (2048, 4096, 8192, 16384)]
    assert ks == sorted(ks)
    assert checkpointed_layers(cfg, 2, 8192, int(79.2 * gib)) >= checkpointed_layers(cfg, 4, 8192, int(79.2 * gib))


def _forward_counts(trainer) -> list[list[int]]:
    counts = [[0] for _ in trainer.student.model.layers]
    for layer, c in zip(trainer.student.model.layers, counts):
        layer.mlp.register_forward_pre_hook(lambda *args, c=c: c.__setitem__(0, c[0] + 1))  # the recompute stops early
    return counts


def test_auto_recomputes_exactly_the_planned_layers_and_steps_the_same(make_cfg):
    """With a GPU budget that fits the toy only with one of its two layers checkpointed, layer 0
    runs its forward twice per micro-batch (forward and recompute) and layer 1 once; the losses,
    gradient norm and new weights equal those of a run without checkpointing."""
    args = ("train.steps=2", "train.micro_batch_size=2", "train.grad_accum=2")
    auto = Trainer(make_cfg(*args, "train.grad_checkpointing=auto"), log=False)
    plain = Trainer(make_cfg(*args, "train.grad_checkpointing=false"), log=False)
    seq = 64
    budget = memory_estimate(auto.cfg, 1, seq, 1)["total"] / AUTO_MEMORY_FRACTION
    assert memory_estimate(auto.cfg, 1, seq, 0)["total"] > AUTO_MEMORY_FRACTION * budget  # 0 would not fit
    auto._plan(seq, int(budget) + 1)
    assert auto.checkpointed_layers == 1
    counts = _forward_counts(auto)
    got = auto.train_step(auto.micro_batches(seq))
    assert [c[0] for c in counts] == [2 * 2, 2]  # 2 micro-batches
    want = plain.train_step(plain.micro_batches(seq))
    for key in ("total", "kl_div", "ce_teacher", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    for (name, a), b in zip(auto.student.named_parameters(), plain.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_auto_on_the_cpu_checkpoints_nothing(make_cfg):
    trainer = Trainer(make_cfg("train.steps=1", "train.grad_checkpointing=auto"), log=False)
    counts = _forward_counts(trainer)
    trainer.train_step(trainer.micro_batches(64))
    assert trainer.checkpointed_layers == 0 and all(c[0] == trainer.cfg.train.grad_accum * 1 for c in counts)


def test_auto_keeps_gathered_weights_only_where_that_fits_without_more_recompute():
    cfg, _ = load_config([WORKER], ["train.grad_checkpointing=auto", "optimizer.state_dtype=8bit",
                                    "train.compile=true"])
    gib = 2**30
    plans = {}
    for gpu in (79.2, 139.8):
        for seq in (4096, 8192, 16384):
            k = checkpointed_layers(cfg, 2, seq, int(gpu * gib))
            keep = not reshards_after_forward(cfg, 2, seq, k, int(gpu * gib))
            need = memory_estimate(cfg, 2, seq, k, reshard=False)["total"]
            assert keep == (need <= AUTO_MEMORY_FRACTION * gpu * gib), (gpu, seq)
            plans[gpu, seq] = keep
    # The 80 GB card is full at every length; the 141 GB one keeps them until seq 16384 needs the room.
    assert plans == {(79.2, 4096): False, (79.2, 8192): False, (79.2, 16384): False,
                     (139.8, 4096): True, (139.8, 8192): True, (139.8, 16384): False}
    assert reshards_after_forward(cfg, 1, 4096, 0, 10**15)  # one process: nothing to keep
    assert reshards_after_forward(cfg, 2, 4096, 0, None)  # no GPU size (the CPU): reshard
    for fixed in (True, False):
        cfg.train.reshard_after_forward = fixed
        assert reshards_after_forward(cfg, 2, 4096, 0, 10**15) is fixed
