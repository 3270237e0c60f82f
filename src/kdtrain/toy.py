"""Toy artifacts, built in code, offline and seeded: ``kdtrain make-toy`` and the test fixtures
both call ``make_toy``.

* ``tokenizer/``: the 32,000-piece SentencePiece tokenizer (see ``tokenizer.py``).
* ``toy_dataset.jsonl``: KD JSONL v1 records (prompt, teacher_text, reference, response_ids,
  teacher_topk). The top-k rows are real: a small teacher LM is fitted for 20 steps on
  the toy prompts and responses (seeded), then run over each sample; row ``j`` holds its
  ``TOPK`` most likely tokens for response token ``j`` and their log-probabilities.
* ``teacher/``: that teacher as a Hugging Face checkpoint (for ``kd.teacher: online``).
* ``toy_model_init.pt``: the student's initial weights (a weights-only state dict).
* ``toy_config.yaml``: a complete config whose relative paths point at the files above.

The same flags give the same bytes, on any CPU: everything stored is drawn or fitted in float64
(see ``_fit_teacher``), so no float32 kernel's instruction-set-specific rounding reaches the files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import yaml

from .config import Config, ConfigError, build_config
from .model import llama_config

TOPK = 8
TEACHER_STEPS = 20
TEACHER_ARCH = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_head": 16, "d_ff": 256}
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens")]
OPPOSITES = [("hot", "cold"), ("up", "down"), ("early", "late"), ("light", "dark"), ("open", "closed"),
             ("full", "empty"), ("fast", "slow"), ("young", "old"), ("wet", "dry"), ("loud", "quiet")]


def toy_samples(n: int, seed: int = 0) -> list[dict]:
    """``n`` small question/answer records with a gold ``reference``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(2, 49), rng.randint(2, 49)
            rec = {"prompt": f"What is {a} + {b}?", "teacher_text": f"{a} plus {b} equals {a + b}.",
                   "reference": f"{a + b}"}
        elif kind == 1:
            c, cap = rng.choice(CAPITALS)
            rec = {"prompt": f"What is the capital of {c}?", "teacher_text": f"The capital of {c} is {cap}.",
                   "reference": cap}
        else:
            w, o = rng.choice(OPPOSITES)
            rec = {"prompt": f"What is the opposite of '{w}'?", "teacher_text": f"The opposite of {w} is {o}.",
                   "reference": o}
        out.append({"id": f"toy-{i}", **rec})
    return out


def _encode(tok, rec: dict) -> tuple[list[int], list[int]]:
    prompt = [tok.bos_token_id] + tok.encode(rec["prompt"], add_special_tokens=False)
    response = tok.encode(rec["teacher_text"], add_special_tokens=False) + [tok.eos_token_id]
    return prompt, response


def _fit_teacher(tok, vocab: int, rows: list[tuple[list[int], list[int]]], seed: int):
    """A small teacher LM fitted on the toy responses, so its top-k rows carry real signal.

    Fitted in float64 and returned in float32 (the saved checkpoint's dtype): torch's float32
    kernels differ in their last bits between CPU instruction sets (AVX-512, AVX2, none), and 20
    Adam steps would carry those bits into every stored number. In float64 they stay ~1e-16,
    far below the float32 rounding of the weights and the 6 decimals of the stored log-probs.
    """
    from transformers import LlamaForCausalLM

    from .model import seeded_init

    cfg = Config()
    for key, value in TEACHER_ARCH.items():
        setattr(cfg.arch, key, value)
    cfg.arch.vocab_size = vocab
    teacher = LlamaForCausalLM(llama_config(cfg.arch, pad_id=tok.pad_token_id))
    seeded_init(teacher, seed + 1, cfg.init.std)
    teacher.double()
    S = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), S), tok.pad_token_id)
    labels = torch.full((len(rows), S), -100)  # shifted: labels[t] is the token position t predicts
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) - 1: len(p) - 1 + len(r)] = torch.tensor(r)
    valid = labels != -100
    # The random input embedding stays frozen: fitting it costs more than the rest and adds little.
    teacher.model.embed_tokens.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in teacher.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    for _ in range(TEACHER_STEPS):
        hidden = teacher.model(input_ids=ids).last_hidden_state[valid]  # the head only where it is learnt
        loss = torch.nn.functional.cross_entropy(teacher.lm_head(hidden), labels[valid])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return teacher.float().eval(), ids


def make_toy(out_dir: str | Path = "toy", samples: int = 10, steps: int = 5, dmodel: int = 64, nlayers: int = 2,
             vocab: int = 32000, seed: int = 0) -> dict:
    """Build every toy artifact in ``out_dir``; returns their paths."""
    from transformers import LlamaForCausalLM

    from .model import seeded_init
    from .tokenizer import build_toy_tokenizer

    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_toy_tokenizer(out / "tokenizer", vocab)
    records = toy_samples(samples, seed)
    rows = [_encode(tok, r) for r in records]
    teacher, ids = _fit_teacher(tok, vocab, rows, seed)
    with torch.no_grad():  # the saved float32 weights, run in float64: the same bytes on any CPU
        logprobs = torch.log_softmax(teacher.double()(input_ids=ids).logits, dim=-1)
    teacher.float()
    lines = [json.dumps({"__header__": {"format": "kd-jsonl-v1", "tokenizer": "mistral-common tokenizer.model.v1",
                                        "k": TOPK, "teacher": "toy teacher fitted in code", "seed": seed}})]
    for i, (rec, (p, r)) in enumerate(zip(records, rows)):
        top = logprobs[i, len(p) - 1: len(p) - 1 + len(r)].topk(TOPK, dim=-1)
        rec = {**rec, "response_ids": r, "teacher_topk": {
            "ids": top.indices.tolist(),
            "logprobs": [[min(round(v, 6), 0.0) for v in row] for row in top.values.tolist()],
            "temperature": 1.0}}
        lines.append(json.dumps(rec))
    (out / "toy_dataset.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    teacher.save_pretrained(out / "teacher")  # for kd.teacher=online and `kdtrain annotate`

    cfg = build_config({
        "arch": {"d_model": dmodel, "n_layers": nlayers, "n_heads": 4, "n_kv_heads": 2, "d_head": dmodel // 4,
                 "d_ff": 4 * dmodel, "vocab_size": vocab, "max_seq_len": 128},
        "init": {"seed": seed, "weights": "toy_model_init.pt"},
        "optimizer": {"lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.01},
        "train": {"steps": steps, "seq_lengths": [64], "micro_batch_size": 2, "loss_chunk_size": 64},
        "io": {"tokenizer_path": "tokenizer", "train_shards": ["toy_dataset.jsonl"],
               "val_shards": ["toy_dataset.jsonl"], "output_dir": "run"},
        "distillation": {"kl_weight": 1.0, "ce_teacher_weight": 0.5, "ce_ground_truth_weight": 0.5},
    })
    # The seeded init of `init.seed` (the same weights `build_student` draws without init.weights).
    student = LlamaForCausalLM(llama_config(cfg.arch, cfg.init.std, pad_id=tok.pad_token_id))
    seeded_init(student, seed, cfg.init.std)
    torch.save(student.state_dict(), out / "toy_model_init.pt")
    (out / "toy_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    return {"dir": out, "config": out / "toy_config.yaml", "dataset": out / "toy_dataset.jsonl",
            "model_init": out / "toy_model_init.pt", "tokenizer": out / "tokenizer", "teacher": out / "teacher"}


PAIR_VOCAB = 700  # the pair tokenizer's size limit: the toy corpus offers merges for 561 tokens in all
PAIR_CORPUS = 300  # toy records the pair tokenizer is trained on


def make_toy_pair(out_dir: str | Path = "toy", samples: int = 10, seed: int = 0) -> dict:
    """A teacher with another tokenizer, for cross-tokenizer distillation: ``pair_teacher/`` holds a
    byte-level BPE tokenizer (561 tokens, trained with ``tokenizers`` on the toy corpus;
    no dummy prefix, ``Ġ`` for spaces) and a toy teacher fitted on it like ``make_toy``'s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    out = Path(out_dir) / "pair_teacher"
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=PAIR_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [t for r in toy_samples(PAIR_CORPUS, seed + 7) for t in (r["prompt"], r["teacher_text"])]
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(out)
    rows = [_encode(tok, r) for r in toy_samples(samples, seed)]
    teacher, _ = _fit_teacher(tok, len(tok), rows, seed + 100)
    hf_logging.disable_progress_bar()
    teacher.save_pretrained(out)
    return {"teacher": out, "tokenizer": out}
