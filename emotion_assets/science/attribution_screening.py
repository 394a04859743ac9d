"""Head screening that scales: AtP* estimates for every head, exact ablation for a shortlist.

Exhaustive screening (``heads.screen_heads_by_ablation``) runs every head's ablated copy from its layer
to the readout: cost grows with heads × layers. AtP* (Kramár et al. 2024, "AtP*: An efficient and
scalable method for localizing LLM behaviour to components") estimates every head's ablation effect from
one forward and one backward pass; the heads with the largest |estimate| are then ablated exactly and
ranked by their exact effect.

Estimate of head ``u = (L, h)``, ablation ``z_u -> z_u + dz_u`` (``dz_u = -z_u`` zero, ``mean_z - z_u``
mean), readout ``M`` as in ``heads.screen_heads_by_ablation`` (projection of the last real token's
residual at ``readout_boundary`` onto the unit direction, mean over prompts):

- **AtP** (attribution patching): ``sum_{pos, d_head} dz_u · dM/dz_u``, the gradient on the clean run.
- **QK fix** (attention saturation). The gradient passes every later head's softmax linearised; when a
  pattern is saturated the softmax's derivative is ~0 and AtP misses effects that shift that pattern.
  For every later head ``d`` (layer ``L' > L``) the change of its pre-softmax scores caused by ``u``'s
  write is linearised along the direct path (``dr_u = W_O^u dz_u`` added to the residual entering
  ``L'``; the input norm's Jacobian-vector product; ``q_proj``/``k_proj``; rotary):
  ``ds = (dq · k + q · dk) * scaling``. The softmax is then applied **exactly**. The correction replaces
  AtP's linearised softmax term on that path by the exact one:
  ``sum_{q, k} [softmax(s + ds) - A - A ⊙ (ds - <A, ds>)] ⊙ dM/dA``, with ``dM/dA[q, k] = dM/dz_d[q] ·
  v_d[k]`` (``z_d = A v_d``). ``AtP* = AtP + correction``; with unsaturated patterns and small ``ds`` the
  correction vanishes and AtP* equals AtP.
- **GradDrop** (the paper's second fix, for gradients that cancel across paths) is not applied: it needs
  one extra backward per layer (``n_layers`` backwards), which costs about as much as the exhaustive
  screen it is meant to replace; the exact confirmation of the shortlist guards the ranking instead.

Prompts are regrouped by real length without padding (as in the exhaustive screen), so every pattern is
causal with no masked rows. The QK fix recomputes patterns Llama-style (``heads._head_patterns``) and
needs the block's input norm (``input_layernorm``); other attention blocks raise ``NotImplementedError``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from emotion_assets.science.attention_families import (
    _rotate_half,
    attention_module,
    output_projection,
    read_call,
)
from emotion_assets.science.heads.attribution import head_output_gradients
from emotion_assets.science.heads.interventions import AblationMode
from emotion_assets.science.heads.layout import Head, HeadLayout, check_heads, check_readout, head_layout
from emotion_assets.science.heads.readouts import unit_direction
from emotion_assets.science.heads.screening import length_groups, screen_heads_by_ablation
from emotion_assets.science.hooks import HookSet
from emotion_assets.science.residual import (
    _hidden_from_call,
    decoder_blocks,
)


@dataclass(frozen=True)
class AttributionEstimate:
    """Per-head estimates of the ablation effect on the readout (mean over prompts)."""

    atp: Float[Tensor, "n_layers n_heads"]  # plain attribution patching (first order)
    qk_correction: Float[Tensor, "n_layers n_heads"]  # exact-softmax minus linearised-softmax, direct path

    @property
    def atp_star(self) -> Float[Tensor, "n_layers n_heads"]:
        """AtP with the QK fix."""
        return self.atp + self.qk_correction


@dataclass
class _Pass:
    """What one forward + backward of a length group records, per layer before the readout."""

    resid: dict[int, Tensor]  # block input (pre-norm residual)  [rows, pos, d_model]
    attn_in: dict[int, Tensor]  # attention module input (normed)  [rows, pos, d_model]
    rotary: dict[int, tuple[Tensor, Tensor]]  # cos, sin  [rows, pos, d_head]
    z: dict[int, Tensor]  # head outputs  [rows, pos, n_heads, d_head]
    grad_z: dict[int, Tensor]  # dM/dz, M summed over rows  [rows, pos, n_heads, d_head]


def _forward_backward(
    model: nn.Module, layout: HeadLayout, ids: Tensor, mask: Tensor, unit: Tensor, readout_boundary: int
) -> _Pass:
    """One forward to the readout recording every layer's inputs and ``z``; one backward for ``dM/dz``
    (``heads.head_output_gradients`` with the readout summed over rows)."""
    blocks = decoder_blocks(model)
    record = _Pass({}, {}, {}, {}, {})

    def block_pre(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            record.resid[layer] = _hidden_from_call(args, kwargs).detach()

        return hook

    def attn_pre(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = read_call(module, args, kwargs)
            if call.rotary is None:
                raise NotImplementedError("The AtP* QK fix needs rotary position embeddings (Llama-family).")
            record.attn_in[layer] = call.hidden.detach()
            record.rotary[layer] = (call.rotary[0].detach(), call.rotary[1].detach())

        return hook

    def record_inputs(hooks: HookSet, layer: int) -> None:
        hooks.pre(blocks[layer], block_pre(layer))
        hooks.pre(attention_module(blocks[layer]), attn_pre(layer))

    record.z, record.grad_z = head_output_gradients(
        model, ids, mask, unit, readout_boundary, reduction="sum", extra_hooks=record_inputs
    )
    return record


def _require_llama(model: nn.Module, what: str) -> HeadLayout:
    """The layout of a Llama-family model whose attention the QK fix recomputes by hand (no q/k norms,
    soft-capping or sliding windows); anything else is an error that points to exhaustive screening."""
    layout = head_layout(model)
    attn = attention_module(decoder_blocks(model)[0])
    config = getattr(attn, "config", None)
    unsupported = [name for name in ("q_norm", "k_norm") if getattr(attn, name, None) is not None]
    if getattr(config, "attn_logit_softcapping", None) or getattr(attn, "sliding_window", None):
        unsupported.append("soft-capping/sliding window")
    if layout.family != "llama" or unsupported:
        raise NotImplementedError(
            f"{what} supports plain Llama-family attention only ({type(attn).__name__}: family "
            f"{layout.family}, {unsupported or 'no extras'}); use `heads.screening: {{method: exhaustive}}`."
        )
    return layout


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` ``[rows, heads, pos, d_head]`` with ``cos``/``sin`` ``[rows, pos, d_head]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [rows, 1, pos, d_head]
    return x * cos + _rotate_half(x) * sin


def _split_heads(x: Tensor, n: int, d_head: int) -> Tensor:
    """``[..., rows, pos, n * d_head]`` -> ``[..., rows, n, pos, d_head]``."""
    return x.reshape(*x.shape[:-1], n, d_head).transpose(-2, -3)


def _queries_keys(
    attn: nn.Module, layout: HeadLayout, normed: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """Rotated queries and keys (keys repeated per query head): ``[..., rows, n_heads, pos, d_head]``."""
    hd, kv = layout.head_dim, [layout.kv_head(h) for h in range(layout.n_heads)]
    q = _rotate(_split_heads(attn.q_proj(normed), layout.n_heads, hd), cos, sin)
    k = _rotate(_split_heads(attn.k_proj(normed), layout.n_kv_heads, hd), cos, sin)
    return q, k[..., kv, :, :]


def _scores(attn: nn.Module, q: Tensor, k: Tensor) -> Tensor:
    """Scaled, causal-masked scores ``[..., q_pos, k_pos]`` (``-inf`` above the diagonal)."""
    pos = q.shape[-2]
    causal = torch.ones(pos, pos, dtype=torch.bool, device=q.device).tril()
    return ((q @ k.transpose(-1, -2)) * attn.scaling).masked_fill(~causal, float("-inf"))


@dataclass(frozen=True)
class _Downstream:
    """A later layer's clean attention state (float32) and AtP's linearised softmax term there."""

    pattern: Float[Tensor, "rows n_heads pos pos"]
    grad_pattern: Float[Tensor, "rows n_heads pos pos"]  # dM/dA = dM/dz[q] · v[k]
    # d/dx of sum(A(x) ⊙ dM/dA) through this layer's input norm, q, k and softmax only: AtP's term for
    # a write dr into this layer's input along the direct path is <linear_grad, dr>.
    linear_grad: Float[Tensor, "rows pos d_model"]


def _downstream(model: nn.Module, layout: HeadLayout, record: _Pass, layer: int) -> _Downstream:
    block = decoder_blocks(model)[layer]
    attn = attention_module(block)
    cos, sin = (t.float() for t in record.rotary[layer])
    kv = [layout.kv_head(h) for h in range(layout.n_heads)]
    with torch.inference_mode(False), torch.enable_grad():
        resid = record.resid[layer].float().clone().requires_grad_(True)  # [rows, pos, d_model]
        normed = _input_norm(block)(resid)
        pattern = torch.softmax(_scores(attn, *_queries_keys(attn, layout, normed, cos, sin)), dim=-1)
        with torch.no_grad():
            v = _split_heads(attn.v_proj(normed), layout.n_kv_heads, layout.head_dim)[:, kv]
            grad_z = record.grad_z[layer].float().transpose(1, 2)  # [rows, n_heads, pos, d_head]
            grad_pattern = grad_z @ v.transpose(-1, -2)  # [rows, n_heads, q_pos, k_pos]
        (linear_grad,) = torch.autograd.grad((pattern * grad_pattern).sum(), [resid])
    return _Downstream(pattern.detach(), grad_pattern, linear_grad)


def _input_norm(block: nn.Module) -> nn.Module:
    norm = getattr(block, "input_layernorm", None)
    if norm is None:
        raise NotImplementedError(
            f"The AtP* QK fix needs the block's input norm (input_layernorm); {type(block).__name__} has none. "
            "Use heads.screening.method: exhaustive for this model."
        )
    return norm


# Upstream heads whose writes are pushed through one later layer at once (bounds the batched tensors).
QK_CHUNK_ELEMENTS = 2**24


def _qk_correction(
    model: nn.Module,
    layout: HeadLayout,
    record: _Pass,
    delta_z: Mapping[int, Tensor],
    readout_boundary: int,
) -> Float[Tensor, "n_layers n_heads"]:
    """Per head, summed over rows and later layers: exact minus linearised pattern term on the direct path.

    For each later layer, the writes of every earlier head are stacked and pushed through that layer's
    norm, ``q_proj``/``k_proj`` and softmax together (in chunks of ``QK_CHUNK_ELEMENTS``).
    """
    blocks = decoder_blocks(model)
    hd, n_heads = layout.head_dim, layout.n_heads
    correction = torch.zeros(readout_boundary, n_heads, dtype=torch.float64)
    with torch.no_grad():
        writes = []  # each head's own write into the residual stream, [n_heads, rows, pos, d_model] per layer
        for layer in range(readout_boundary - 1):
            w_o = output_projection(blocks[layer]).weight.float()  # [d_model, n_heads * d_head]
            dz = delta_z[layer].float()  # [rows, pos, n_heads, d_head]
            writes.append(
                torch.stack([dz[:, :, h] @ w_o[:, h * hd : (h + 1) * hd].T for h in range(n_heads)])
            )
        if not writes:
            return torch.zeros(layout.n_layers, n_heads)
        per_head = writes[0][0].numel() * max(n_heads, 1) * 2
        chunk = max(1, QK_CHUNK_ELEMENTS // per_head)
        for target in range(1, readout_boundary):
            state = _downstream(model, layout, record, target)
            attn, norm = attention_module(blocks[target]), _input_norm(blocks[target])
            cos, sin = (t.float() for t in record.rotary[target])
            resid = record.resid[target].float()  # [rows, pos, d_model]
            upstream = torch.cat(writes[:target])  # [target * n_heads, rows, pos, d_model]
            for start in range(0, upstream.shape[0], chunk):
                write = upstream[start : start + chunk]
                scores = _scores(attn, *_queries_keys(attn, layout, norm(resid + write), cos, sin))
                exact = ((torch.softmax(scores, dim=-1) - state.pattern) * state.grad_pattern).sum(
                    dim=(1, 2, 3, 4)
                )
                linear = (write * state.linear_grad).sum(dim=(1, 2, 3))
                rows = torch.arange(start, start + write.shape[0])
                correction.view(-1)[rows] += (exact - linear).double().cpu()
    out = torch.zeros(layout.n_layers, n_heads, dtype=torch.float64)
    out[:readout_boundary] = correction
    return out


def attribution_estimates(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    direction: Float[Tensor, " d_model"],
    readout_boundary: int,
    mode: AblationMode = "zero",
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
    qk_fix: bool = True,
) -> AttributionEstimate:
    """AtP and the AtP* QK correction of every head's ablation effect, one forward + backward per length.

    Same score as ``heads.screen_heads_by_ablation`` (mean over prompts of ablated minus clean readout,
    the head ablated at every position); heads at layers ``>= readout_boundary`` score 0. ``qk_fix=False``
    leaves the correction at 0 (plain AtP, and works for any attention family ``head_layout`` knows).
    """
    layout = _require_llama(model, "The AtP* QK fix") if qk_fix else head_layout(model)
    check_readout(layout, readout_boundary)
    if mode == "mean" and (mean_z is None or any(ly not in mean_z for ly in range(readout_boundary))):
        raise ValueError(
            "Mean ablation needs mean_z for every layer before the readout (see mean_head_outputs)."
        )
    unit = unit_direction(direction)
    atp = torch.zeros(layout.n_layers, layout.n_heads, dtype=torch.float64)
    correction = torch.zeros_like(atp)
    if readout_boundary == 0:
        return AttributionEstimate(atp.float(), correction.float())
    for ids, mask in length_groups(input_ids, attention_mask):
        record = _forward_backward(model, layout, ids, mask, unit, readout_boundary)
        delta_z = {
            ly: (mean_z[ly].to(z.device, z.dtype) - z if mode == "mean" else -z)  # type: ignore[index]
            for ly, z in record.z.items()
        }
        for ly, dz in delta_z.items():
            atp[ly] += (dz.float() * record.grad_z[ly].float()).sum(dim=(0, 1, 3)).double().cpu()
        if qk_fix:
            correction += _qk_correction(model, layout, record, delta_z, readout_boundary)
    n = input_ids.shape[0]
    return AttributionEstimate((atp / n).float(), (correction / n).float())


def shortlist(estimates: Float[Tensor, "n_layers n_heads"], heads: Sequence[Head], size: int) -> list[Head]:
    """The ``size`` heads of ``heads`` with the largest |estimate| (ties: earlier in ``heads`` first)."""
    if size < 1:
        raise ValueError(f"The shortlist size must be >= 1, got {size}; set heads.screening.shortlist.")
    magnitude = torch.tensor([abs(float(estimates[ly, h])) for ly, h in heads])
    order = sorted(range(len(heads)), key=lambda i: (-float(magnitude[i]), i))
    return [heads[i] for i in order[:size]]


def screen_heads_atp_star(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    direction: Float[Tensor, " d_model"],
    readout_boundary: int,
    heads: Sequence[Head],
    shortlist_size: int,
    heads_per_pass: int = 90,
    mode: AblationMode = "zero",
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
    qk_fix: bool = True,
) -> pd.DataFrame:
    """AtP* estimate of every head, exact ablation of the ``shortlist_size`` largest |estimates|.

    One row per head of ``heads`` (same order): ``layer``, ``head``, ``atp``, ``atp_star``, ``confirmed``
    (in the shortlist) and ``ablation_effect`` (exact, ``screen_heads_by_ablation``; NaN where not
    confirmed). Ranking by ``|ablation_effect|`` over the confirmed heads is the screening's ranking.
    """
    layout = _require_llama(model, "The AtP* QK fix") if qk_fix else head_layout(model)
    heads = check_heads(layout, heads)
    estimate = attribution_estimates(
        model, input_ids, attention_mask, direction, readout_boundary, mode, mean_z, qk_fix
    )
    chosen = shortlist(estimate.atp_star, heads, min(shortlist_size, len(heads)))
    exact = screen_heads_by_ablation(
        model, input_ids, attention_mask, direction, readout_boundary, chosen, heads_per_pass, mode, mean_z
    )
    by_head = {head: float(value) for head, value in zip(chosen, exact, strict=True)}
    return pd.DataFrame(
        {
            "layer": [ly for ly, _ in heads],
            "head": [h for _, h in heads],
            "atp": [float(estimate.atp[ly, h]) for ly, h in heads],
            "atp_star": [float(estimate.atp_star[ly, h]) for ly, h in heads],
            "confirmed": [head in by_head for head in heads],
            "ablation_effect": [by_head.get(head, float("nan")) for head in heads],
        }
    )
