"""Results-tree comparison: tolerance, missing files, corrupt files, root normalisation, ignores, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from jobs.compare import compare_trees, main

ROOT = Path(__file__).resolve().parents[2]
VECTORS = "dev/emotion_vectors/tiny/vectors.safetensors"
SCORES = "dev/probe_scores/tiny/scores.parquet"
SCORES_CSV = "dev/probe_scores/tiny/scores.csv"
CARD = "dev/model_card/tiny/model_card.json"
REPORT = "dev/model_card/tiny/report.md"
TIMINGS = "dev/run_timings.parquet"


def _build(root: Path, *, delta: float = 0.0, seconds: float = 1.0) -> Path:
    """A small results tree; ``delta`` is added to one tensor value, ``seconds`` goes into timing fields."""
    vectors = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10
    vectors[1, 2] += delta
    for relative in (VECTORS, SCORES, CARD, TIMINGS):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"vectors": vectors, "counts": torch.tensor([1, 2, 3]), "nan": torch.tensor([float("nan"), 1.0])},
        str(root / VECTORS),
        metadata={"source": str(root / "dev" / "activations"), "started_at": str(seconds)},
    )
    frame = pd.DataFrame(
        {
            "emotion": ["joy", "anger", "fear"],
            "score": [0.5, 0.25, np.nan],
            "n": [10, 20, 30],
            "elapsed_s": [seconds] * 3,
        }
    )
    frame.to_parquet(root / SCORES, index=False)
    frame.to_csv(root / SCORES_CSV, index=False)
    card = {
        "model": "tiny",
        "path": str(root / "dev" / "model_card" / "tiny"),
        "n_parameters": 1234,
        "metrics": {"accuracy": 0.9, "layers": [1, 2, 3]},
        "load_seconds": seconds,
        "run_id": f"run-{seconds}",
        "timing_peak_memory_mb": seconds * 100,
    }
    (root / CARD).write_text(json.dumps(card, indent=2), encoding="utf-8")
    (root / REPORT).write_text(f"# Report\n\nArtifacts under {root}/dev\n", encoding="utf-8")
    pd.DataFrame({"elapsed_s": [seconds], "started_at": [str(seconds)]}).to_parquet(root / TIMINGS)
    return root


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    return _build(tmp_path / "a"), _build(tmp_path / "b", seconds=2.0)


def _run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobs.compare", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_identical_trees_exit_zero_via_subprocess(trees: tuple[Path, Path]) -> None:
    a, b = trees
    result = _run_cli(a, b, "--atol", "1e-3", "--rtol", "1e-4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 different" in result.stdout
    assert "compared 5 files: 5 identical, 0 different, 0 missing, 0 unreadable" in result.stdout


def test_perturbed_tensor_reported_with_path_key_and_size(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a, b = _build(tmp_path / "a"), _build(tmp_path / "b", delta=1e-2)
    report = compare_trees(a, b, atol=1e-3, rtol=1e-4)
    assert report.different == [VECTORS]
    (diff,) = report.differences
    assert (diff.path, diff.key) == (VECTORS, "vectors")
    assert diff.max_abs == pytest.approx(1e-2, rel=1e-3)
    assert "first=[1, 2]" in diff.detail and "mismatched=1/12" in diff.detail

    assert main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert f"DIFF {VECTORS} :: vectors :: max_abs=0.01" in out
    assert "1 different" in out


def test_perturbation_below_tolerance_is_equal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = _build(tmp_path / "a"), _build(tmp_path / "b", delta=1e-5)
    assert main([str(a), str(b), "--atol", "1e-3", "--rtol", "1e-4"]) == 0
    assert "0 different" in capsys.readouterr().out
    assert main([str(a), str(b), "--atol", "0", "--rtol", "0"]) == 1


def test_table_and_json_differences(trees: tuple[Path, Path]) -> None:
    a, b = trees
    frame = pd.read_parquet(b / SCORES)
    frame.loc[1, "score"] = 0.75
    frame.loc[2, "emotion"] = "sadness"
    frame = frame.drop(columns=["n"]).assign(extra=1)
    frame.to_parquet(b / SCORES, index=False)
    card = json.loads((b / CARD).read_text())
    card["metrics"]["accuracy"] = 0.8
    card["metrics"]["layers"].append(4)
    del card["model"]
    card["new"] = True
    (b / CARD).write_text(json.dumps(card))

    report = compare_trees(a, b)
    lines = report.lines()
    assert sorted(report.different) == sorted([SCORES, CARD])
    assert f"DIFF {SCORES} :: n :: column missing in B" in lines
    assert f"DIFF {SCORES} :: extra :: column missing in A" in lines
    assert any(
        line.startswith(f"DIFF {SCORES} :: score :: max_abs=0.5") and "first_row=1" in line for line in lines
    )
    assert any(line.startswith(f"DIFF {SCORES} :: emotion ::") and "first_row=2" in line for line in lines)
    assert f"DIFF {CARD} :: $.model :: missing in B" in lines
    assert f"DIFF {CARD} :: $.new :: missing in A" in lines
    assert f"DIFF {CARD} :: $.metrics.layers :: list length 3 vs 4" in lines
    assert any(line.startswith(f"DIFF {CARD} :: $.metrics.accuracy :: max_abs=0.1") for line in lines)


def test_missing_files_on_either_side(trees: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    a, b = trees
    (a / SCORES_CSV).unlink()
    (b / REPORT).unlink()
    report = compare_trees(a, b)
    assert report.missing_in_a == [SCORES_CSV]
    assert report.missing_in_b == [REPORT]
    assert main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert f"MISSING in A: {SCORES_CSV}" in out
    assert f"MISSING in B: {REPORT}" in out
    assert "2 missing" in out


def test_corrupt_files_reported_not_crashed(trees: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    a, b = trees
    data = (b / SCORES).read_bytes()
    (b / SCORES).write_bytes(data[: len(data) // 2])
    (b / CARD).write_text('{"model": "tiny", ', encoding="utf-8")
    (b / VECTORS).write_bytes(b"\xff" * 8 + b"not a header")

    report = compare_trees(a, b)
    assert sorted(e.path for e in report.errors) == sorted([SCORES, CARD, VECTORS])
    assert all(e.message.startswith("B: ") for e in report.errors)
    assert main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert f"ERROR {CARD}: B: JSONDecodeError" in out
    assert f"ERROR {SCORES}: B:" in out
    assert "3 unreadable" in out


def test_bad_input_exit_two(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _build(tmp_path / "a")
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit) as exc:
        main([str(a), str(missing)])
    assert exc.value.code == 2
    assert f"results tree B does not exist: {missing}" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        main([str(a / CARD), str(a)])
    assert exc.value.code == 2
    assert "is not a directory" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        main([str(a), str(a), "--atol", "-1"])
    assert exc.value.code == 2
    assert "atol must be" in capsys.readouterr().err

    result = _run_cli(missing, a)
    assert result.returncode == 2
    assert "results tree A does not exist" in result.stderr


def test_root_paths_normalised_and_default_ignores(trees: tuple[Path, Path]) -> None:
    a, b = trees
    # Root paths in JSON, tensor metadata and markdown differ, as do timings and timing keys: all ignored.
    assert str(a) in (a / CARD).read_text() and str(b) in (b / CARD).read_text()
    assert not pd.read_parquet(a / TIMINGS).equals(pd.read_parquet(b / TIMINGS))
    report = compare_trees(a, b)
    assert report.same, report.lines()
    assert TIMINGS in report.ignored

    strict = compare_trees(a, b, ignore=(), ignore_keys=())
    assert TIMINGS in strict.different
    keys = {d.key for d in strict.differences if d.path == CARD}
    assert keys == {"$.load_seconds", "$.run_id", "$.timing_peak_memory_mb"}


def test_include_timings_flag_and_json_report(trees: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trees
    out = tmp_path / "report.json"
    assert main([str(a), str(b), "--json", str(out)]) == 0
    assert main([str(a), str(b), "--include-timings", "--json", str(out)]) == 1
    payload = json.loads(out.read_text())
    assert TIMINGS in payload["different"] and payload["summary"]["same"] is False
    assert {"path": CARD, "key": "$.load_seconds"}.items() <= next(
        d for d in payload["differences"] if d["path"] == CARD and d["key"] == "$.load_seconds"
    ).items()
    assert main([str(a), str(b), "--ignore", "*.parquet", "--ignore-key", "score"]) == 0


def test_max_report_truncates(trees: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    a, b = trees
    for relative in (SCORES, SCORES_CSV, REPORT):
        (b / relative).unlink()
    assert main([str(a), str(b), "--max-report", "1"]) == 1
    out = capsys.readouterr().out
    assert out.count("MISSING in B") == 1
    assert "2 more lines not shown" in out


def test_numpy_and_other_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root, value in ((a, 1.0), (b, 1.5)):
        root.mkdir()
        np.save(root / "x.npy", np.array([0.0, value, np.nan]))
        (root / "blob.bin").write_bytes(bytes([1, 2, int(value * 2)]))
    shutil.copy(a / "x.npy", a / "same.npy")
    shutil.copy(a / "x.npy", b / "same.npy")
    report = compare_trees(a, b)
    lines = report.lines()
    assert any(line.startswith("DIFF x.npy :: <array> :: max_abs=0.5") for line in lines)
    assert "DIFF blob.bin :: <bytes> :: sizes 3 vs 3 bytes, first difference at byte 2" in lines
    assert report.identical == ["same.npy"]


def test_batches_left_for_resuming_are_not_results(trees: tuple[Path, Path]) -> None:
    a, b = trees
    leftover = a / ".resume" / "smoke" / "residual_patching" / "smollm2-135m" / "ab12.json"
    leftover.parent.mkdir(parents=True)
    leftover.write_text('{"key": "ab12", "value": []}', encoding="utf-8")
    report = compare_trees(a, b)
    assert report.missing_in_b == [] and main([str(a), str(b)]) == 0
