"""The toy tokenizer (``kdtrain/tokenizer.py``): the real 32,000-piece SentencePiece model, offline,
and the vocabulary-size checks. Building a tokenizer costs about a second, so few tests build one."""

from __future__ import annotations

import pytest

from kdtrain.config import ConfigError
from kdtrain.tokenizer import build_toy_tokenizer, load_tokenizer, spm_model_path

TEXTS = ["What is the capital of Norway?", "The capital of Norway is Oslo.", "12 plus 30 equals 42.",
         "Ça va? Héllo — wörld!\nA second line,\twith a tab."]


@pytest.mark.smoke
def test_toy_tokenizer_is_the_32000_piece_model(tokenizer):
    assert len(tokenizer) == tokenizer.vocab_size == 32000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert all(0 <= i < 32000 for i in ids)
        assert tokenizer.decode(ids) == text


def test_toy_tokenizer_encodes_like_the_sentencepiece_model(tokenizer):
    """Independent check: the HF tokenizer gives the ids that SentencePiece itself gives."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model_path()))
    assert sp.get_piece_size() == 32000
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)
    for text in TEXTS[:3]:
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)


def test_load_tokenizer_refuses_a_vocab_mismatch(toy):
    with pytest.raises(ConfigError) as e:
        load_tokenizer(toy["tokenizer"], 32064)
    msg = str(e.value)
    assert "32000" in msg and "32064" in msg and "arch.vocab_size" in msg, msg


def test_larger_vocab_adds_reserved_tokens_and_keeps_the_base_ids(tmp_path, tokenizer):
    out = tmp_path / "tok32064"
    built = build_toy_tokenizer(out, 32064)
    assert len(built) == 32064
    loaded = load_tokenizer(out, 32064)  # what a run with arch.vocab_size=32064 loads
    assert len(loaded) == 32064
    assert loaded.convert_tokens_to_ids(["<extra_0>", "<extra_63>"]) == [32000, 32063]
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    for text in TEXTS:
        assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    with pytest.raises(ConfigError, match="32000"):
        load_tokenizer(out, 32000)


def test_vocab_below_32000_raises_before_writing(tmp_path):
    out = tmp_path / "small"
    with pytest.raises(ConfigError, match=r"31999.*32000"):
        build_toy_tokenizer(out, 31999)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_load_tokenizer_needs_a_directory(tmp_path, kind):
    path = tmp_path / "tokenizer"
    if kind == "file":
        path.write_text("not a tokenizer")
    with pytest.raises(ConfigError) as e:
        load_tokenizer(path, 32000)
    msg = str(e.value)
    assert str(path) in msg and "io.tokenizer_path" in msg and "directory" in msg, msg
