"""Head-patching generations batched across conditions against one generation per condition (SmolLM2-135M).

Workload (defaults = one fold of one emotion in ``head_patching`` on the ``smoke`` profile): ``--pairs``
gratitude / neutral eval prompt pairs tokenized together (smoke: 2 per fold; baseline: 34), the asset's own
condition list (``build_generation_conditions``: 2 baselines, single and joint zero / mean ablations of
``--top-n`` heads, joint z / v_only / pattern_v patches in both directions, 2 random-head controls of each
kind), greedy, ``--max-new`` tokens. Top heads: the ``--top-n`` largest by a seeded draw (only cost is
measured); mean ablation uses the mean head output over 16 train neutral prompts.

- ``per-condition``: ``generate_per_condition``, one ``greedy_generate_with_prefill`` per condition on its
  prompt set under ``ablate_heads`` / ``patch_heads`` (what ``head_patching`` did before);
- ``batched``: ``generate_conditions``, every condition's rows in batches of ``--batch-size`` rows, each row
  with its own intervention;
- ``batched-workers`` (with ``--workers N``, CPU): the same batches spread over N processes, each with its
  own copy of the model on one torch thread (``ModelWorkers``, what ``cpu_workers`` does in
  ``head_patching``); the workers start and load the model before the timing, printed apart.

All run in this process (the workers' batches in theirs), interleaved, ``--repeats`` times (medians). The
script prints the speed-ups and exits 1 when any continuation differs from the per-condition path.

Run: ``python bench/bench_head_interventions.py`` (smoke) or ``--pairs 34 --top-n 6 --max-new 20
--batch-size 128 --workers 2`` (baseline workload per fold: every eval pair of half the prompts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import add_model_options, load_model, started_model_workers, time_interleaved  # noqa: E402
from emotion_assets.science.batched_heads import generate_conditions, generate_per_condition  # noqa: E402
from emotion_assets.science.head_conditions import build_generation_conditions, random_heads  # noqa: E402
from emotion_assets.science.heads import (  # noqa: E402
    capture_head_outputs,
    head_layout,
    mean_head_outputs,
    shared_positions,
)


def load_texts(emotion: str, split: str, limit: int) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data/prompts/emotion_prompts.jsonl").open()]
    keep = [
        r for r in rows if r["emotion"] == emotion and r["split"] == split and r.get("role", "fit") == "fit"
    ]
    return [r["text"] for r in sorted(keep, key=lambda r: r["id"])][:limit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, repeats=3)
    parser.add_argument("--pairs", type=int, default=2, help="prompt pairs (smoke fold: 2, baseline: 34)")
    parser.add_argument("--top-n", type=int, default=3, help="top heads (smoke: 3, baseline: 6)")
    parser.add_argument("--max-new", type=int, default=8, help="new tokens (smoke: 8, baseline: 20)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="rows per batch (smoke: 32, baseline: 128)"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="also time the batches over this many processes"
    )
    args = parser.parse_args()
    handle = load_model(args)
    model, tokenizer = handle.model, handle.tokenizer
    layout = head_layout(model)
    emotion, neutral = load_texts("gratitude", "eval", args.pairs), load_texts("neutral", "eval", args.pairs)
    enc = tokenizer(emotion + neutral, padding=True, padding_side="left", return_tensors="pt")
    n = len(emotion)
    sets = {
        "emotion": {k: enc[k][:n].to(handle.device) for k in ("input_ids", "attention_mask")},
        "neutral": {k: enc[k][n:].to(handle.device) for k in ("input_ids", "attention_mask")},
    }
    positions = shared_positions(sets["emotion"]["attention_mask"], sets["neutral"]["attention_mask"])
    train = tokenizer(
        load_texts("neutral", "train", 16), padding=True, padding_side="left", return_tensors="pt"
    )
    ids, mask = train["input_ids"].to(handle.device), train["attention_mask"].to(handle.device)
    mean_z = mean_head_outputs(capture_head_outputs(model, ids, mask, range(layout.n_layers)), mask)
    every = [(ly, h) for ly in range(layout.n_layers) for h in range(layout.n_heads)]
    rng = np.random.default_rng(0)
    top = sorted(every[int(i)] for i in rng.choice(len(every), args.top_n, replace=False))
    randoms = [(s, random_heads(layout.n_layers, layout.n_heads, top, len(top), 100 + s)) for s in range(2)]
    conditions = [c.batched() for c in build_generation_conditions(top, randoms)]
    rows = len(conditions) * n
    print(
        f"{args.model} on {handle.device}: {len(conditions)} conditions × {n} prompts = {rows} rows, "
        f"{enc['input_ids'].shape[1]} positions, {args.max_new} new tokens, top heads {top}, batch "
        f"{args.batch_size} rows, torch threads {torch.get_num_threads()}, {args.repeats} repeats (median)"
    )
    kwargs = {"positions": positions, "max_new_tokens": args.max_new, "mean_z": mean_z}
    methods = {
        "per-condition": lambda: generate_per_condition(model, tokenizer, sets, conditions, **kwargs),
        "batched": lambda: generate_conditions(
            model, tokenizer, sets, conditions, batch_size=args.batch_size, **kwargs
        ),
    }
    workers = started_model_workers(handle, args.workers)
    if workers is not None:
        methods["batched-workers"] = lambda: generate_conditions(
            model, tokenizer, sets, conditions, batch_size=args.batch_size, workers=workers, **kwargs
        )
    median, results = time_interleaved(methods, args.repeats, handle.device)
    if workers is not None:
        workers.__exit__(None, None, None)
    for name, seconds in median.items():
        print(f"{name:>15}: {seconds:7.2f} s  ({rows / seconds:6.1f} generations/s)")
    for name in [m for m in median if m != "per-condition"]:
        print(f"speed-up {name} vs per-condition: ×{median['per-condition'] / median[name]:.1f} (target ≥ 5)")
    differing = [
        f"{name}: {c.name}"
        for name in [m for m in results if m != "per-condition"]
        for c, a, b in zip(conditions, results["per-condition"], results[name], strict=True)
        if a != b
    ]
    if differing:
        print(f"FAIL: continuations differ between the two paths for {differing}")
        return 1
    print("continuations identical in every path")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
