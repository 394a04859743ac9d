"""Batched head screening by ablation against the plain one-forward-per-head loop on SmolLM2-135M.

Prompts: the first ``--prompts`` gratitude eval prompts of ``data/prompts/emotion_prompts.jsonl``, left
padded into one batch. Direction: mean last-token residual of gratitude minus neutral train prompts at
``--readout`` (the same boundary the screen reads). Every head of the model is screened; heads at layers
``>= --readout`` cannot reach the readout and score 0 in both methods without a forward pass.

The batched screen runs the prompts once up to the first layer of each group of ``heads_per_pass`` heads,
then repeats the batch once per head inside the forward and ablates head ``j`` in copy ``j``; both
methods stop the forward at the readout boundary. The loop is timed on ``--loop-heads`` heads spread
evenly over the reachable layers and scaled linearly to all reachable heads (its cost per head does not
depend on the head's layer); the output says so. Scores of both methods are compared on those heads.
Timings are medians of ``--repeats`` runs (the machine may be shared).

Run: ``python bench/bench_heads.py`` (``--loop-heads 0`` times the loop on every reachable head).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emotion_assets.science.heads import (  # noqa: E402
    ablate_heads,
    head_layout,
    screen_heads_by_ablation,
    screen_heads_loop,
)
from emotion_assets.science.residual import capture_residuals, position_ids_from_mask  # noqa: E402
from resources.models import ModelResource  # noqa: E402


def load_texts(emotion: str, split: str, limit: int) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data/prompts/emotion_prompts.jsonl").open()]
    return [r["text"] for r in rows if r["emotion"] == emotion and r["split"] == split][:limit]


def last_token_mean(model, tokenizer, texts: list[str], boundary: int) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    hidden = capture_residuals(model, enc["input_ids"], enc["attention_mask"], [boundary])  # [b, 1, pos, d]
    return hidden[:, 0, -1].float().mean(dim=0)  # [d_model]


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--readout", type=int, default=20, help="readout boundary (block input index)")
    parser.add_argument("--per-pass", type=int, nargs="+", default=[9, 27], help="heads_per_pass values")
    parser.add_argument("--loop-heads", type=int, default=30, help="heads the loop is timed on (0 = all)")
    parser.add_argument("--hf-heads", type=int, default=4, help="heads the full-forward HF loop is timed on")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    handle = ModelResource(device="cpu").get(args.model)
    model, tokenizer = handle.model, handle.tokenizer
    layout = head_layout(model)
    texts = load_texts("gratitude", "eval", args.prompts)
    enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    direction = last_token_mean(model, tokenizer, load_texts("gratitude", "train", 16), args.readout)
    direction -= last_token_mean(model, tokenizer, load_texts("neutral", "train", 16), args.readout)

    heads = [(layer, head) for layer in range(layout.n_layers) for head in range(layout.n_heads)]
    reachable = [h for h in heads if h[0] < args.readout]
    step = max(1, len(reachable) // args.loop_heads) if args.loop_heads else 1
    loop_heads = reachable[::step][: args.loop_heads or None]
    print(
        f"{args.model}: {layout.n_layers} layers × {layout.n_heads} heads ({layout.n_kv_heads} KV heads), "
        f"{len(texts)} prompts × {ids.shape[1]} positions, readout boundary {args.readout}, "
        f"torch threads {torch.get_num_threads()}, {args.repeats} repeats (median)"
    )
    print(f"heads screened: {len(heads)} ({len(reachable)} reachable, {len(heads) - len(reachable)} score 0)")

    loop_s, loop_scores = timed(
        lambda: screen_heads_loop(model, ids, mask, direction, args.readout, loop_heads), args.repeats
    )
    per_head = loop_s / len(loop_heads)
    loop_all = per_head * len(reachable)
    scaled = "" if len(loop_heads) == len(reachable) else f" (timed on {len(loop_heads)} heads, scaled)"
    print(f"loop   : {per_head:.3f} s/head -> {loop_all:.1f} s for all heads{scaled}")

    hf_all = None
    if args.hf_heads:
        unit = direction / direction.norm()
        hf_heads = loop_heads[: args.hf_heads]

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
                    (out.hidden_states[args.readout][:, -1].float() @ unit).mean()

        hf_s, _ = timed(hf_loop, args.repeats)
        hf_all = hf_s / len(hf_heads) * len(reachable)
        print(
            f"HF loop: {hf_s / len(hf_heads):.3f} s/head -> {hf_all:.1f} s for all heads (full forward with "
            f"output_hidden_states, no early stop; timed on {len(hf_heads)} heads, scaled)"
        )
    index = {h: i for i, h in enumerate(heads)}
    for per_pass in args.per_pass:
        batched_s, scores = timed(
            lambda per_pass=per_pass: screen_heads_by_ablation(
                model, ids, mask, direction, args.readout, heads, per_pass
            ),
            args.repeats,
        )
        diff = (scores[[index[h] for h in loop_heads]] - loop_scores).abs().max().item()
        versus_hf = f", ×{hf_all / batched_s:.1f} vs HF loop" if hf_all else ""
        print(
            f"batched: heads_per_pass={per_pass:>3}: {batched_s:.1f} s for all heads, "
            f"speed-up ×{loop_all / batched_s:.1f} vs loop{versus_hf}, max |Δscore| vs loop {diff:.1e}"
        )
    top = scores.abs().topk(5).indices.tolist()
    print("largest effects:", ", ".join(f"L{heads[i][0]}H{heads[i][1]} {scores[i]:+.3f}" for i in top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
