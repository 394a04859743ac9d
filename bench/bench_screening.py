"""Head screening: exhaustive ablation vs AtP / AtP* estimates + exact confirmation of a shortlist (SmolLM2-135M).

Workload: per emotion, the first ``--prompts`` eval prompts of ``data/prompts/emotion_prompts.jsonl`` left
padded into one batch: one cross-fitting half of ``head_screening`` (``smoke``: 4 pairs per emotion, so 2
per half; ``--prompts 34`` is a ``baseline`` half: 67 eval prompts per emotion). Readout: after the last
block, onto the emotion − neutral mean last-token residual of 16 train prompts each. Every head is screened
(zero ablation).

Exhaustive: ``screen_heads_by_ablation`` with the asset's 288 heads per pass. ``heads.screening.method``
``atp`` / ``atp_star`` run ``screen_heads_atp_star`` (``qk_fix`` off / on): the estimate of every head
(``attribution_estimates``, one forward + backward per prompt length; AtP* adds the QK fix), then exact
ablation of the ``shortlist`` largest |estimates|, ranked by their exact effect. The two stages are timed
apart so that each ``--shortlist`` size costs one estimate plus its own confirmation. Recovery: how many of
the exhaustive top ``--top`` heads are in the method's top ``--top`` (= in its shortlist, since confirmed
heads carry their exact effect); the smallest shortlist that would recover ``--top - 1`` of them is read off
the estimates. Times are medians over ``--repeats``.

Run: ``python bench/bench_screening.py`` (smoke half) and ``python bench/bench_screening.py --prompts 34
--shortlist 24 40`` (baseline half).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_heads import last_token_mean, load_texts  # noqa: E402
from bench.common import add_model_options, load_model, time_interleaved  # noqa: E402
from emotion_assets.science.attribution_screening import attribution_estimates, shortlist  # noqa: E402
from emotion_assets.science.heads import head_layout, screen_heads_by_ablation  # noqa: E402

T = TypeVar("T")
Head = tuple[int, int]
ESTIMATES = {"atp": False, "atp_star": True}  # method -> qk_fix


def top(heads: list[Head], scores: dict[Head, float], n: int) -> set[Head]:
    return set(sorted(heads, key=lambda h: -abs(scores[h]))[:n])


def timed(fn: Callable[[], T], repeats: int, device: torch.device) -> tuple[float, T]:
    """Median seconds over ``repeats`` runs of ``fn`` (``bench.common.time_interleaved``) and its last result."""
    medians, results = time_interleaved({"run": fn}, repeats, device)
    return medians["run"], results["run"]


def smallest_shortlist(order: list[Head], reference: set[Head], needed: int) -> int:
    """The shortest prefix of ``order`` (heads by |estimate|) holding ``needed`` heads of ``reference``."""
    found = 0
    for size, head in enumerate(order, start=1):
        found += head in reference
        if found >= needed:
            return size
    return len(order)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, repeats=1)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per emotion (a smoke half: 2)")
    parser.add_argument("--emotions", nargs="+", default=["gratitude", "anger", "apology"])
    parser.add_argument("--shortlist", type=int, nargs="+", default=[24], help="shortlist sizes to time")
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
        f"shortlists {args.shortlist}, top {args.top}, torch threads {torch.get_num_threads()}, "
        f"{args.repeats} repeat(s), median"
    )
    exhaustive_total = 0.0
    totals = {(m, k): 0.0 for m in ESTIMATES for k in args.shortlist}
    worst = {(m, k): args.top for m in ESTIMATES for k in args.shortlist}
    for emotion in args.emotions:
        texts = load_texts(emotion, "eval", args.prompts)
        enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt").to(handle.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        direction = last_token_mean(model, tokenizer, load_texts(emotion, "train", 16), readout) - neutral
        seconds, exact = timed(
            partial(screen_heads_by_ablation, model, ids, mask, direction, readout, heads, 288),
            args.repeats,
            handle.device,
        )
        exhaustive_total += seconds
        exhaustive = dict(zip(heads, exact.tolist(), strict=True))
        reference = top(heads, exhaustive, args.top)
        print(f"{emotion}: exhaustive {seconds:.1f} s")
        for method, qk_fix in ESTIMATES.items():
            estimate_s, estimate = timed(
                partial(attribution_estimates, model, ids, mask, direction, readout, qk_fix=qk_fix),
                args.repeats,
                handle.device,
            )
            scores = estimate.atp_star  # equals .atp without the QK fix
            order = shortlist(scores, heads, len(heads))
            needed = smallest_shortlist(order, reference, args.top - 1)
            for size in args.shortlist:
                chosen = order[:size]
                confirm_s, _ = timed(
                    partial(screen_heads_by_ablation, model, ids, mask, direction, readout, chosen, 288),
                    args.repeats,
                    handle.device,
                )
                recovered = len(reference & set(chosen))
                totals[(method, size)] += estimate_s + confirm_s
                worst[(method, size)] = min(worst[(method, size)], recovered)
                print(
                    f"  {method:>8} shortlist {size:>3}: estimate {estimate_s:.1f} s + confirmation "
                    f"{confirm_s:.1f} s = {estimate_s + confirm_s:.1f} s (×{seconds / (estimate_s + confirm_s):.1f} "
                    f"less time); top {args.top} recovered {recovered}/{args.top}"
                )
            print(
                f"  {method:>8}: the smallest shortlist holding {args.top - 1}/{args.top} is {needed} heads"
            )
    for (method, size), total in totals.items():
        print(
            f"all emotions, {method} shortlist {size}: ×{exhaustive_total / total:.1f} less time, worst recovery "
            f"{worst[(method, size)]}/{args.top} (target: ≥ {args.top - 1}/{args.top} at ≥ ×10)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
