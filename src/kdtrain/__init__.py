"""kdtrain: knowledge distillation of a large teacher LM into a small decoder-only student.

Pipeline stages, one module each: config -> data (+ tokenizer) -> model / teacher -> losses ->
trainer (+ distributed) -> checkpoint / metrics -> cli. ``toy`` builds the offline toy
artifacts, ``smoke`` the end-to-end report.
"""

__version__ = "0.1.0"

import logging as _logging

# transformers imports torchao whenever it is installed (the lowbit extra); torchao then warns that
# its CUDA-only kernels do not load on a CPU build, and torch about its enum registrations: noise
# on every command, none of it the user's to act on.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
