"""The unsteered log-likelihood pass: the platform's prompt-cache scoring against one plain joint forward.

Workload, shaped like a steering sweep (many continuations of each prompt): ``--prompts`` fitting prompts
of ``data/prompts/emotion_prompts.jsonl`` as prompts, each with ``--continuations`` continuations cut to
``--tokens`` tokens from other prompts of the file (the pass's cost depends on token counts only).

- ``platform``: ``continuation_logprob`` (what ``residual_patching`` and ``head_patching`` run): in each
  batch every distinct prompt runs once and its continuations are scored on its KV cache.
- ``plain joint``: prompt + continuation concatenated, sorted by length, left-padded with mask-derived
  position ids, one forward per batch keeping the logits of the continuation positions only.

- ``platform, N workers`` (with ``--workers N``, CPU): the same batches over N processes, each with its own
  copy of the model on one torch thread (``ModelWorkers``, what ``cpu_workers`` does in
  ``residual_patching``); the workers start and load the model before the timing.

The same ``--batch-size`` for all, interleaved, ``--repeats`` times; medians. Every row's mean
log-probability must agree within 1e-4 (exit status 1 otherwise).

Run: ``python bench/bench_loglik.py`` (``--device cuda`` on an accelerator).
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
from emotion_assets.science.fluency import continuation_logprob  # noqa: E402
from emotion_assets.science.residual import position_ids_from_mask  # noqa: E402


@torch.inference_mode()
def plain_joint(model, tokenizer, prompts, continuations, batch_size: int, device) -> np.ndarray:
    """Mean log-probability of each continuation from one forward over prompt + continuation per batch."""
    p_ids = tokenizer(prompts)["input_ids"]
    c_ids = tokenizer(continuations, add_special_tokens=False)["input_ids"]
    rows = [p + c for p, c in zip(p_ids, c_ids, strict=True)]
    order = np.argsort([len(r) for r in rows], kind="stable")
    means = np.zeros(len(rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, width - len(rows[i]) :] = torch.tensor(rows[i])
            mask[b, width - len(rows[i]) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        keep = max(len(c_ids[i]) for i in idx)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
            logits_to_keep=keep + 1,
        ).logits[:, :-1].float()  # fmt: skip
        logprobs = logits.log_softmax(-1).gather(-1, ids[:, -keep:, None])[..., 0]  # [batch, keep]
        for b, i in enumerate(idx):
            n = len(c_ids[i])
            means[i] = float(logprobs[b, keep - n :].sum()) / n
    return means


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, repeats=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--continuations", type=int, default=48, help="continuations per prompt")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per continuation (baseline: 20)")
    parser.add_argument("--batch-size", type=int, default=128, help="rows per forward (baseline: 128)")
    parser.add_argument(
        "--workers", type=int, default=0, help="also time the platform over this many processes"
    )
    args = parser.parse_args()
    handle = load_model(args)
    model, tokenizer, device = handle.model, handle.tokenizer, handle.device
    lines = [json.loads(line) for line in (ROOT / "data/prompts/emotion_prompts.jsonl").open()]
    texts = [r["text"] for r in lines if r.get("role", "fit") == "fit"]
    heads = texts[: args.prompts]
    tails = [
        tokenizer.decode(tokenizer(" " + t, add_special_tokens=False)["input_ids"][: args.tokens])
        for t in texts[args.prompts : args.prompts + args.continuations]
    ]
    prompts = [p for p in heads for _ in tails]
    continuations = [c for _ in heads for c in tails]
    print(
        f"{args.model} on {device}: {len(heads)} prompts × {len(tails)} continuations = {len(prompts)} rows "
        f"(≤ {args.tokens} tokens each), batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
        f"{args.repeats} repeats (median, interleaved)"
    )
    methods = {
        "platform (prompt cache)": lambda: continuation_logprob(
            model, tokenizer, prompts, continuations, batch_size=args.batch_size, device=device
        )["mean_logprob"].to_numpy(),
        "plain joint forward": lambda: plain_joint(
            model, tokenizer, prompts, continuations, args.batch_size, device
        ),
    }
    workers = started_model_workers(handle, args.workers)
    if workers is not None:
        methods[f"platform, {workers.count} workers"] = lambda: continuation_logprob(
            model,
            tokenizer,
            prompts,
            continuations,
            batch_size=args.batch_size,
            device=device,
            workers=workers,
        )["mean_logprob"].to_numpy()
    medians, results = time_interleaved(methods, args.repeats, device)
    if workers is not None:
        workers.__exit__(None, None, None)
    for name, seconds in medians.items():
        print(f"  {name:<26} {seconds:8.2f} s   {len(prompts) / seconds:8.1f} rows/s")
    platform = results["platform (prompt cache)"]
    gap = max(float(np.max(np.abs(platform - other))) for other in results.values())
    ratio = medians["plain joint forward"] / medians["platform (prompt cache)"]
    print(f"platform / plain joint throughput: {ratio:.2f}×; largest |Δ mean log-probability| {gap:.2e}")
    for name in medians:
        if name.endswith("workers"):
            print(f"{name} / plain joint: {medians['plain joint forward'] / medians[name]:.2f}×; "
                  f"/ platform in one process: {medians['platform (prompt cache)'] / medians[name]:.2f}×")  # fmt: skip
    if gap > 1e-4:
        print("error: the two passes disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
