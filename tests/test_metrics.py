"""Metrics sinks beyond metrics.jsonl: W&B in offline mode (no network) and the loss plot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kdtrain.metrics import plot_losses
from kdtrain.trainer import Trainer


@pytest.mark.slow
def test_wandb_offline_run_records_every_step(make_cfg, monkeypatch):
    pytest.importorskip("wandb", reason="the [wandb] extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg("train.steps=3", "tracing.use_wandb=true", "tracing.console_log=false", "io.val_shards=[]")
    Trainer(cfg).fit()
    runs = list((Path(cfg.io.output_dir) / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # The offline run file holds protobuf HistoryItems: key (field 2) then value_json (field 16).
    raw = runs[0].read_bytes()

    def values(key: bytes) -> list[float]:
        out = []
        for m in re.finditer(b"\x12" + bytes([len(key)]) + key + b"\x82\x01(.)", raw, re.S):
            out.append(float(raw[m.end(): m.end() + m.group(1)[0]]))
        return out

    logged = dict(zip(values(b"_step"), values(b"total")))  # history, then the same values in the summary
    rows = [json.loads(l) for l in (Path(cfg.io.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert logged == {r["step"]: pytest.approx(r["total"]) for r in rows}


def test_loss_plot_is_a_png_of_the_curves(tmp_path):
    rows = [{"step": i, "total": 10 / i, "kl_div": 5 / i, "ce_teacher": 4 / i, "ce_ground_truth": 0.0}
            for i in range(1, 6)]
    rows[-1]["val_total"] = 2.5
    plot_losses(rows, tmp_path / "curve.png")
    data = (tmp_path / "curve.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
