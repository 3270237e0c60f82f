"""The optimizer: AdamW with exact fp32 moments, or with low-bit moments from torchao.

``optimizer.state_dtype`` chooses how the two AdamW moments are stored; the weights and
gradients stay fp32 (sharded by FSDP2 across GPUs) and every update is computed in fp32:

- ``fp32`` (default): ``torch.optim.AdamW(fused=True)``, 8 bytes of state per parameter. The
  fused kernel runs on CUDA and on the CPU (offloaded shards), 12x the per-tensor loop there.
- ``8bit``: ``torchao.optim.AdamW8bit``, block-wise dynamic-tree quantised moments (blocks of
  256 values, one fp32 scale each): 2.03 bytes per parameter.
- ``4bit``: ``torchao.optim.AdamW4bit`` (blocks of 128, a linear map for the second moment):
  1.06 bytes per parameter.

Low-bit state is what fits the 9B worker on 2 x 80 GB without CPU offload: 16 B/param of
training state becomes 10.03 (8-bit) or 9.06 (4-bit). torchao quantises a tensor only when its
local shard has at least 4,096 values and a multiple of the block size; the others (norms, odd
shards) keep fp32 moments. Its step is ``torch.compile``d once per parameter shape, and its
learning rate is a tensor: set it with ``set_lr``.
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
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    try:
        from torchao.optim import AdamW4bit, AdamW8bit
        from torchao.optim.subclass_4bit import OptimState4bit
        from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError:
        raise ConfigError(f"optimizer.state_dtype={o.state_dtype} needs torchao: pip install 'kdtrain[lowbit]', "
                          "or set optimizer.state_dtype=fp32.") from None
    # The checkpoint holds these quantised-state tensors; allow exactly them in weights-only loads.
    torch.serialization.add_safe_globals([OptimState8bit, OptimState4bit])
    cls = AdamW8bit if o.state_dtype == "8bit" else AdamW4bit
    return cls(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; torchao keeps it as a tensor that must be filled in place."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
