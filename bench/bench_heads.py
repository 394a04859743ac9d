"""Batched head screening by ablation against the plain one-forward-per-head loop on SmolLM2-135M.

Workload (defaults = what ``head_screening`` does per emotion on the ``smoke`` profile): the first
``--prompts`` gratitude eval prompts of ``data/prompts/emotion_prompts.jsonl`` (``smoke``: 4), left padded
into one batch; readout after the last block (``--readout``, default ``n_layers``); direction: mean
last-token residual of gratitude minus neutral train prompts at the readout. Every head is screened;
heads at layers ``>= --readout`` cannot reach the readout and score 0 in both methods without a pass.

Batched (``screen_heads_by_ablation``): prompts regrouped by real length without padding; per pass the
clean rows run up to the first screened layer, then each head's copy joins the batch at its own layer
(zero-ablated there) and all copies run together to the readout. Loop (``screen_heads_loop``): one
forward per head with that head ablated, stopped at the readout. HF loop: one plain full forward per head
(``output_hidden_states=True``, LM head included). The loops are timed on evenly spread heads and scaled
linearly to all reachable heads (a head's forward costs the same whatever its layer); the output says so.
Each repeat runs every method once, in turn; timings are medians over ``--repeats``.

Run: ``python bench/bench_heads.py`` (``--loop-heads 0`` times the loop on every reachable head).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import add_model_options, load_model  # noqa: E402
from emotion_assets.science.heads import (  # noqa: E402
    ablate_heads,
    head_layout,
    screen_heads_by_ablation,
    screen_heads_loop,
)
from emotion_assets.science.residual import capture_residuals, position_ids_from_mask  # noqa: E402

T = TypeVar("T")


def load_texts(emotion: str, split: str, limit: int) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data/prompts/emotion_prompts.jsonl").open()]
    return [r["text"] for r in rows if r["emotion"] == emotion and r["split"] == split][:limit]


def last_token_mean(model, tokenizer, texts: list[str], boundary: int) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    hidden = capture_residuals(model, enc["input_ids"], enc["attention_mask"], [boundary])  # [b, 1, pos, d]
    return hidden[:, 0, -1].float().mean(dim=0)  # [d_model]


def time_once(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, repeats=3, device=False)
    parser.add_argument("--prompts", type=int, default=4, help="eval prompts (smoke profile: 4)")
    parser.add_argument("--readout", type=int, default=None, help="readout boundary (default: n_layers)")
    parser.add_argument(
        "--per-pass", type=int, nargs="+", default=[27, 90, 270], help="heads_per_pass values"
    )
    parser.add_argument("--loop-heads", type=int, default=30, help="heads the loop is timed on (0 = all)")
    parser.add_argument("--hf-heads", type=int, default=6, help="heads the full-forward HF loop is timed on")
    args = parser.parse_args()
    handle = load_model(args)
    model, tokenizer = handle.model, handle.tokenizer
    layout = head_layout(model)
    readout = layout.n_layers if args.readout is None else args.readout
    texts = load_texts("gratitude", "eval", args.prompts)
    enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    direction = last_token_mean(model, tokenizer, load_texts("gratitude", "train", 16), readout)
    direction -= last_token_mean(model, tokenizer, load_texts("neutral", "train", 16), readout)
    unit = direction / direction.norm()

    heads = [(layer, head) for layer in range(layout.n_layers) for head in range(layout.n_heads)]
    reachable = [h for h in heads if h[0] < readout]
    step = max(1, len(reachable) // args.loop_heads) if args.loop_heads else 1
    loop_heads = reachable[::step][: args.loop_heads or None]
    hf_heads = (
        loop_heads[:: max(1, len(loop_heads) // args.hf_heads)][: args.hf_heads] if args.hf_heads else []
    )
    print(
        f"{args.model}: {layout.n_layers} layers × {layout.n_heads} heads ({layout.n_kv_heads} KV heads), "
        f"{len(texts)} prompts × {ids.shape[1]} positions ({int(mask.sum())} real tokens), readout boundary "
        f"{readout}, torch threads {torch.get_num_threads()}, {args.repeats} repeats (median, interleaved)"
    )
    print(f"heads screened: {len(heads)} ({len(reachable)} reachable, {len(heads) - len(reachable)} score 0)")

    def hf_loop() -> None:
        for head in hf_heads:
            with ablate_heads(model, [head]), torch.inference_mode():
                out = model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=position_ids_from_mask(mask),
                    output_hidden_states=True,
                    use_cache=False,
                )
                # timing only: at boundary n_layers HF's last entry is after the final norm
                (out.hidden_states[readout][:, -1].float() @ unit).mean()

    methods: dict[str, Callable[[], torch.Tensor | None]] = {
        "loop": lambda: screen_heads_loop(model, ids, mask, direction, readout, loop_heads),
    }
    if hf_heads:
        methods["hf"] = hf_loop
    for per_pass in args.per_pass:
        methods[f"batched/{per_pass}"] = lambda per_pass=per_pass: screen_heads_by_ablation(
            model, ids, mask, direction, readout, heads, per_pass
        )
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, torch.Tensor | None] = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            seconds, results[name] = time_once(fn)
            times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}

    loop_all = median["loop"] / len(loop_heads) * len(reachable)
    scaled = "" if len(loop_heads) == len(reachable) else f" (timed on {len(loop_heads)} heads, scaled)"
    print(f"loop   : {median['loop'] / len(loop_heads):.3f} s/head -> {loop_all:.1f} s for all heads{scaled}")
    hf_all = median["hf"] / len(hf_heads) * len(reachable) if hf_heads else None
    if hf_all:
        print(
            f"HF loop: {median['hf'] / len(hf_heads):.3f} s/head -> {hf_all:.1f} s for all heads (full forward "
            f"with output_hidden_states, no early stop; timed on {len(hf_heads)} heads, scaled)"
        )
    index = {h: i for i, h in enumerate(heads)}
    loop_scores = results["loop"]
    assert loop_scores is not None
    worst = 0.0
    for per_pass in args.per_pass:
        name = f"batched/{per_pass}"
        scores = results[name]
        assert scores is not None
        diff = (scores[[index[h] for h in loop_heads]] - loop_scores).abs().max().item()
        worst = max(worst, diff / max(1.0, loop_scores.abs().max().item()))
        versus_hf = f", ×{hf_all / median[name]:.1f} vs HF loop" if hf_all else ""
        print(
            f"batched: heads_per_pass={per_pass:>3}: {median[name]:.1f} s for all heads, "
            f"speed-up ×{loop_all / median[name]:.1f} vs loop{versus_hf}, max |Δscore| vs loop {diff:.1e}"
        )
    top = scores.abs().topk(5).indices.tolist()
    print("largest effects:", ", ".join(f"L{heads[i][0]}H{heads[i][1]} {scores[i]:+.3f}" for i in top))
    if worst > 1e-4:
        print(f"FAIL: batched scores differ from the loop by {worst:.1e} (relative to the largest score)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
