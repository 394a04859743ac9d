"""Reading the user's YAML files and names: nothing is dropped or reinterpreted silently.

* :func:`load_yaml` refuses a key that appears twice in one mapping (plain ``yaml.safe_load`` keeps the
  last one and drops the other without a word) and a file that is not UTF-8, naming the file, the key and
  both lines.
* :func:`check_name` is the rule for every name that becomes a folder under ``results/`` (profiles,
  models, model pairs): it enters the code here, so no later path join can leave its folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_MAX_LENGTH = 100
NAME_RULE = (
    "names may use only letters, digits, '.', '_' and '-', must start with a letter or digit, may not "
    f"contain '..' and are at most {NAME_MAX_LENGTH} characters (each one becomes a folder name under "
    "results/ and part of a Dagster partition key)"
)
MODEL_NAME_RULE = f"{NAME_RULE}; model names may not contain '__', which separates the two models of a pair"


def name_problem(name: object, *, model: bool = False) -> str | None:
    """Why ``name`` is not a safe profile / model name, or None when it is."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__} {name!r}"
    if not NAME_PATTERN.match(name) or ".." in name or len(name) > NAME_MAX_LENGTH:
        return MODEL_NAME_RULE if model else NAME_RULE
    if model and "__" in name:
        return MODEL_NAME_RULE
    return None


def check_name(
    name: object, *, file: Path | str, entry: str, error: type[Exception], model: bool = False
) -> None:
    """Raise ``error`` naming the file, the entry and the rule when ``name`` is not a safe name."""
    problem = name_problem(name, model=model)
    if problem is not None:
        raise error(f"{file}: {entry} {name!r} is not allowed: {problem}. Rename it in {file}.")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated within one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merges are explicit overrides, not duplicates
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader reports unhashable keys itself
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first_line: int, second_line: int) -> None:
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first_line} and {second_line})")
        self.key, self.first_line, self.second_line = key, first_line, second_line


def load_yaml(path: Path, *, error: type[Exception], label: str) -> Any:
    """Parse ``path`` as UTF-8 YAML; any problem becomes ``error`` naming ``label``, the file and the fix.

    A missing file raises ``error`` too (callers add context such as which setting points at it).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise error(f"{label} {path} does not exist.") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(
            f"{label} {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} cannot be "
            "decoded. Save the file as UTF-8 (most editors offer it under 'Save with encoding')."
        ) from exc
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except DuplicateKeyError as exc:
        raise error(
            f"{label} {path}: key {exc.key!r} appears twice in the same mapping (lines {exc.first_line} and "
            f"{exc.second_line}). YAML would keep only the second one and drop the first silently; remove "
            "or rename one of them."
        ) from exc
    except yaml.YAMLError as exc:
        raise error(f"{label} {path} is not valid YAML: {exc}") from exc
