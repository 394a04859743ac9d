"""Fluency of generated continuations: length, distinct-2, repetition, degeneracy and the unsteered model's
log-likelihood, so every intervention's effect can stand beside what it costs the text.

Tokens (for distinct-2 and repetition) are the lowercased **text tokens** of :func:`text_tokens`: words
(letters or digits, with inner apostrophes: ``i'd``) and runs of punctuation/symbols (``...``, ``#``), split
at whitespace and at word/symbol boundaries. Symbols count, so "I'd I'm # # # #" is seen repeating.

- ``distinct_2`` = distinct bigrams / bigrams (Li et al. 2016); NaN with fewer than 2 tokens.
- ``repetition_rate`` = share of tokens 2..n equal to one of the ``window`` (4) tokens before them; 0 for
  varied text, 1 for "the the the the", → 1 for any loop with a period ≤ window; NaN with fewer than 2
  tokens. Ordinary English scores ≈ 0–0.15 (function words recur within four tokens now and then).
- ``degenerate``: :func:`degenerate_reason` is not None: ``"empty"`` (nothing after stripping),
  ``"no_words"`` (punctuation/symbols only), ``"single_word"`` (one word, whatever punctuation), or
  ``"repetitive"`` (repetition_rate ≥ :data:`REPETITION_THRESHOLD` with at least
  :data:`MIN_TOKENS_FOR_REPETITION` tokens). The evaluator suite neutralises the first three
  (:func:`structural_degeneracy`); the repetitive reason is reported here only.
- :func:`continuation_logprob`: mean log-probability per continuation token under a causal LM given the
  prompt (one batched forward per batch, left padding); perplexity = exp(−mean).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from functools import partial
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from emotion_assets.science.batch_cache import BatchCache, batch_key, require_fingerprint
from emotion_assets.science.parallel import ModelWorkers
from emotion_assets.science.residual import position_ids_from_mask

#: Tokens back that a repeated token is looked for in.
REPETITION_WINDOW = 4
#: Repetition rate at or above which a continuation is degenerate (half its tokens echo the last four).
REPETITION_THRESHOLD = 0.5
#: Fewer tokens than this are never called repetitive ("no no" is a fine answer).
MIN_TOKENS_FOR_REPETITION = 4

_TOKEN_RE = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*|[^\w\s]+|_+")
_WORD_RE = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")


def text_tokens(text: str | None) -> list[str]:
    """Lowercased words and punctuation/symbol runs of ``text`` (see the module docstring)."""
    return _TOKEN_RE.findall((text or "").lower().replace("\u2019", "'"))


def structural_degeneracy(text: str | None) -> str | None:
    """``"empty"``, ``"no_words"`` or ``"single_word"`` for text an evaluator must not score, else None."""
    stripped = (text or "").strip()
    if not stripped:
        return "empty"
    words = _WORD_RE.findall(stripped)
    if not words:
        return "no_words"
    if len(words) == 1:
        return "single_word"
    return None


def distinct_n(tokens: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams / n-grams of ``tokens``; NaN when there is no n-gram."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repetition_rate(tokens: Sequence[str], window: int = REPETITION_WINDOW) -> float:
    """Share of tokens 2..n equal to one of the ``window`` tokens before them; NaN for fewer than 2 tokens."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    if len(tokens) < 2:
        return math.nan
    repeats = sum(tokens[i] in tokens[max(0, i - window) : i] for i in range(1, len(tokens)))
    return repeats / (len(tokens) - 1)


def degenerate_reason(
    text: str | None,
    *,
    window: int = REPETITION_WINDOW,
    threshold: float = REPETITION_THRESHOLD,
) -> str | None:
    """Why ``text`` is degenerate (``empty``, ``no_words``, ``single_word``, ``repetitive``), or None."""
    reason = structural_degeneracy(text)
    if reason is not None:
        return reason
    tokens = text_tokens(text)
    if len(tokens) >= MIN_TOKENS_FOR_REPETITION and repetition_rate(tokens, window) >= threshold:
        return "repetitive"
    return None


def text_fluency(
    continuations: Sequence[str | None],
    generated_tokens: Sequence[int] | None = None,
    *,
    window: int = REPETITION_WINDOW,
    threshold: float = REPETITION_THRESHOLD,
) -> pd.DataFrame:
    """Per continuation: ``generated_tokens`` (the model's new-token count when given, else <NA>),
    ``n_text_tokens``, ``distinct_2``, ``repetition_rate``, ``degenerate`` and ``degenerate_reason``
    (None when fluent). One row per continuation, in order."""
    if generated_tokens is not None and len(generated_tokens) != len(continuations):
        raise ValueError(
            f"generated_tokens has {len(generated_tokens)} entries for {len(continuations)} continuations."
        )
    rows = []
    for text in continuations:
        tokens = text_tokens(text)
        reason = degenerate_reason(text, window=window, threshold=threshold)
        rows.append({
            "n_text_tokens": len(tokens),
            "distinct_2": distinct_n(tokens, 2),
            "repetition_rate": repetition_rate(tokens, window),
            "degenerate": reason is not None,
            "degenerate_reason": reason,
        })  # fmt: skip
    frame = pd.DataFrame(
        rows, columns=["n_text_tokens", "distinct_2", "repetition_rate", "degenerate", "degenerate_reason"]
    )
    counts = pd.array(
        list(generated_tokens) if generated_tokens is not None else [pd.NA] * len(frame), dtype="Int64"
    )
    frame.insert(0, "generated_tokens", counts)
    return frame.astype({"n_text_tokens": "int64", "degenerate": bool, "distinct_2": float,
                         "repetition_rate": float})  # fmt: skip


# ------------------------------------------------------------------------------------ log-likelihood


def _token_ids(tokenizer: Any, texts: Sequence[str], special: bool) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=special)["input_ids"]]


def _valid_sums(stored: Any, n_rows: int) -> bool:
    """A cached batch of the log-likelihood pass: ``n_rows`` log-probability sums."""
    return isinstance(stored, list) and len(stored) == n_rows and all(isinstance(v, float) for v in stored)


def _model_kwargs(model: torch.nn.Module, **kwargs: Any) -> dict[str, Any]:
    """``kwargs`` without those ``model.forward`` does not take (``position_ids``, ``logits_to_keep``)."""
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in kwargs.items() if k in params or takes_any}


def _padded(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    """Token rows padded to the longest, on the left or the right: ``ids``, ``mask`` ``[n_rows, width]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(list(row))
        mask[i, span] = 1
    return ids, mask


def _continuation_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    prompt_of: Sequence[int],
    pad_id: int,
    device: torch.device,
) -> Float[Tensor, "batch keep"]:
    """Log-probabilities of each row's continuation tokens given its prompt (0 past a row's length).

    The distinct ``prompts`` run once, left-padded, keeping their KV cache and last logits; the cache is
    gathered to the rows (``prompt_of[b]`` is row b's prompt) and the right-padded continuations run on it,
    positions continuing the prompt's. Every continuation token is scored from the logits before it: the
    first from the prompt's last position.
    """
    p_ids, p_mask = (t.to(device) for t in _padded(prompts, pad_id, left=True))  # [n_prompts, width_p]
    prefill = model(
        **_model_kwargs(
            model, input_ids=p_ids, attention_mask=p_mask, position_ids=position_ids_from_mask(p_mask),
            use_cache=True, logits_to_keep=1,
        )
    )  # fmt: skip
    rows = torch.tensor(list(prompt_of), device=device)  # [batch]
    cache = prefill.past_key_values
    cache.batch_select_indices(rows)  # [n_prompts, ...] → [batch, ...]
    c_ids, c_mask = (t.to(device) for t in _padded(continuations, pad_id, left=False))  # [batch, keep]
    keep = c_ids.shape[1]
    mask = torch.cat([p_mask[rows], c_mask], dim=1)  # [batch, width_p + keep]
    positions = p_mask[rows].sum(dim=1, keepdim=True) + torch.arange(keep, device=device)[None, :]
    logits = model(
        **_model_kwargs(
            model,
            input_ids=c_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
    ).logits  # [batch, keep, vocab]; the last position predicts past the continuation
    before = torch.cat([prefill.logits[rows, -1:], logits[:, :-1]], dim=1).float()  # [batch, keep, vocab]
    logprobs = before.log_softmax(dim=-1).gather(-1, c_ids[..., None])[..., 0]  # [batch, keep]
    return logprobs.masked_fill(c_mask == 0, 0.0)


@torch.inference_mode()
def _logprob_sums_of_handle(
    handle: Any,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    prompt_of: Sequence[int],
    pad_id: int,
    device: str,
) -> np.ndarray:
    """Each row's summed continuation log-probability (:func:`_continuation_logprobs`) on ``handle.model``."""
    logprobs = _continuation_logprobs(
        handle.model, prompts, continuations, prompt_of, pad_id, torch.device(device)
    )
    return logprobs.sum(dim=-1).double().cpu().numpy()  # [batch]


@torch.inference_mode()
def continuation_logprob(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str | None],
    *,
    batch_size: int,
    device: torch.device | str | None = None,
    cache: BatchCache | None = None,
    fingerprint: str = "",
    workers: ModelWorkers | None = None,
) -> pd.DataFrame:
    """Mean log-probability of each continuation's tokens given its prompt, under ``model`` (a HF causal LM,
    normally the unsteered one).

    The prompt is tokenized as generation tokenizes it (special tokens added, e.g. BOS) and the
    continuation on its own without special tokens; the continuation is scored after the prompt. A
    repeated (prompt, continuation) pair is run once. Pairs are sorted by prompt and run ``batch_size`` at
    a time; in a batch each distinct prompt runs once and its KV cache serves all its continuations
    (a sweep scores hundreds of continuations of each prompt), with explicit position ids, so padding does
    not change a row's numbers. Returns, in input order, ``mean_logprob`` (nats per token; NaN for an empty
    continuation), ``n_scored_tokens`` and ``perplexity`` = exp(−mean_logprob). With a ``cache`` (and the
    model's ``fingerprint``) each batch's sums are kept under its content key and reused. ``workers``
    (:class:`science.parallel.ModelWorkers` holding this model as ``.model``) runs the batches in its
    processes: the same batches run (one- and two-thread forwards agree bit for bit on the tested CPU).
    """
    require_fingerprint(cache, fingerprint)
    if len(prompts) != len(continuations):
        raise ValueError(f"Got {len(prompts)} prompts for {len(continuations)} continuations.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    prompt_ids = _token_ids(tokenizer, prompts, special=True)
    cont_ids = _token_ids(tokenizer, [c or "" for c in continuations], special=False)
    empty = [i for i, ids in enumerate(prompt_ids) if not ids]
    if empty:
        raise ValueError(
            f"Prompts {empty[:5]} tokenize to no tokens, so the first continuation token has no context; "
            "give non-empty prompts or a tokenizer that adds a BOS token."
        )
    # Each distinct (prompt, continuation) pair runs once; its repeats (conditions whose steering or
    # ablation changed nothing) get its sum.
    repeat_of, distinct = pd.factorize(
        pd.Series([(tuple(p), tuple(c)) for p, c in zip(prompt_ids, cont_ids, strict=True)], dtype=object)
    )  # [n_rows] codes in first-seen order, [n_distinct] (prompt ids, continuation ids)
    n = len(distinct)
    total = np.zeros(n)
    counts = np.array([len(c) for _, c in distinct], dtype=np.int64)
    # Sorted by prompt length, then prompt, then continuation length: a batch holds few prompts.
    todo = sorted((i for i in range(n) if counts[i] > 0),
                  key=lambda i: (len(distinct[i][0]), distinct[i][0], counts[i], i))  # fmt: skip
    pending: list[tuple[list[int], str | None]] = []  # (rows of ``distinct``, cache key) per batch to run
    tasks = []
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        position = {p: j for j, p in enumerate(dict.fromkeys(distinct[i][0] for i in idx))}
        batch_prompts = list(position)
        prompt_of = [position[distinct[i][0]] for i in idx]
        conts = [distinct[i][1] for i in idx]
        key = None
        if cache is not None:
            content = {"prompts": [list(p) for p in batch_prompts], "prompt_of": prompt_of,
                       "continuations": [list(c) for c in conts], "device": dev.type}  # fmt: skip
            key = batch_key("continuation_logprob_prefix", fingerprint, content)
            stored = cache.get(key, partial(_valid_sums, n_rows=len(idx)), f"{len(idx)} log-probability sums")
            if stored is not None:
                total[idx] = stored
                continue
        pending.append((idx, key))
        tasks.append({"prompts": batch_prompts, "continuations": conts, "prompt_of": prompt_of,
                      "pad_id": pad_id, "device": str(dev)})  # fmt: skip

    def finished(number: int, sums: np.ndarray) -> None:
        idx, key = pending[number]
        total[idx] = sums
        if cache is not None and key is not None:
            cache.put(key, [float(v) for v in sums])

    if workers is None:
        workers = ModelWorkers(SimpleNamespace(model=model), load=None)
    workers.map(_logprob_sums_of_handle, tasks, on_result=finished)
    total, counts = total[repeat_of], counts[repeat_of]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, total / np.maximum(counts, 1), np.nan)
    return pd.DataFrame({"mean_logprob": mean, "n_scored_tokens": counts, "perplexity": np.exp(-mean)})


# ------------------------------------------------------------------------------------------- summary

FLUENCY_MEANS = ("generated_tokens", "n_text_tokens", "distinct_2", "repetition_rate", "mean_logprob")


def fluency_summary(
    frame: pd.DataFrame,
    condition_columns: Sequence[str],
    *,
    baseline: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """One row per condition: ``n_rows``; the mean of each fluency metric present in ``frame``
    (:data:`FLUENCY_MEANS`, under the metric's own name) with NaN rows excluded and counted in
    ``n_valid_<metric>``; ``share_degenerate``; ``perplexity`` = exp(−mean ``mean_logprob``) and
    ``perplexity_ratio`` = perplexity / the baseline condition's.

    ``frame`` holds :func:`text_fluency` columns (and optionally :func:`continuation_logprob`'s) next to
    ``condition_columns``. ``baseline`` selects the reference condition, e.g. ``{"kind": "baseline"}``
    (exactly one condition must match); without it there is no ratio. A condition's perplexity comes from
    its mean per-token log-probability (the mean over continuations), not from a mean of perplexities.
    """
    cols = list(condition_columns)
    missing = [c for c in [*cols, "degenerate"] if c not in frame]
    if missing:
        raise ValueError(f"fluency_summary needs columns {missing}; add text_fluency() output first.")
    metrics = [m for m in FLUENCY_MEANS if m in frame]
    keys = [frame[c] for c in cols]
    values = frame[metrics].astype(float)
    means = values.groupby(keys, dropna=False, sort=False).mean()  # pandas skips NaN
    valid = values.notna().groupby(keys, dropna=False, sort=False).sum().add_prefix("n_valid_")
    degenerate = frame["degenerate"].astype(float).groupby(keys, dropna=False, sort=False)
    out = pd.concat([degenerate.size().rename("n_rows"), means, valid], axis=1)
    out["share_degenerate"] = degenerate.mean()
    if "mean_logprob" in frame:
        out["perplexity"] = np.exp(-out["mean_logprob"])
    out = out.reset_index()
    if baseline is not None:
        if "perplexity" not in out:
            raise ValueError("perplexity_ratio needs mean_logprob; add continuation_logprob() output first.")
        unknown = sorted(set(baseline) - set(cols))
        if unknown:
            raise ValueError(f"baseline keys {unknown} are not condition columns {cols}.")
        hit = np.logical_and.reduce([(out[k] == v).to_numpy() for k, v in baseline.items()])
        if int(hit.sum()) != 1:
            raise ValueError(f"baseline {baseline} matches {int(hit.sum())} conditions; it must match one.")
        out["perplexity_ratio"] = out["perplexity"] / float(out.loc[hit, "perplexity"].iloc[0])
    return out
