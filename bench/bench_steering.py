"""Steering sweep throughput on the embedded model: per-row batched sweep vs two simpler ways to run it.

Workload: ``--n-prompts`` eval neutral prompts (from ``data/prompts/emotion_prompts.jsonl``, or inline
openings when the file is missing) × the conditions of ``build_conditions`` at one layer: the baseline,
3 emotions × the α grid, and one isotropic plus one covariance-matched random control × each α ≠ 0. The
emotion "vectors" are seeded random directions (only the cost is measured here); every added vector is
α · mean ‖resid_pre‖ at that layer · unit direction, as in the study. Greedy decoding, ``--max-new-tokens``.

Configurations, each timed ``--repeats`` times, alternating in a rotating order (median reported):

- ``sweep``: ``generate_sweep`` with ``--batch-size`` rows per ``generate`` call, each row its own vector;
- ``per-condition``: one ``generate_sweep`` per condition with ``--loop-batch-size`` prompts per call,
  timed on ``--loop-conditions`` evenly spaced conditions (its tokens/s is a rate; every condition costs
  the same, so timing all of them only takes longer);
- ``plain-hook``: the same row batches as ``sweep``, but plain ``model.generate`` with a hand-registered
  forward pre-hook adding one constant vector to resid_pre of the block (no per-row machinery);
- ``sweep-workers`` (with ``--workers N``, CPU): the same batches as ``sweep`` spread over N processes, each
  with its own copy of the model on one torch thread (``ModelWorkers``, what ``cpu_workers`` does in the
  study). The workers are started and load the model once before the timing; that start is printed apart.

``plain-hook`` runs every row; ``sweep`` copies the rows of zero-vector conditions (α = 0) from the
baseline instead of generating them, so their wall-time ratio is the cost of the per-row machinery less
that saving. Tokens/s counts generated tokens (up to EOS).

Compute bound: each configuration is run once more under ``torch.utils.flop_counter.FlopCounterMode``
(untimed) to count its arithmetic, and a ``[1024, d_model] @ [d_model, 4 d_model]`` product on the bench's threads
gives the machine's matmul rate. Their quotient is how close each configuration runs to the rate the
hardware allows; the sweep cannot beat the per-condition loop by more than that rate over the loop's
(times the saving from copied conditions), whatever the code.
On CPU the bench uses ``--threads 1``: on a shared machine, torch's default thread count can make small
batches an order of magnitude slower (threads waiting on each other); ``--threads 0`` keeps the default.

Run: ``python bench/bench_steering.py`` (``--quick`` for a tiny smoke run, ``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import started_model_workers
from emotion_assets.science.residual import capture_residuals, decoder_blocks
from emotion_assets.science.steering import (
    SteeringCondition,
    build_conditions,
    distinct_conditions,
    generate_sweep,
)
from resources.models import ModelResource

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_FILE = ROOT / "data" / "prompts" / "emotion_prompts.jsonl"
INLINE_PROMPTS = [
    "The train to the city leaves every morning at",
    "Our office is on the third floor of the",
    "The recipe calls for two cups of flour and",
    "Yesterday I went to the library to return",
    "The meeting has been moved to Thursday because",
    "She opened the window and looked at the",
    "The report describes the results of the survey",
    "He parked the car next to the old",
    "The museum is open from nine until",
    "Please find attached the schedule for next",
    "The river runs through the middle of the",
    "We need to buy milk, bread and",
    "The new software update changes the way",
    "The bus stop is just around the corner from",
    "In the afternoon the weather was cloudy and",
    "The package arrived on Monday with a",
]


def load_prompts(n: int, split: str) -> list[str]:
    """First ``n`` neutral prompts of ``split`` from the prompt file, else the inline openings."""
    if PROMPTS_FILE.exists():
        rows = [json.loads(line) for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
        texts = [r["text"] for r in rows if r.get("emotion") == "neutral" and r.get("split") == split]
        if len(texts) >= n:
            return texts[:n]
    return (INLINE_PROMPTS * (n // len(INLINE_PROMPTS) + 1))[:n]


def residual_stats(handle, texts: list[str], layer: int) -> tuple[float, float, torch.Tensor]:
    """Typical ‖resid_pre‖ at ``layer`` and the centered last-token activations [m, d].

    Returns the mean norm over real tokens after the first one of each prompt, the mean over all real
    tokens (inflated by the first position, which carries a huge norm in this model), and the activations.
    """
    enc = handle.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt").to(handle.device)
    hidden = capture_residuals(handle.model, enc["input_ids"], enc["attention_mask"], [layer])[:, 0].float()
    mask = enc["attention_mask"].bool()  # [m, pos]
    first = mask & (mask.long().cumsum(dim=1) == 1)  # [m, pos] first real token of each prompt
    norms = hidden.norm(dim=-1)  # [m, pos]
    last = hidden[:, -1].cpu()  # [m, d_model] (left padding: the last position is the last token)
    return float(norms[mask & ~first].mean()), float(norms[mask].mean()), last - last.mean(0)


def plain_hook_sweep(
    handle, prompts: list[str], conditions: list[SteeringCondition], layer: int, args
) -> int:
    """The sweep's row batches through plain ``generate`` with one constant vector per batch."""
    tok, model = handle.tokenizer, handle.model
    ids = tok(prompts)["input_ids"]
    rows = sorted(
        ((ci, pi) for ci in range(len(conditions)) for pi in range(len(prompts))),
        key=lambda r: (len(ids[r[1]]), r[1], r[0]),
    )
    block = decoder_blocks(model)[layer]
    eos = tok.eos_token_id
    total = 0
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        vec = conditions[batch[0][0]].vector.to(handle.device, handle.dtype)  # [d_model]

        def hook(_module, hook_args, kwargs, vec=vec):
            return (hook_args[0] + vec, *hook_args[1:]), kwargs

        enc = tok([prompts[pi] for _, pi in batch], padding=True, padding_side="left", return_tensors="pt")
        handle_ = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.inference_mode():
                out = model.generate(
                    **enc.to(handle.device),
                    max_new_tokens=args.max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tok.pad_token_id,
                )
        finally:
            handle_.remove()
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            total += row.index(eos) + 1 if eos in row else len(row)
    return total


def matmul_rate(d_model: int, device: str, repeats: int = 20) -> float:
    """FLOP/s of one ``[1024, d_model] @ [d_model, 4 d_model]`` float32 product on ``device`` (median)."""
    a = torch.randn(1024, d_model, device=device)
    b = torch.randn(d_model, 4 * d_model, device=device)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * 1024 * d_model * 4 * d_model / statistics.median(times)


def counted_flops(fn: Callable[[], int]) -> int:
    """Floating-point operations of one call of ``fn`` (matmuls and attention, as torch counts them)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--alphas", type=float, nargs="+", default=[-0.2, 0.0, 0.1, 0.2])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loop-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--loop-conditions",
        type=int,
        default=3,
        help="conditions the per-condition loop is timed on (0: all)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny run: 4 prompts, 4 tokens, 1 repeat")
    parser.add_argument(
        "--workers", type=int, default=0, help="also time the sweep spread over this many processes (CPU)"
    )
    parser.add_argument(
        "--no-flops", action="store_true", help="skip the untimed FLOP count and the matmul rate"
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n_prompts, args.max_new_tokens, args.repeats, args.alphas = 4, 4, 1, [-0.1, 0.0, 0.1]
        args.loop_conditions = 2

    t0 = time.perf_counter()
    handle = ModelResource(device=args.device).get(args.model)
    print(
        f"model {args.model} on {handle.device} ({handle.dtype}, {torch.get_num_threads()} CPU threads), "
        f"loaded in {time.perf_counter() - t0:.1f} s"
    )
    prompts = load_prompts(args.n_prompts, "eval")
    neutral_train = load_prompts(64 if not args.quick else 16, "train")
    resid_norm, resid_norm_all, centered = residual_stats(handle, neutral_train, args.layer)
    d = handle.geometry.d_model
    gen = torch.Generator().manual_seed(0)
    vectors = {e: {args.layer: torch.randn(d, generator=gen)} for e in ("gratitude", "anger", "apology")}
    conditions = build_conditions(
        vectors,
        {args.layer: resid_norm},
        [args.layer],
        args.alphas,
        n_random=1,
        seed=0,
        neutral_centered={args.layer: centered},
    )
    n_rows = len(conditions) * len(prompts)
    print(
        f"layer {args.layer}: mean ‖resid_pre‖ = {resid_norm:.1f} without the first token "
        f"({resid_norm_all:.1f} with it); {len(conditions)} conditions × "
        f"{len(prompts)} prompts = {n_rows} rows, {args.max_new_tokens} new tokens, greedy"
    )
    distinct = len(set(distinct_conditions(conditions)))
    print(
        f"the sweep generates {distinct} of the {len(conditions)} conditions; the other "
        f"{len(conditions) - distinct} add a zero vector (α = 0) and copy the baseline's rows"
    )
    sweep_kwargs = dict(max_new_tokens=args.max_new_tokens, device=handle.device)

    def run_sweep() -> int:
        df = generate_sweep(
            handle.model, handle.tokenizer, prompts, conditions, batch_size=args.batch_size, **sweep_kwargs
        )
        return int(df.n_new_tokens.sum())

    step = max(1, len(conditions) // args.loop_conditions) if args.loop_conditions > 0 else 1
    loop_conditions = conditions[::step][: args.loop_conditions or None]

    def run_per_condition() -> int:
        return sum(
            int(
                generate_sweep(
                    handle.model,
                    handle.tokenizer,
                    prompts,
                    [c],
                    batch_size=args.loop_batch_size,
                    **sweep_kwargs,
                ).n_new_tokens.sum()
            )
            for c in loop_conditions
        )

    def run_plain() -> int:
        return plain_hook_sweep(handle, prompts, conditions, args.layer, args)

    configs: dict[str, Callable[[], int]] = {
        "sweep": run_sweep,
        "plain-hook": run_plain,
        "per-condition": run_per_condition,
    }
    workers = started_model_workers(handle, args.workers)
    if workers is not None:

        def run_sweep_workers() -> int:
            df = generate_sweep(
                handle.model, handle.tokenizer, prompts, conditions, batch_size=args.batch_size,
                workers=workers, **sweep_kwargs,
            )  # fmt: skip
            return int(df.n_new_tokens.sum())

        configs["sweep-workers"] = run_sweep_workers
    # Warm-up (first-call allocations, lazy initialisation), not timed.
    generate_sweep(
        handle.model,
        handle.tokenizer,
        prompts[:2],
        conditions[:2],
        max_new_tokens=2,
        batch_size=4,
        device=handle.device,
    )

    times: dict[str, list[float]] = {k: [] for k in configs}
    cpu: dict[str, list[float]] = {
        k: [] for k in configs
    }  # process CPU time: what contention does not inflate
    tokens: dict[str, int] = {}
    names = list(configs)
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate the order each repeat
            fn = configs[name]
            start, cpu_start = time.perf_counter(), time.process_time()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
            print(
                f"  repeat {rep + 1} {name:<14} {times[name][-1]:7.1f} s  {tokens[name] / times[name][-1]:7.1f} tok/s"
            )

    median = {k: statistics.median(v) for k, v in times.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    rate = {k: tokens[k] / median[k] for k in configs}
    rate_cpu = {k: tokens[k] / median_cpu[k] for k in configs}
    batch_of = {
        "sweep": args.batch_size,
        "plain-hook": args.batch_size,
        "per-condition": args.loop_batch_size,
        "sweep-workers": args.batch_size,
    }
    rows_of = {
        "sweep": n_rows,
        "plain-hook": n_rows,
        "per-condition": len(loop_conditions) * len(prompts),
        "sweep-workers": n_rows,
    }
    print(
        f"\n{'configuration':<15}{'rows':>6}{'rows/call':>10}{'median s':>10}{'tokens':>8}{'tok/s':>9}"
        f"{'CPU s':>9}{'tok/CPU s':>11}"
    )
    for name in configs:
        # The workers' CPU time is spent in other processes: this process's clock does not see it.
        cpu_cells = (
            f"{'–':>9}{'–':>11}"
            if name == "sweep-workers"
            else f"{median_cpu[name]:>9.1f}{rate_cpu[name]:>11.1f}"
        )
        print(
            f"{name:<15}{rows_of[name]:>6}{batch_of[name]:>10}{median[name]:>10.1f}{tokens[name]:>8}"
            f"{rate[name]:>9.1f}{cpu_cells}"
        )
    if len(loop_conditions) < len(conditions):
        print(
            f"(per-condition timed on {len(loop_conditions)} of {len(conditions)} conditions; its tok/s is "
            f"a rate, all conditions would take ≈ {median['per-condition'] * len(conditions) / len(loop_conditions):.0f} s)"
        )
    speedup = rate["sweep"] / rate["per-condition"]
    overhead = median["plain-hook"] / median["sweep"]
    print(
        f"\nsweep vs per-condition (batch {args.loop_batch_size}): tok/s ratio {speedup:.2f}× (target ≥ 5×)"
    )
    if "sweep-workers" in rate:
        print(
            f"sweep in worker processes vs per-condition: tok/s ratio "
            f"{rate['sweep-workers'] / rate['per-condition']:.2f}× (target ≥ 5×)"
        )
    print(
        f"same ratio in CPU time (tokens per process CPU second; not inflated by other jobs when torch runs "
        f"one thread): {rate_cpu['sweep'] / rate_cpu['per-condition']:.2f}×"
    )
    print(
        f"sweep vs plain hook (same batches; the plain hook also generates the {len(conditions) - distinct} "
        f"zero-vector conditions): time ratio {overhead:.2f} (target ≥ 0.85)"
    )
    if workers is not None:
        print(
            f"sweep in {workers.count} processes × 1 thread vs one process × {torch.get_num_threads()} threads: "
            f"time ratio {median['sweep'] / median['sweep-workers']:.2f}× (identical continuations: "
            f"{run_sweep_outputs(handle, prompts, conditions, args, sweep_kwargs, workers)})"
        )
        workers.__exit__(None, None, None)
    if not args.no_flops:
        print_compute_bound(handle, configs, median, rate)
    return 0


def run_sweep_outputs(handle, prompts, conditions, args, sweep_kwargs, workers) -> bool:
    """Whether the sweep spread over ``workers`` writes exactly the one-process sweep's continuations."""
    one = generate_sweep(
        handle.model, handle.tokenizer, prompts, conditions, batch_size=args.batch_size, **sweep_kwargs
    )
    spread = generate_sweep(
        handle.model, handle.tokenizer, prompts, conditions, batch_size=args.batch_size, workers=workers,
        **sweep_kwargs,
    )  # fmt: skip
    return list(one.continuation) == list(spread.continuation)


def print_compute_bound(handle, configs, median, rate) -> None:
    """Each configuration's FLOP rate beside the machine's matmul rate, and the ratio that bound allows."""
    peak = matmul_rate(handle.geometry.d_model, str(handle.device))
    flops = {name: counted_flops(fn) for name, fn in configs.items() if name != "sweep-workers"}
    if "sweep-workers" in configs:  # its arithmetic runs in the workers: the sweep's own batches
        flops["sweep-workers"] = flops["sweep"]
    achieved = {name: flops[name] / median[name] for name in configs}
    print(
        f"\ncompute bound (FLOPs counted in one untimed run each; matmul rate on {torch.get_num_threads()} "
        f"thread(s) "
        f"{peak / 1e9:.1f} GFLOP/s):"
    )
    print(f"{'configuration':<15}{'GFLOP':>9}{'GFLOP/s':>9}{'of matmul rate':>16}{'GFLOP per token':>17}")
    for name in configs:
        print(
            f"{name:<15}{flops[name] / 1e9:>9.1f}{achieved[name] / 1e9:>9.1f}{achieved[name] / peak:>15.0%}"
            f"{achieved[name] / rate[name] / 1e9:>17.3f}"
        )
    bound = peak / achieved["per-condition"]
    work = (achieved["per-condition"] / rate["per-condition"]) / (achieved["sweep"] / rate["sweep"])
    print(
        f"per-condition runs at {achieved['per-condition'] / peak:.0%} of the matmul rate, so batching can make "
        f"it at most {bound:.2f}× faster at equal work; the sweep does {work:.2f}× less arithmetic per "
        f"generated token (copied conditions, padding, rows past EOS), so the sweep can reach at most "
        f"{bound * work:.2f}× here (measured {rate['sweep'] / rate['per-condition']:.2f}×)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
