"""Names and YAML files enter checked: unsafe names, duplicate keys and non-UTF-8 files are named errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from emotion_assets.profiles import ProfileError, load_profiles
from emotion_assets.registry import RegistryError, load_registry
from emotion_assets.yaml_loading import name_problem

PROFILE_BODY = """
    dataset: {path: data/prompts/emotion_prompts.jsonl}
    steering: {layers: [1], alpha_grid: [-0.1, 0.0, 0.1]}
"""
MODEL_BODY = (
    "{kind: causal_lm, source: {type: huggingface, id: x}, width: 8, layers: 1, heads: 2, kv_heads: 2}"
)

# Names that would leave their folder, break partition keys or pair keys (all seen in the wild or obvious).
UNSAFE_PROFILE_NAMES = [
    "mine/../smoke",
    "../../relia_escape",
    "..",
    "a|b",
    ".hidden",
    "a b",
    "a\\b",
    "x" * 101,
    "",
    "-leading-dash",
]
UNSAFE_MODEL_NAMES = ["../../../../x", "a__b", "m/..", "m|n", "..m", "~root"]


def _profiles(tmp_path: Path, names: list[str]) -> Path:
    body = textwrap.indent(textwrap.dedent(PROFILE_BODY).strip(), "    ")
    entries = "".join(f"  {json.dumps(name)}:\n{body}\n" for name in names)
    path = tmp_path / "profiles.yaml"
    path.write_text(f"version: 1\nprofiles:\n{entries}", encoding="utf-8")
    return path


def _registry(tmp_path: Path, names: list[str], pairs: str = "[]") -> Path:
    entries = "".join(f"  {json.dumps(name)}: {MODEL_BODY}\n" for name in names)
    path = tmp_path / "models.yaml"
    path.write_text(
        f"version: 1\ndefault_model: {json.dumps(names[0])}\nmodels:\n{entries}pairs: {pairs}\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("name", UNSAFE_PROFILE_NAMES)
def test_unsafe_profile_name_is_refused_naming_file_entry_and_rule(tmp_path, name):
    path = _profiles(tmp_path, ["ok", name])
    with pytest.raises(ProfileError) as err:
        load_profiles(path)
    message = str(err.value)
    assert str(path) in message and f"profile name {name!r}" in message
    assert "letters, digits" in message and "Rename it" in message


@pytest.mark.parametrize("name", UNSAFE_MODEL_NAMES)
def test_unsafe_model_name_is_refused(tmp_path, name):
    path = _registry(tmp_path, ["good-model", name])
    with pytest.raises(RegistryError) as err:
        load_registry(path)
    message = str(err.value)
    assert str(path) in message and f"model name {name!r}" in message and "'__'" in message


def test_unsafe_pair_entry_is_refused_even_before_lookup(tmp_path):
    path = _registry(tmp_path, ["a", "b"], pairs="[[a, '../../x']]")
    with pytest.raises(RegistryError, match=r"pairs\[0\] model '\.\./\.\./x' is not allowed"):
        load_registry(path)
    with pytest.raises(RegistryError, match=r"pairs\[0\] must be a \[MODEL_A, MODEL_B\] list"):
        load_registry(_registry(tmp_path, ["a", "b"], pairs="[[a, b, a]]"))


def test_safe_names_pass_and_the_shipped_files_are_clean(tmp_path):
    for name in ("smoke", "baseline", "llama-3.1-8b", "gemma-3-12b-it", "A_b.9"):
        assert name_problem(name) is None and name_problem(name, model=True) is None
    assert name_problem("x__y") is None  # allowed in profiles, not in models
    assert name_problem("x__y", model=True) is not None
    assert set(load_profiles(_profiles(tmp_path, ["my_profile.v2"]))) == {"my_profile.v2"}
    load_registry()  # data/models.yaml
    load_profiles()  # data/profiles.yaml


def test_duplicate_profile_is_an_error_naming_key_and_both_lines(tmp_path):
    path = _profiles(tmp_path, ["smoke", "other", "smoke"])
    with pytest.raises(ProfileError) as err:
        load_profiles(path)
    message = str(err.value)
    assert str(path) in message and "key 'smoke' appears twice" in message
    assert "lines 3 and 9" in message


def test_duplicate_nested_key_and_duplicate_model_are_errors(tmp_path):
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "profiles:\n  p:\n    dataset: {path: a.jsonl}\n    seed: 1\n    steering: {layers: [1]}\n    seed: 2\n",
        encoding="utf-8",
    )
    with pytest.raises(ProfileError, match=r"key 'seed' appears twice in the same mapping \(lines 4 and 6\)"):
        load_profiles(path)
    with pytest.raises(RegistryError, match=r"key 'm' appears twice"):
        load_registry(_registry(tmp_path, ["m", "n", "m"]))


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "profiles.yaml"
    body = textwrap.indent(textwrap.dedent(PROFILE_BODY).strip(), "    ")
    path.write_text(
        f"profiles:\n  base: &base\n{body}\n    seed: 1\n  child:\n    <<: *base\n    seed: 2\n",
        encoding="utf-8",
    )
    profiles = load_profiles(path)
    assert (profiles["base"].seed, profiles["child"].seed) == (1, 2)


def test_non_utf8_yaml_names_the_file_and_line(tmp_path):
    path = _profiles(tmp_path, ["ok"])
    path.write_bytes(path.read_bytes().replace(b"version: 1", b"# caf\xe9\nversion: 1"))
    with pytest.raises(
        ProfileError, match=r"profiles\.yaml is not UTF-8 text: byte 0xe9 at line 1.*Save the file as UTF-8"
    ):
        load_profiles(path)
    registry = _registry(tmp_path, ["m"])
    registry.write_bytes(b"\xff\xfe" + registry.read_bytes())
    with pytest.raises(RegistryError, match=r"Model registry .*models\.yaml is not UTF-8 text"):
        load_registry(registry)
