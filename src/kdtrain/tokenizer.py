"""Tokenizer: loading an HF tokenizer directory (offline) and building the toy one.

The toy tokenizer is a real 32,000-piece SentencePiece BPE, the ``tokenizer.model.v1`` file that
the ``mistral-common`` package ships, converted to a Hugging Face tokenizer directory; no hub is
involved. Its pad token is ``<unk>`` (id 0), distinct from EOS, so an EOS in a label is never
mistaken for padding. A model vocabulary larger than 32,000 gets reserved ``<extra_i>`` tokens.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .config import ConfigError

BASE_VOCAB = 32000


def spm_model_path() -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall mistral-common, which ships the toy tokenizer model.")
    return path


def build_toy_tokenizer(out_dir: str | Path, vocab_size: int = BASE_VOCAB):
    """Write an HF tokenizer directory with exactly ``vocab_size`` pieces and return the tokenizer."""
    from transformers import LlamaTokenizer

    if vocab_size < BASE_VOCAB:
        raise ConfigError(f"--vocab {vocab_size}: the toy tokenizer has {BASE_VOCAB} pieces, so the vocabulary "
                          f"must be at least {BASE_VOCAB} (larger sizes add reserved tokens).")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(spm_model_path(), Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=False)
    tok.pad_token = tok.unk_token
    if vocab_size > BASE_VOCAB:
        tok.add_special_tokens({"additional_special_tokens": [f"<extra_{i}>" for i in range(vocab_size - BASE_VOCAB)]})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


def load_tokenizer(path: str | Path, vocab_size: int | None = None, key: str = "io.tokenizer_path"):
    """Load an HF tokenizer directory offline; its size must equal the model's vocabulary. Errors name
    ``key``, the config key or command-line option the path came from."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{key} {path} is not a tokenizer directory (run `kdtrain make-toy` "
                          "or point it at a Hugging Face tokenizer directory).")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError, RecursionError) as e:  # what transformers raises for a bad dir
        raise ConfigError(f"{key} {path} holds no loadable tokenizer ({str(e).splitlines()[0]}); point it at "
                          "a Hugging Face tokenizer directory (tokenizer.json or tokenizer.model).") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {path} has no BOS or EOS token; kdtrain needs both.")
    if vocab_size is not None and len(tok) != vocab_size:
        raise ConfigError(f"tokenizer {path} has {len(tok)} tokens but the model's vocabulary (arch.vocab_size) "
                          f"is {vocab_size}; set arch.vocab_size={len(tok)} or use the matching tokenizer.")
    return tok


def save_for_inference(tok, out_dir: str | Path) -> None:
    """Save ``tok`` so that a plain ``AutoTokenizer`` call reproduces the training format: every
    training row starts with BOS (``[BOS] + prompt + response``), so ``tok(text)`` adds BOS and no EOS."""
    tok.add_bos_token, tok.add_eos_token = True, False
    tok.save_pretrained(out_dir)
