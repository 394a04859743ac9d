"""Shared fixtures: offline Hugging Face, temporary results roots, tiny models saved to disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")


@pytest.fixture
def results_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "results"
    root.mkdir()
    monkeypatch.setenv("EMOTION_RESULTS_DIR", str(root))
    return root


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A tiny random Llama (GQA) plus byte tokenizer saved as a transformers folder."""
    from tests.tiny_models import byte_tokenizer, tiny_llama

    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
