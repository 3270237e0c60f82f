"""Session-scoped toy fixtures: the artifacts are built once per test session (per xdist worker)
in a tmp dir, by the same ``make_toy`` that ``kdtrain make-toy`` runs. Nothing touches a network."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import sys

    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs CUDA")
    if sys.platform != "darwin":
        skips["macos"] = pytest.mark.skip(reason="needs the Core ML runtime (macOS)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> dict:
    """Paths of the toy artifacts: dir, config, dataset, model_init, tokenizer."""
    from kdtrain.toy import make_toy

    return make_toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="session")
def tokenizer(toy):
    from kdtrain.tokenizer import load_tokenizer

    return load_tokenizer(toy["tokenizer"], 32000)


@pytest.fixture(scope="session")
def dataset(toy, tokenizer):
    from kdtrain.data import load_dataset

    return load_dataset([toy["dataset"]], tokenizer, 32000)


@pytest.fixture
def make_cfg(toy, tmp_path):
    """``make_cfg(*overrides)`` -> the toy Config writing into this test's tmp dir."""
    from kdtrain.config import load_config

    def make(*overrides: str, files=()):
        cfg, _ = load_config([toy["config"], *files], [f"io.output_dir={tmp_path / 'run'}", *overrides])
        return cfg

    return make


@pytest.fixture
def toy_cfg(make_cfg):
    return make_cfg()


@pytest.fixture(scope="session")
def toy_pair(toy) -> dict:
    """A toy teacher with another tokenizer (byte-level BPE) beside the toy artifacts: teacher, tokenizer."""
    from kdtrain.toy import make_toy_pair

    return make_toy_pair(toy["dir"])
