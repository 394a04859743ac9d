"""Bad input to the foundation: each error names the input and the fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from emotion_assets.profiles import ProfileError, get_profile, load_profiles
from emotion_assets.registry import RegistryError, load_registry
from resources.device import DeviceError, resolve_device, resolve_dtype
from resources.models import ModelGeometryError, ModelResource, ModelUnavailableError, clear_model_cache
from resources.storage import atomic_path, write_json


def _registry(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_unknown_model_names_registered_ones():
    with pytest.raises(RegistryError, match=r"Unknown model 'no-such-model'.*smollm2-135m.*data/models.yaml"):
        ModelResource().get("no-such-model")


def test_reference_model_without_local_copy_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))
    with pytest.raises(ModelUnavailableError) as err:
        ModelResource().get("gpt2")
    message = str(err.value)
    assert "gpt2" in message and "not available offline" in message
    assert "huggingface-cli download gpt2" in message and "path:" in message


def test_unavailable_device_lists_available_ones():
    wanted = "mps" if torch.cuda.is_available() else "cuda:7"
    with pytest.raises(DeviceError, match=r"not available on this machine\. Available: .*cpu"):
        resolve_device(wanted)
    with pytest.raises(DeviceError, match="Unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="Unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    assert resolve_device("auto").type in {"cuda", "mps", "cpu"}


def test_model_resource_refuses_unavailable_device():
    with pytest.raises(DeviceError, match="Available"):
        ModelResource(device="cuda:7" if not torch.cuda.is_available() else "mps").get("minilm-l6")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            """
            version: 1
            default_model: m
            models:
              m: {kind: decoder, source: {type: huggingface, id: x}, width: 8, layers: 1, heads: 2, kv_heads: 2}
            """,
            r"models\.m\.kind: Input should be 'causal_lm' or 'encoder' \(got 'decoder'\)",
        ),
        (
            """
            version: 1
            default_model: m
            models:
              m: {kind: causal_lm, source: {type: ftp, id: x}, width: 8, layers: 1, heads: 2, kv_heads: 2}
            """,
            r"models\.m\.source.*ftp",
        ),
        (
            """
            version: 1
            default_model: m
            models:
              m: {kind: causal_lm, source: {type: huggingface, id: x}, width: -8, layers: 1, heads: 3, kv_heads: 2}
            """,
            r"models\.m\.width: Input should be greater than 0",
        ),
        (
            """
            version: 1
            default_model: m
            models:
              m: {kind: causal_lm, source: {type: random_twin, of: ghost}, width: 8, layers: 1, heads: 2, kv_heads: 2}
            """,
            r"random_twin of unknown model 'ghost'",
        ),
        ("models: [1, 2]", r"must be a mapping with a `models:` mapping"),
        ("version: 1\nmodels: {m: {kind: [unclosed", r"not valid YAML"),
    ],
)
def test_malformed_registry_entries_are_named(tmp_path, body, expected):
    with pytest.raises(RegistryError, match=expected):
        load_registry(_registry(tmp_path, body))


def test_registry_geometry_mismatch_is_refused(tmp_path, tiny_llama_dir):
    path = _registry(
        tmp_path,
        f"""
        version: 1
        default_model: tiny
        models:
          tiny: {{kind: causal_lm, source: {{type: huggingface, id: tiny, path: "{tiny_llama_dir}"}},
                  width: 65, layers: 3, heads: 4, kv_heads: 2}}
        """,
    )
    clear_model_cache()
    with pytest.raises(ModelGeometryError, match=r"`width` .* is 65 in the registry but 64 .*models\.yaml"):
        ModelResource(registry_path=str(path), device="cpu").get("tiny")


def test_local_path_model_loads_once_per_process(tmp_path, tiny_llama_dir):
    from resources.models import LOAD_COUNTS

    path = _registry(
        tmp_path,
        f"""
        version: 1
        default_model: tiny
        models:
          tiny: {{kind: causal_lm, source: {{type: huggingface, id: tiny, path: "{tiny_llama_dir}"}},
                  width: 64, layers: 3, heads: 4, kv_heads: 2}}
        """,
    )
    clear_model_cache()
    before = LOAD_COUNTS["tiny"]
    resource = ModelResource(registry_path=str(path), device="cpu")
    first = resource.get("tiny")
    second = ModelResource(registry_path=str(path), device="cpu").get("tiny")
    assert first is second
    assert LOAD_COUNTS["tiny"] == before + 1
    assert first.tokenizer.padding_side == "left"
    assert first.geometry.group_size == 2


def test_unknown_profile_and_bad_profile_fields(tmp_path):
    with pytest.raises(ProfileError, match=r"Unknown profile 'nope'\. Defined profiles: smoke, baseline"):
        get_profile("nope")
    bad = tmp_path / "profiles.yaml"
    bad.write_text(
        textwrap.dedent(
            """
            version: 1
            profiles:
              broken:
                dataset: {path: data/prompts/emotion_prompts.jsonl, eval_fraction: 1.5}
                pooling: [last, max]
                steering: {layers: [1], alpha_grid: [0.1, 0.2]}
                batch_size: 0
            """
        )
    )
    with pytest.raises(ProfileError) as err:
        load_profiles(bad)
    message = str(err.value)
    assert "profiles.broken.dataset.eval_fraction" in message
    assert "profiles.broken.pooling.1" in message
    assert "alpha_grid must contain 0.0" in message
    assert "profiles.broken.batch_size" in message


def test_alignment_anchor_views_must_be_captured(tmp_path):
    path = tmp_path / "profiles.yaml"
    path.write_text(
        textwrap.dedent(
            """
            version: 1
            profiles:
              narrow:
                dataset: {path: data/prompts/emotion_prompts.jsonl}
                pooling: [last]
                steering: {layers: [1], alpha_grid: [-0.2, 0.0, 0.2]}
                alignment: {anchor_poolings: [last, mean]}
            """
        )
    )
    with pytest.raises(
        ProfileError, match=r"alignment.anchor_poolings \['mean'\] are not captured: add them to `pooling`"
    ):
        load_profiles(path)
    path.write_text(path.read_text().replace("[last, mean]}", "[last]}"))
    assert load_profiles(path)["narrow"].alignment.anchor_poolings == ["last"]


def test_interrupted_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "results" / "smoke" / "x" / "table.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"half": ')
        raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    write_json(target, {"ok": 1})
    assert target.read_text().strip().startswith("{")


def test_killed_process_leaves_no_file_under_final_name(tmp_path):
    target = tmp_path / "big.json"
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from resources.storage import atomic_path
        with atomic_path(Path({str(target)!r})) as tmp:
            tmp.write_text("partial")
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=os.getcwd())
    assert proc.stdout.readline().strip() == b"writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".tmp-") for p in leftovers)
