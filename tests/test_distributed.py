"""Several processes through ``torchrun``: FSDP2 sharding, DCP checkpoints, export.

Every test runs on 2 CPU processes (gloo) in the CPU suite, and again on 2 GPUs (NCCL) under
``-m gpu`` when a machine has them: the same code path, so the CPU suite catches a sharding,
reduction or checkpoint bug before any GPU time is spent.
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

from kdtrain.distributed import cpu_fsdp_supported

DEVICES = [
    # A string condition is evaluated when a test is set up: collecting this module does not import FSDP2.
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
        "not cpu_fsdp_supported()", reason=f"FSDP2 on gloo needs a newer torch than {torch.__version__}")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="needs 2 GPUs")]),
]


def launch(n: int, toy: dict, out: Path, device: str, *overrides: str, resume: bool = False,
           entry: tuple = ("-m", "kdtrain")):
    """``torchrun --nproc-per-node n -m kdtrain train`` on the toy; the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           *entry, "train", str(toy["config"]), f"io.output_dir={out}", f"train.device={device}",
           "tracing.console_log=false", *overrides] + (["--resume"] if resume else [])
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def torchrun(n: int, toy: dict, out: Path, device: str, *overrides: str, resume: bool = False,
             entry: tuple = ("-m", "kdtrain")) -> list[dict]:
    """A launch that must succeed; returns metrics.jsonl's rows."""
    proc = launch(n, toy, out, device, *overrides, resume=resume, entry=entry)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("reshard", ["auto", "false"])
@pytest.mark.parametrize("device", DEVICES)
def test_fsdp2_on_two_ranks_matches_one(toy, tmp_path, device, reshard):
    """Same global batch (1 rank: 2 x accumulation 2; 2 ranks: 1 x 2 each), fp32: same losses,
    grad norms and validation (gradients are summed across ranks, not averaged). Layers that
    reshard after the forward and layers that keep their gathered weights for the backward (auto
    keeps them on GPUs, where the toy fits, and reshards on the CPU) give the same steps."""
    one = torchrun(1, toy, tmp_path / "one", device, "train.steps=4", "train.micro_batch_size=2", "train.grad_accum=2")
    two = torchrun(2, toy, tmp_path / "two", device, "train.steps=4", "train.micro_batch_size=1", "train.grad_accum=2",
                   f"train.reshard_after_forward={reshard}")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for key in ("total", "kl_div", "ce_teacher", "ce_ground_truth", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert "val_total" in two[-1] and two[-1]["val_total"] == pytest.approx(one[-1]["val_total"], rel=1e-4)


@pytest.mark.parametrize("reshard", ["auto", "false"])
@pytest.mark.parametrize("device", DEVICES)
def test_sharded_checkpoint_saved_on_two_resumes_on_one_and_two(toy, tmp_path, device, reshard):
    """Each checkpoint follows an evaluation, whose forwards leave layers that keep their gathered
    weights (reshard false; auto on GPUs) unsharded when the state is saved."""
    args = ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.micro_batch_size=1",
            "train.grad_accum=2", "train.eval_every=2"]
    full = torchrun(2, toy, tmp_path / "run", device, *args, f"train.reshard_after_forward={reshard}")
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "dcp").is_dir()
    for n in (2, 1):
        out = tmp_path / f"resume{n}"
        shutil.copytree(tmp_path / "run", out)
        shutil.rmtree(out / "checkpoints" / "step_00000004")
        extra = [] if n == 2 else ["train.micro_batch_size=2"]  # same global batch on one rank
        rows = torchrun(n, toy, out, device, *args, *extra, resume=True)
        assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rows 3, 4 replaced by the resumed run's
        for a, b in zip(rows[2:], full[2:]):
            assert a["total"] == pytest.approx(b["total"], rel=1e-4), n


KEEP_PLAN = '''
import sys
from torch.distributed.tensor import DTensor
from kdtrain.config import load_config
from kdtrain.trainer import Trainer

cfg, _ = load_config([sys.argv[2]], sys.argv[3:])  # argv: train CONFIG overrides (``launch``)
trainer = Trainer(cfg, log=False)
layers = trainer.student.model.layers
seen = []
for layer in layers:  # after FSDP2's own post-forward hook: is the layer's weight sharded again?
    layer.register_forward_hook(lambda m, args, out: seen.append(isinstance(m.mlp.up_proj.weight, DTensor)))
sharded = lambda: [isinstance(layer.mlp.up_proj.weight, DTensor) for layer in layers]
seq = cfg.train.seq_lengths[0]
for gpu_bytes, want in ((10**15, [False] * len(layers)), (1, [True] * (len(layers) - 1) + [False])):
    trainer._plan(seq, gpu_bytes)  # room to keep every layer's gather; then none
    seen.clear()
    trainer.train_step(trainer.micro_batches(seq))
    assert seen == want * cfg.train.grad_accum, (gpu_bytes, seen)
    assert all(sharded()), sharded()  # the backward reshards them all
    trainer.evaluate()
    assert all(sharded()), sharded()  # and so does the evaluation, with no backward
print("PLANNED", trainer.dist.rank)
'''


@pytest.mark.skipif("not cpu_fsdp_supported()", reason=f"FSDP2 on gloo needs a newer torch than {torch.__version__}")
def test_reshard_after_forward_auto_keeps_or_frees_the_gathered_weights_as_planned(toy, tmp_path):
    """With room on the card (a GPU size given to the plan), every layer keeps its gathered weights
    from its forward to its backward; without, all but the last reshard after their forward.
    Either way the backward and the evaluation leave every layer sharded."""
    script = tmp_path / "keep_plan.py"
    script.write_text(KEEP_PLAN)
    proc = launch(2, toy, tmp_path / "run", "cpu", "train.micro_batch_size=1", "train.grad_accum=2",
                  entry=(str(script),))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("PLANNED") == 2


SLOW_WRITER = '''
import sys, time
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from kdtrain.cli import main

write = FileSystemWriter.write_data


def held_back(self, plan, planner):  # the write starts after training has taken more steps
    time.sleep(2)
    return write(self, plan, planner)


FileSystemWriter.write_data = held_back
sys.exit(main())
'''


@pytest.mark.parametrize("device", DEVICES)
def test_background_checkpoint_holds_the_state_of_its_step(toy, tmp_path, device):
    """``train.async_checkpoint``: a writer held back 2 s, while steps 3 and 4 update the weights
    and the optimizer state, still writes step 2's: every shard of both checkpoints has the
    bytes the foreground writer gives, and the losses are the same."""
    script = tmp_path / "slow_writer.py"
    script.write_text(SLOW_WRITER)
    args = ["train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.micro_batch_size=1",
            "train.grad_accum=2"]
    fore = torchrun(2, toy, tmp_path / "fore", device, *args, "train.async_checkpoint=false")
    back = torchrun(2, toy, tmp_path / "back", device, *args, "train.async_checkpoint=true", entry=(str(script),))
    assert [r["total"] for r in back] == [r["total"] for r in fore]
    for step in ("step_00000002", "step_00000004"):
        shards = [json.loads((tmp_path / run / "checkpoints" / step / "manifest.json").read_text())
                  for run in ("fore", "back")]
        distcp = [{k: v for k, v in m["files"].items() if k.endswith(".distcp")} for m in shards]
        assert len(distcp[0]) == 2 and distcp[0] == distcp[1], step
    assert not list((tmp_path / "back" / "checkpoints").glob(".tmp-*"))


STAGER = '''
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from kdtrain.distributed import HostStager

device = sys.argv[1]
dist.init_process_group("gloo" if device == "cpu" else "cuda:nccl,cpu:gloo")
if device == "cuda":
    torch.cuda.set_device(dist.get_rank())
dev = torch.device(device, dist.get_rank()) if device == "cuda" else torch.device("cpu")
mesh = init_device_mesh(device, (dist.get_world_size(),))
x = distribute_tensor(torch.arange(12.0).reshape(6, 2), mesh, [Shard(0)])
tree = {"model": {"w": x, "n": 3}, "rows": [torch.ones(3, device=dev)]}
stager = HostStager(dev)
out = stager.stage(tree)
stager.wait()
w = out["model"]["w"]
assert type(w) is type(x) and w.placements == x.placements and w.shape == x.shape, w
assert w.to_local().device.type == "cpu" and out["rows"][0].device.type == "cpu"
assert w.to_local().is_pinned() == (device == "cuda")
assert torch.equal(w.to_local(), x.to_local().cpu()) and out["model"]["n"] == 3
x.to_local().add_(1)  # training moves on: the copy keeps the saved step
assert torch.equal(w.to_local() + 1, x.to_local().cpu())
again = stager.stage(tree)
stager.wait()
assert again["model"]["w"].to_local().data_ptr() == w.to_local().data_ptr()  # host buffers reused
assert torch.equal(again["model"]["w"].to_local(), x.to_local().cpu())
ahead = HostStager(dev)
ahead.allocate(tree)  # what the trainer does in the background after its first step
ptrs = sorted(b.data_ptr() for b in ahead.buffers.values())
staged = ahead.stage(tree)
ahead.wait()
assert sorted(b.data_ptr() for b in ahead.buffers.values()) == ptrs  # the first save allocates nothing
assert staged["model"]["w"].to_local().data_ptr() in ptrs and torch.equal(staged["model"]["w"].to_local(), x.to_local().cpu())
print("STAGED", dist.get_rank())
dist.destroy_process_group()
'''


@pytest.mark.parametrize("device", DEVICES)
def test_host_stager_copies_shards_to_reused_host_buffers(tmp_path, device):
    """The background checkpoint's host copy: DTensors keep their placements with a CPU (on CUDA
    pinned) local copy that later training does not change; the next save reuses the buffers, and
    buffers allocated ahead of the first save are the ones it fills."""
    script = tmp_path / "stager.py"
    script.write_text(STAGER)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), device], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("STAGED") == 2, proc.stdout[-2000:]


@pytest.mark.parametrize("device", DEVICES)
def test_sharded_online_teacher_matches_one_rank(toy, tmp_path, device):
    online = ["kd.teacher=online", f"kd.teacher_path={toy['teacher']}", "train.steps=3", "train.grad_accum=2"]
    ref = torchrun(1, toy, tmp_path / "ref", device, "train.micro_batch_size=2", *online)
    got = torchrun(2, toy, tmp_path / "got", device, "train.micro_batch_size=1", *online)
    # On GPUs the teacher runs in bf16, whose matmuls may round differently for other batch shapes.
    rel = 2e-3 if device == "cuda" else 1e-4
    for a, b in zip(ref, got, strict=True):
        for key in ("total", "kl_div", "ce_teacher", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=rel), key
    assert ref[0]["kl_div"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_export_from_a_sharded_checkpoint(toy, tmp_path, device):
    """`kdtrain export` consolidates a DCP checkpoint written by 2 ranks into a plain HF model
    with the same logits as the run's single-rank twin."""
    from transformers import AutoModelForCausalLM

    from kdtrain.checkpoint import export_hf

    torchrun(2, toy, tmp_path / "two", device, "train.steps=2", "train.micro_batch_size=1", "train.grad_accum=2")
    torchrun(1, toy, tmp_path / "one", device, "train.steps=2", "train.micro_batch_size=2", "train.grad_accum=2")
    two = AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "two/checkpoints/step_00000002", tmp_path / "h2"))
    one = AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "one/checkpoints/step_00000002", tmp_path / "h1"))
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(two(input_ids=ids).logits, one(input_ids=ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cpu_offload_matches_plain_fsdp2(toy, tmp_path):
    """CPU-offloaded shards (AdamW on the CPU, gloo for the CPU collectives) give the same steps."""
    args = ["train.steps=3", "train.micro_batch_size=1", "train.grad_accum=2"]
    ref = torchrun(2, toy, tmp_path / "ref", "cuda", *args)
    got = torchrun(2, toy, tmp_path / "got", "cuda", *args, "train.cpu_offload=true")
    for a, b in zip(ref, got, strict=True):
        for key in ("total", "kl_div", "ce_teacher", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_more_ranks_than_gpus_fails_cleanly_on_every_rank(toy, tmp_path):
    """As with the CPU-offload refusal: torchrun may stop the other ranks once the first exits, so
    one message is what is sure to be printed; nothing may be trained or written."""
    n = torch.cuda.device_count() + 1
    proc = launch(n, toy, tmp_path, "cuda")
    assert proc.returncode != 0
    assert proc.stderr.count(f"{n} processes on this node but it has") >= 1
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_cpu_offload_on_cpu_processes_is_refused_on_every_rank(toy, tmp_path):
    """Every rank refuses before training, but torchrun stops the other rank as soon as the
    first exits, so only the first rank's message is sure to be printed."""
    proc = launch(2, toy, tmp_path, "cpu", "train.cpu_offload=true")
    assert proc.returncode != 0
    assert proc.stderr.count("with train.device=cpu they are there already") >= 1
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


META_BUILD = '''
import sys, torch
import kdtrain.model as M
from kdtrain.config import load_config
from kdtrain.distributed import setup, shard

M.INIT_BLOCK = 999  # many blocks, none aligned with a shard boundary
cfg, _ = load_config([sys.argv[1]], ["init.weights=null", f"train.device={sys.argv[2]}"])
state = setup(cfg)
student = M.build_student(cfg, "meta")
shard(M.Distiller(student, cfg), None, state, cfg)
M.materialise(student, cfg, state.device)
full = {k: v.full_tensor().cpu() for k, v in student.state_dict().items()}
if state.rank == 0:
    plain = M.build_student(cfg)
    ref = plain.state_dict()
    assert full.keys() == ref.keys()
    bad = [k for k in ref if not torch.equal(full[k], ref[k])]
    bad += [n for n, b in student.named_buffers() if not torch.equal(b.cpu(), dict(plain.named_buffers())[n])]
    print("MISMATCH", bad) if bad else print("SAME", len(ref))
state.close()
'''


@pytest.mark.parametrize("device", DEVICES)
def test_meta_built_shards_equal_the_plain_build(toy, tmp_path, device):
    """Built on the meta device, sharded over 2 ranks and filled shard by shard, the student has
    exactly the weights (and RoPE buffers) of the plain single-process build."""
    script = tmp_path / "meta_build.py"
    script.write_text(META_BUILD)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(toy["config"]), device], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SAME 21" in proc.stdout, proc.stdout[-2000:]
