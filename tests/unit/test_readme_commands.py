"""Every command the README shows either runs here (short ones, or their option parsing via --help) or is
listed as a long run; a README command that no longer parses fails this test."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from emotion_assets.registry import PROJECT_ROOT
from resources.storage import ArtifactStore, write_json, write_table

README = PROJECT_ROOT / "README.md"
BIN = Path(sys.executable).parent
COMMAND_START = re.compile(r"^(\w+=\S+\s+)*(\.venv/bin/|bash |scripts/|python -m )")
# Whole-study commands: minutes to hours, run by scripts/test.sh and CI, not here.
LONG_RUNS = {
    "bash scripts/study.sh",
    "bash scripts/test.sh",
    "scripts/study.sh --model minilm-l6 --profile baseline",
    "python -m jobs.study",
}
# Commands that start a server or a run: only their option parsing is checked (click parses every option
# before it acts on --help, so an unknown option still fails).
PARSE_ONLY = ("dagster dev", "dagster asset materialize", "mlflow ui")


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return [" ".join(c.split()) for c in commands if COMMAND_START.match(" ".join(c.split()))]


def _argv(command: str) -> list[str]:
    words = [w for w in shlex.split(command) if not re.match(r"^\w+=", w)]  # env assignments
    if words[0].startswith(".venv/bin/"):
        words[0] = str(BIN / words[0].removeprefix(".venv/bin/"))
    elif words[:2] == ["python", "-m"]:
        words[0] = sys.executable
    if any(kind in command for kind in PARSE_ONLY):
        words.append("--help")
    return words


def _compare_trees(cwd: Path) -> None:
    """results_a/ and results_b/: the same content, written as separate versions (other version ids)."""
    for name in ("results_a", "results_b"):
        store = ArtifactStore(root_dir=str(cwd / name))
        with store.publishing(partition_key="m|smoke"):
            out = store.directory("smoke", "activations", "m")
            write_table(out / "index.parquet", pd.DataFrame({"id": ["a", "b"], "n_tokens": [3, 4]}))
            write_json(out / "summary.json", {"n": 2})


def test_readme_lists_the_commands_this_test_knows():
    commands = readme_commands()
    assert set(commands) >= LONG_RUNS
    assert any("dagster asset materialize" in c for c in commands)
    assert any("jobs.compare" in c for c in commands)
    assert any("jobs.study --help" in c for c in commands)


@pytest.mark.parametrize("command", [c for c in readme_commands() if c not in LONG_RUNS])
def test_readme_command_runs(command, tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "PYTHONPATH": str(PROJECT_ROOT)}
    (tmp_path / "dagster_home").mkdir()
    cwd = PROJECT_ROOT
    if "jobs.compare" in command:
        cwd = tmp_path
        _compare_trees(tmp_path)
    done = subprocess.run(_argv(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    if "jobs.compare" in command:
        assert "identical" in done.stdout.lower() or "same" in done.stdout.lower(), done.stdout
