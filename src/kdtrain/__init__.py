"""kdtrain: knowledge distillation of a large teacher LM into a small decoder-only student.

Pipeline stages, one module each: config -> data (+ tokenizer) -> model / teacher -> losses ->
trainer (+ distributed) -> checkpoint / metrics -> cli. ``toy`` builds the offline toy
artifacts, ``smoke`` the end-to-end report.
"""

__version__ = "0.1.0"
