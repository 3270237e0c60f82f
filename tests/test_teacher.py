"""Teacher signals: an online teacher equals the same teacher stored as full-vocabulary top-k,
vocabulary checks, and clear errors for paths that are not causal LMs."""

from __future__ import annotations

import json

import pytest
import torch

from kdtrain.config import ConfigError
from kdtrain.data import collate
from kdtrain.model import Distiller, build_student, step_counts
from kdtrain.teacher import OnlineTeacher, load_teacher_model


@pytest.fixture(scope="module")
def teacher_model(toy):
    return load_teacher_model(toy["teacher"], "cpu")


def _batch_and_student(make_cfg, dataset, tokenizer, *overrides):
    cfg = make_cfg("distillation.ce_ground_truth_weight=0", *overrides)
    student = build_student(cfg)
    batch = collate(dataset.samples[:3], 64, tokenizer.pad_token_id, 0, False)
    return cfg, student, batch


@pytest.mark.smoke
def test_online_teacher_equals_offline_full_vocabulary_topk(make_cfg, dataset, tokenizer, teacher_model):
    """k = V stores the whole teacher distribution, so the sparse path must give the online KL."""
    cfg, student, batch = _batch_and_student(make_cfg, dataset, tokenizer, "kd.temperature=2.0")
    with torch.no_grad():
        logp = torch.log_softmax(teacher_model(input_ids=batch["input_ids"]).logits.float(), dim=-1)
    top = logp.topk(logp.shape[-1], dim=-1)
    sparse = {**batch, "topk_ids": top.indices, "topk_logprobs": top.values, "topk_mask": batch["labels"] != -100}
    counts = step_counts([sparse])
    offline = Distiller(student, cfg, topk_temperature=1.0)(sparse, counts)
    online = Distiller(student, cfg)(batch, {**counts, "n_kl": counts["n_ce_teacher"]},
                                     teacher=OnlineTeacher(teacher_model, 32000))
    for key in ("kl_div", "ce_teacher", "total"):
        torch.testing.assert_close(offline[key], online[key], rtol=1e-5, atol=1e-5)
    assert online["kl_div"] > 0.1  # a real teacher: the untrained student is far from it


def test_padded_teacher_vocabulary_drops_the_padding_rows(make_cfg, dataset, tokenizer, teacher_model, toy):
    padded = load_teacher_model(toy["teacher"], "cpu")
    padded.resize_token_embeddings(32064, mean_resizing=False)
    with torch.no_grad():
        padded.get_output_embeddings().weight[32000:] = 50.0  # would dominate the softmax if kept
    cfg, student, batch = _batch_and_student(make_cfg, dataset, tokenizer)
    counts = step_counts([batch])
    counts["n_kl"] = counts["n_ce_teacher"]
    a = Distiller(student, cfg)(batch, counts, teacher=OnlineTeacher(teacher_model, 32000))
    b = Distiller(student, cfg)(batch, counts, teacher=OnlineTeacher(padded, 32000))
    torch.testing.assert_close(a["kl_div"], b["kl_div"], rtol=1e-6, atol=1e-6)


def test_teacher_smaller_than_student_vocabulary_is_refused(teacher_model):
    with pytest.raises(ConfigError, match=r"teacher's vocabulary \(32000\) is smaller than the student's \(32064\)"):
        OnlineTeacher(teacher_model, 32064)


@pytest.mark.parametrize("config, expect", [
    (None, "no config.json"),
    ({"model_type": "t5", "d_model": 8, "num_layers": 1, "num_heads": 1, "d_kv": 8, "d_ff": 8, "vocab_size": 10},
     "not a loadable causal language model"),
])
def test_teacher_path_that_is_not_a_causal_lm(tmp_path, config, expect):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=expect):
        load_teacher_model(tmp_path, "cpu")


def test_online_teacher_training_run(make_cfg, toy):
    from kdtrain.trainer import Trainer

    cfg = make_cfg("kd.teacher=online", f"kd.teacher_path={toy['teacher']}", "train.steps=12", "io.val_shards=[]")
    rows = Trainer(cfg, log=False).fit()
    assert rows[0]["kl_div"] > 0 and rows[-1]["kl_div"] < rows[0]["kl_div"]


# ---- a teacher with another tokenizer ----

def test_online_teacher_kind_follows_the_tokenizer_in_the_teacher_directory(toy, toy_pair, tokenizer):
    from kdtrain.teacher import CrossTeacher, online_teacher

    assert isinstance(online_teacher(toy["teacher"], "cpu", torch.float32, tokenizer), OnlineTeacher)  # none saved
    assert isinstance(online_teacher(toy_pair["teacher"], "cpu", torch.float32, tokenizer), CrossTeacher)


def test_cross_teacher_batch_rows_equal_the_annotated_rows(toy, toy_pair, dataset, tokenizer, tmp_path):
    """Online and offline agree: the rows a CrossTeacher computes for a collated batch are the rows
    `kdtrain annotate` stores for the same records (same positions, same ids, same log-probs)."""
    from kdtrain.annotate import annotate
    from kdtrain.teacher import online_teacher

    out = tmp_path / "cross.jsonl"
    annotate(toy["dataset"], out, toy_pair["teacher"], toy["tokenizer"], k=8)
    recs = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    teacher = online_teacher(toy_pair["teacher"], "cpu", torch.float32, tokenizer)
    samples = dataset.samples[:4]
    batch = collate(samples, 64, tokenizer.pad_token_id, 0, False)
    rows = teacher.topk_batch(batch, k=8)
    for b, (s, rec) in enumerate(zip(samples, recs)):
        start = len(s.prompt_ids) - 1
        n = len(rec["response_ids"])
        assert rows["topk_mask"][b, start: start + n].tolist() == [r is not None for r in rec["teacher_topk"]["ids"]]
        for j, (ri, rl) in enumerate(zip(rec["teacher_topk"]["ids"], rec["teacher_topk"]["logprobs"])):
            if ri is not None:
                assert rows["topk_ids"][b, start + j].tolist() == ri
                torch.testing.assert_close(rows["topk_logprobs"][b, start + j], torch.tensor(rl), rtol=0, atol=1e-5)
    assert not rows["topk_mask"][b, start + n:].any()


def test_online_training_with_a_teacher_of_another_tokenizer(make_cfg, toy_pair):
    from kdtrain.trainer import Trainer

    cfg = make_cfg("kd.teacher=online", f"kd.teacher_path={toy_pair['teacher']}", "train.steps=10", "io.val_shards=[]",
                   "distillation.ce_ground_truth_weight=0")
    rows = Trainer(cfg, log=False).fit()
    assert rows[0]["kl_div"] > 0 and rows[-1]["kl_div"] < rows[0]["kl_div"]


def test_online_teacher_of_another_tokenizer_equals_its_annotated_rows(make_cfg, toy, toy_pair, tmp_path):
    """kd.teacher=online with the pair teacher and kd.teacher=topk on what `kdtrain annotate` wrote
    with it (k = 64) train the same: the same first losses, kl_div normalised by aligned positions."""
    from kdtrain.annotate import annotate
    from kdtrain.trainer import Trainer

    out = tmp_path / "cross.jsonl"
    annotate(toy["dataset"], out, toy_pair["teacher"], toy["tokenizer"], k=64)
    common = ("train.steps=2", "io.val_shards=[]", "distillation.ce_ground_truth_weight=0")
    online = Trainer(make_cfg("kd.teacher=online", f"kd.teacher_path={toy_pair['teacher']}", *common,
                              f"io.output_dir={tmp_path / 'online'}"), log=False).fit()
    offline = Trainer(make_cfg(f"io.train_shards=[{out}]", *common, f"io.output_dir={tmp_path / 'offline'}"),
                      log=False).fit()
    for a, b in zip(online, offline):
        for key in ("kl_div", "ce_teacher", "total"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
