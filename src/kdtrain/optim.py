"""The optimizer: AdamW with exact fp32 moments, or with low-bit moments from torchao.

``optimizer.state_dtype`` chooses how the two AdamW moments are stored; the weights and
gradients stay fp32 (sharded by FSDP2 across GPUs) and every update is computed in fp32:

- ``fp32`` (default): ``torch.optim.AdamW(fused=True)``, 8 bytes of state per parameter. The
  fused kernel runs on CUDA and on the CPU (offloaded shards), 12x the per-tensor loop there.
  Under FSDP2 it runs on each rank's local shards (``local_shards``).
- ``8bit``: ``torchao.optim.AdamW8bit``, block-wise dynamic-tree quantised moments (blocks of
  256 values, one fp32 scale each): 2.03 bytes per parameter.
- ``4bit``: ``torchao.optim.AdamW4bit`` (blocks of 128, a linear map for the second moment):
  1.06 bytes per parameter.

Low-bit state is what fits the 9B worker on 2 x 80 GB without CPU offload: 16 B/param of
training state becomes 10.03 (8-bit) or 9.06 (4-bit). torchao quantises a tensor only when its
local shard has at least 4,096 values and a multiple of the block size; the others (norms, odd
shards) keep fp32 moments. Its step is ``torch.compile``d once per parameter shape, and its
learning rate is a tensor: set it with ``set_lr``. Under FSDP2 the step runs on each rank's
local shards (``local_shard_step``).
"""

from __future__ import annotations

import torch

from .config import ConfigError, OptimizerConfig

STATE_DTYPES = ("fp32", "8bit", "4bit")
# Bytes of AdamW state per parameter (two moments, their block scales included).
STATE_BYTES = {"fp32": 8.0, "8bit": 2 * (1 + 4 / 256), "4bit": 2 * (0.5 + 4 / 128)}


def build_optimizer(groups: list[dict], o: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW over the parameter groups, its moments stored as ``o.state_dtype`` says."""
    kwargs = {"lr": lr, "betas": tuple(o.betas), "eps": o.eps}
    if o.state_dtype == "fp32":
        return local_shards(torch.optim.AdamW(groups, fused=True, **kwargs))
    try:
        from torchao.optim import AdamW4bit, AdamW8bit
        from torchao.optim.subclass_4bit import OptimState4bit
        from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError:
        raise ConfigError(f"optimizer.state_dtype={o.state_dtype} needs torchao: pip install 'kdtrain[lowbit]', "
                          "or set optimizer.state_dtype=fp32.") from None
    # The checkpoint holds these quantised-state tensors; allow exactly them in weights-only loads.
    torch.serialization.add_safe_globals([OptimState8bit, OptimState4bit])
    return local_shard_step(AdamW8bit if o.state_dtype == "8bit" else AdamW4bit)(groups, **kwargs)


def local_shards(opt: torch.optim.AdamW) -> torch.optim.AdamW:
    """``opt`` (torch's AdamW) with its update run on each parameter's local shard under FSDP2.

    Given DTensors, the fused kernel goes through DTensor's dispatch and sharding propagation for
    a list of several hundred tensors, CPU time during which the GPUs wait: with it (and the
    DTensor gradient norm), the optimizer half of a step of the 1.1B of ``bench/throughput.py``
    took 17.2 ms on 2 H200s against 13.7 ms on one H200 doing twice the arithmetic; on local
    shards, 10.3 ms (``bench/scaling.sh``). The update is elementwise and a parameter, its
    gradient and both moments share FSDP2's ``Shard(0)`` placement, so the lists torch gathers
    (``_init_group``) are handed to the kernel as their local tensors: the same arithmetic on the
    same values. The state stays DTensors, so checkpoints and resharding are unchanged.

    The instance, not a subclass, carries the change: torch wraps ``type(opt).step`` once with its
    profiling hook, and a subclass would keep the base's ``step`` of that moment for good.
    """
    init_group = opt._init_group

    def local_init_group(group, *lists):
        has_complex = init_group(group, *lists)
        for tensors in lists:
            if isinstance(tensors, list):
                tensors[:] = [_local(t) for t in tensors]
        return has_complex

    opt._init_group = local_init_group
    return opt


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def local_shard_step(cls: type) -> type:
    """``cls`` (a torchao low-bit AdamW) with its step run on each parameter's local shard.

    torchao calls its compiled per-parameter update with the tensors it is given; with FSDP2's
    DTensors (the moments are DTensors around torchao's quantised subclass) each call pays
    dynamo's guards and DTensor's dispatch over the nested subclasses: about 2.5 ms of CPU per
    parameter, 0.7 s per step of the 9B worker on two H200s, with the GPUs idle (profiled with
    ``bench/worker_9b.py --profile``). The update is elementwise, and a parameter, its gradient and
    both moments share one placement (FSDP2's ``Shard(0)``), so each rank updates its own shards
    in place: the same arithmetic on the same values, called with plain tensors. The state, and so
    the checkpoints, stay DTensors.
    """
    from torch.distributed.tensor import DTensor
    from torchao.optim.adam import single_param_adam

    local = _local

    class LocalShardStep(cls):
        @torch.no_grad()
        def step(self, closure=None):
            if closure is not None:
                raise ValueError("the low-bit AdamW step takes no closure")
            update = self.__dict__.setdefault("_update", torch.compile(single_param_adam, fullgraph=True,
                                                                        dynamic=False))
            with torch._dynamo.utils.disable_cache_limit():
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is None:
                            continue
                        state = self.state[p]
                        if not state:  # torchao's own initial state
                            if isinstance(p, DTensor) and p.grad.placements != p.placements:
                                raise RuntimeError(f"gradient placement {p.grad.placements} differs from the "
                                                   f"parameter's {p.placements}")
                            state["step"] = torch.tensor(0.0)
                            state["exp_avg"] = self._new_buffer(p, True)
                            state["exp_avg_sq"] = self._new_buffer(p, False)
                            if group["amsgrad"]:
                                state["max_exp_avg_sq"] = self._new_buffer(p, False)
                        state["step"] += 1
                        amsgrad = state.get("max_exp_avg_sq")
                        update(local(p.detach()), local(p.grad), state["step"], local(state["exp_avg"]),
                               local(state["exp_avg_sq"]), None if amsgrad is None else local(amsgrad), group["lr"],
                               group["betas"][0], group["betas"][1], group["weight_decay"], group["eps"],
                               self.is_adamw, self.bf16_stochastic_round and p.dtype is torch.bfloat16)

    LocalShardStep.__name__ = LocalShardStep.__qualname__ = cls.__name__
    return LocalShardStep


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; torchao keeps it as a tensor that must be filled in place."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
