"""Head screening: exhaustive ablation vs AtP* estimates + exact confirmation of a shortlist (SmolLM2-135M).

Workload: per emotion, the first ``--prompts`` eval prompts of ``data/prompts/emotion_prompts.jsonl`` left
padded into one batch: one cross-fitting half of ``head_screening`` (``smoke``: 4 pairs per emotion, so 2
per half; ``--prompts 12`` is a half of 24 pairs). Readout: after the last block, onto the emotion − neutral
mean last-token residual of 16 train prompts each. Every head is screened (zero ablation).

Exhaustive: ``screen_heads_by_ablation`` with the asset's 288 heads per pass. AtP*: ``screen_heads_atp_star``
(one forward + backward for AtP with the QK fix, then exact ablation of the ``--shortlist`` largest
|estimates|); the reported ranking is the exact ranking of the shortlist. Recovery: how many of the
exhaustive top ``--top`` heads are in the AtP* top ``--top`` (and, for comparison, with the shortlist
chosen by plain AtP). Each repeat runs both methods in turn; times are medians over ``--repeats``.

Run: ``python bench/bench_screening.py`` (smoke half) and ``python bench/bench_screening.py --prompts 12``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_heads import last_token_mean, load_texts  # noqa: E402
from bench.common import add_model_options, load_model  # noqa: E402
from emotion_assets.science.attribution_screening import (  # noqa: E402
    attribution_estimates,
    screen_heads_atp_star,
    shortlist,
)
from emotion_assets.science.heads import head_layout, screen_heads_by_ablation  # noqa: E402


def top(heads: list[tuple[int, int]], scores: dict[tuple[int, int], float], n: int) -> set[tuple[int, int]]:
    return set(sorted(heads, key=lambda h: -abs(scores[h]))[:n])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, repeats=1)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per emotion (a smoke half: 2)")
    parser.add_argument("--emotions", nargs="+", default=["gratitude", "anger", "apology"])
    parser.add_argument("--shortlist", type=int, default=24)
    parser.add_argument("--top", type=int, default=6)
    args = parser.parse_args()
    handle = load_model(args)
    model, tokenizer = handle.model, handle.tokenizer
    layout = head_layout(model)
    readout = layout.n_layers
    heads = [(ly, h) for ly in range(layout.n_layers) for h in range(layout.n_heads)]
    neutral = last_token_mean(model, tokenizer, load_texts("neutral", "train", 16), readout)
    print(
        f"{args.model} on {args.device}: {len(heads)} heads, readout {readout}, {args.prompts} prompts per emotion, "
        f"shortlist {args.shortlist}, top {args.top}, torch threads {torch.get_num_threads()}, "
        f"{args.repeats} repeat(s), median"
    )
    total = {"exhaustive": 0.0, "atp_star": 0.0}
    worst = args.top
    for emotion in args.emotions:
        texts = load_texts(emotion, "eval", args.prompts)
        enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt").to(handle.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        direction = last_token_mean(model, tokenizer, load_texts(emotion, "train", 16), readout) - neutral
        times: dict[str, list[float]] = {"exhaustive": [], "atp_star": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            exact = screen_heads_by_ablation(model, ids, mask, direction, readout, heads, 288)
            times["exhaustive"].append(time.perf_counter() - start)
            start = time.perf_counter()
            table = screen_heads_atp_star(model, ids, mask, direction, readout, heads, args.shortlist, 288)
            times["atp_star"].append(time.perf_counter() - start)
        median = {name: statistics.median(values) for name, values in times.items()}
        for name in total:
            total[name] += median[name]
        exhaustive = dict(zip(heads, exact.tolist(), strict=True))
        confirmed = {
            (int(r.layer), int(r.head)): r.ablation_effect for r in table.itertuples() if r.confirmed
        }
        reference = top(heads, exhaustive, args.top)
        recovered = len(reference & top(list(confirmed), confirmed, args.top))
        plain = attribution_estimates(model, ids, mask, direction, readout, qk_fix=False).atp
        plain_list = shortlist(plain, heads, args.shortlist)
        plain_recovered = len(reference & top(plain_list, exhaustive, args.top))
        worst = min(worst, recovered)
        print(
            f"{emotion:>9}: exhaustive {median['exhaustive']:.1f} s, AtP* + shortlist {median['atp_star']:.1f} s "
            f"(×{median['exhaustive'] / median['atp_star']:.1f} less time); exhaustive top {args.top} recovered "
            f"{recovered}/{args.top} (shortlist by plain AtP: {plain_recovered}/{args.top}); "
            f"{len(reference & set(confirmed))}/{args.top} in the shortlist"
        )
    print(
        f"all emotions: ×{total['exhaustive'] / total['atp_star']:.1f} less time, worst recovery "
        f"{worst}/{args.top} (target: ≥ 5/{args.top} at ≥ ×10)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
