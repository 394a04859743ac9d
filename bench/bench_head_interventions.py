"""Head-patching generations batched across conditions against one generation per condition (SmolLM2-135M).

Workload (defaults = one fold of one emotion in ``head_patching`` on the ``smoke`` profile): ``--pairs``
gratitude / neutral eval prompt pairs tokenized together (smoke: 2 per fold; baseline: 12), the asset's own
condition list (``build_generation_conditions``: 2 baselines, single and joint zero / mean ablations of
``--top-n`` heads, joint z / v_only / pattern_v patches in both directions, 2 random-head controls of each
kind), greedy, ``--max-new`` tokens. Top heads: the ``--top-n`` largest by a seeded draw (only cost is
measured); mean ablation uses the mean head output over 16 train neutral prompts.

- ``per-condition``: ``generate_per_condition``, one ``greedy_generate_with_prefill`` per condition on its
  prompt set under ``ablate_heads`` / ``patch_heads`` (what ``head_patching`` did before);
- ``batched``: ``generate_conditions``, every condition's rows in batches of ``--batch-size`` rows, each row
  with its own intervention.

Both run in this process, interleaved, ``--repeats`` times (medians). The script prints the speed-up and
exits 1 when any continuation differs between the two.

Run: ``python bench/bench_head_interventions.py`` (smoke) or ``--pairs 12 --top-n 6 --max-new 20
--batch-size 64`` (baseline workload per fold).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import add_model_options, load_model  # noqa: E402
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
    parser.add_argument("--pairs", type=int, default=2, help="prompt pairs (smoke fold: 2, baseline: 12)")
    parser.add_argument("--top-n", type=int, default=3, help="top heads (smoke: 3, baseline: 6)")
    parser.add_argument("--max-new", type=int, default=8, help="new tokens (smoke: 8, baseline: 20)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (smoke: 32, baseline: 64)")
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
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, list[list[str]]] = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            results[name] = fn()
            if handle.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in median.items():
        print(f"{name:>13}: {seconds:7.2f} s  ({rows / seconds:6.1f} generations/s)")
    print(
        f"speed-up batched vs per-condition: ×{median['per-condition'] / median['batched']:.1f} (target ≥ 5)"
    )
    differing = [
        c.name
        for c, a, b in zip(conditions, results["per-condition"], results["batched"], strict=True)
        if a != b
    ]
    if differing:
        print(f"FAIL: continuations differ between the two paths for {differing}")
        return 1
    print("continuations identical in both paths")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
