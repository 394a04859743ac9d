"""The platform's residual capture and pooling against a plain Hugging Face forward with ``output_hidden_states``.

Workload: the first ``--prompts`` fitting prompts of ``data/prompts/emotion_prompts.jsonl`` (every
emotion, in file order), tokenized once by the platform's ``tokenize_prompts``, sorted by length and cut
into the same ``--batch-size`` batches for both methods; every boundary ``0..n_layers`` captured and pooled
``last``, ``mean`` and ``emotion_tokens`` with the default sink rules.

- ``platform``: ``extract_pooled_activations`` (what the ``activations`` asset runs): forward pre-hooks on
  the blocks, the forward stopped after the last block, sinks found and every strategy pooled per batch.
- ``plain HF``: the decoder stack (``model.model``, no LM head) called with ``output_hidden_states=True``
  and mask-derived position ids on the same batches; its hidden states pooled by the same ``find_sinks`` /
  ``pool_hidden`` calls. Hugging Face's last entry is taken after the final norm, so the final boundary is
  timed but not compared; every other boundary must agree (exit status 1 otherwise).

Both run in this process, interleaved, ``--repeats`` times; medians. Target: platform throughput ≥ 0.95 ×
plain HF.

Run: ``python bench/bench_activations.py`` (``--device cuda`` on an accelerator).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import add_model_options, load_model, time_interleaved  # noqa: E402
from emotion_assets.common import all_emotion_words  # noqa: E402
from emotion_assets.science.residual import (  # noqa: E402
    extract_pooled_activations,
    find_sinks,
    pool_hidden,
    position_ids_from_mask,
    tokenize_prompts,
)

STRATEGIES = ("last", "mean", "emotion_tokens")


def plain_hf(model, enc: dict, order: torch.Tensor, batch_size: int, device) -> dict[str, torch.Tensor]:
    """Pooled activations from ``output_hidden_states`` of the bare decoder, same batches and pooling."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    lengths = enc["attention_mask"].sum(dim=1)
    pooled: dict[str, list[torch.Tensor]] = {s: [] for s in STRATEGIES}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = int(lengths[idx].max())
        rows = {
            k: enc[k][idx, -width:].to(device)
            for k in ("input_ids", "attention_mask", "special_mask", "emotion_mask")
        }
        with torch.inference_mode():
            out = base(
                input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                position_ids=position_ids_from_mask(rows["attention_mask"]), output_hidden_states=True, use_cache=False,
            )  # fmt: skip
        hidden = torch.stack(out.hidden_states, dim=1).float()  # [batch, n_layers + 1, pos, d_model]
        sinks = find_sinks(hidden, rows["attention_mask"], rows["special_mask"])
        for strategy in STRATEGIES:
            vectors, _ = pool_hidden(
                hidden,
                rows["attention_mask"],
                strategy,
                rows["special_mask"],
                rows["emotion_mask"],
                sinks=sinks,
            )
            pooled[strategy].append(vectors.cpu())
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return {s: torch.cat(chunks)[inverse] for s, chunks in pooled.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, repeats=3)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per forward (smoke profile: 32)")
    args = parser.parse_args()
    handle = load_model(args)
    model, tokenizer, device = handle.model, handle.tokenizer, handle.device
    rows = [json.loads(line) for line in (ROOT / "data/prompts/emotion_prompts.jsonl").open()]
    texts = [r["text"] for r in rows if r.get("role", "fit") == "fit"][: args.prompts]
    n_layers = handle.geometry.n_layers
    boundaries = list(range(n_layers + 1))
    words = all_emotion_words()
    enc = tokenize_prompts(tokenizer, texts, words, 128)
    order = torch.argsort(enc["attention_mask"].sum(dim=1), stable=True)
    n_tokens = int(enc["attention_mask"].sum())
    print(
        f"{args.model} on {device}: {len(texts)} prompts ({n_tokens} tokens), batch {args.batch_size}, "
        f"{len(boundaries)} boundaries × {len(STRATEGIES)} poolings, torch threads {torch.get_num_threads()}, "
        f"{args.repeats} repeats (median, interleaved)"
    )

    def platform() -> dict[str, torch.Tensor]:
        result = extract_pooled_activations(
            model, tokenizer, texts, boundaries=boundaries, strategies=list(STRATEGIES), emotion_words=words,
            batch_size=args.batch_size, device=device,
        )  # fmt: skip
        return result.pooled

    methods = {"platform": platform, "plain HF": lambda: plain_hf(model, enc, order, args.batch_size, device)}
    median, results = time_interleaved(methods, args.repeats, device)
    for name, seconds in median.items():
        print(
            f"{name:>9}: {seconds:6.2f} s  ({len(texts) / seconds:7.1f} prompts/s, {n_tokens / seconds:8.0f} tokens/s)"
        )
    ratio = median["plain HF"] / median["platform"]
    print(f"throughput platform / plain HF: {ratio:.2f} (target ≥ 0.95)")
    worst = 0.0
    for strategy in STRATEGIES:
        ours = results["platform"][strategy][:, :n_layers]  # the final boundary differs by definition
        theirs = results["plain HF"][strategy][:, :n_layers]
        scale = theirs.abs().amax().clamp(min=1.0)
        worst = max(worst, float((ours - theirs).abs().amax() / scale))
    print(f"pooled activations, boundaries 0..{n_layers - 1}: max relative |Δ| {worst:.1e}")
    if worst > 1e-5:
        print("FAIL: the platform's pooled activations differ from the plain HF forward's")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
