"""Every head phase on every attention family of the registry, on tiny random-weight models.

Rows of the matrix are the families of ``tests.tiny_models.FAMILIES`` (Llama, GPT-2, GPT-NeoX, GPT-Neo,
Qwen3, Gemma-3); each test is one phase. Known answers: residual capture equals ``output_hidden_states``;
recomputed patterns equal eager ``output_attentions`` and TransformerLens ``hook_pattern``; ablating a
head changes the output and only that head's ``z``; patching a run with itself changes nothing;
``pattern_v`` equals ``z`` patching; attribution scores equal finite-difference derivatives of the readout;
the OV readout equals the head's write measured through the model; steering with a zero vector is the
identity and the first generated token is steered under the KV cache with left padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedModel

from emotion_assets.science import heads as H
from emotion_assets.science.attention_families import (
    AttentionCall,
    attention_module,
    attention_output_norm,
    head_patterns,
    output_projection,
    read_call,
)
from emotion_assets.science.circuits import ablate_mlps, readout_projection
from emotion_assets.science.heads import readouts
from emotion_assets.science.interventions import add_to_residual, hooks_removed
from emotion_assets.science.residual import capture_residuals, decoder_blocks, position_ids_from_mask
from tests.tiny_models import FAMILIES, SLIDING_WINDOW, byte_tokenizer, tiny_gemma2, tiny_gemma3

EMOTION = ["I am so grateful for this!", "Thanks a lot, truly.", "We really appreciate it", "Thank you"]
NEUTRAL = ["I am so curious about this", "Notes on a lot, truly.", "We really evaluate it", "Read it"]
NAMES = list(FAMILIES)
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads; on busy shared cores they only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _eager(make: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    model = make()
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module", params=NAMES)
def family(request: pytest.FixtureRequest) -> tuple[str, PreTrainedModel]:
    """One family's tiny model with its default attention implementation (SDPA where supported)."""
    return request.param, FAMILIES[request.param]()


@pytest.fixture(scope="module")
def pair() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Emotion and neutral prompts tokenized together (left padding), so the two halves share a width."""
    enc = byte_tokenizer()(EMOTION + NEUTRAL, padding=True, return_tensors="pt")
    n = len(EMOTION)
    emotion = {k: enc[k][:n] for k in ("input_ids", "attention_mask")}
    neutral = {k: enc[k][n:] for k in ("input_ids", "attention_mask")}
    assert (neutral["attention_mask"][:, 0] == 0).any()  # really left-padded
    return emotion, neutral


def _forward(model: nn.Module, batch: dict[str, Tensor], **kwargs: bool):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), **kwargs)


def _logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return _forward(model, batch).logits  # [batch, pos, vocab]


def _direction(model: nn.Module, seed: int = 0) -> Tensor:
    return torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def _real_max(diff: Tensor, mask: Tensor) -> float:
    """Max of ``diff`` ``[batch, pos, ...]`` over real (non-pad) positions."""
    return float(diff[mask.bool()].abs().max())


# --- geometry and residual capture ---------------------------------------------------------------------


def test_layout_reads_each_family(family):
    _, model = family
    cfg = model.config
    layout = H.head_layout(model)
    n_heads = getattr(cfg, "num_attention_heads", None) or cfg.num_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    assert (layout.n_layers, layout.n_heads, layout.n_kv_heads) == (len(decoder_blocks(model)), n_heads, n_kv)
    assert layout.head_dim * n_heads == output_projection(decoder_blocks(model)[0]).weight.numel() // (
        cfg.hidden_size
    )


def test_residual_capture_equals_hidden_states(family, pair):
    _, model = family
    batch, _ = pair
    n_layers = len(decoder_blocks(model))
    captured = capture_residuals(model, batch["input_ids"], batch["attention_mask"], range(n_layers + 1))
    hidden = _forward(model, batch, output_hidden_states=True).hidden_states
    for layer in range(n_layers):
        assert _real_max(captured[:, layer] - hidden[layer], batch["attention_mask"]) <= ATOL
    final = readouts._final_norm(model)
    assert final is not None
    with torch.inference_mode():
        normed = final(captured[:, n_layers])
    assert _real_max(normed - hidden[-1], batch["attention_mask"]) <= ATOL


# --- patterns and values --------------------------------------------------------------------------------


def _pattern_parity(make: Callable[[], PreTrainedModel], batch: dict[str, Tensor]) -> float:
    """Max |recomputed pattern - eager output_attentions| over real query rows, every layer."""
    reference = _forward(_eager(make), batch, output_attentions=True).attentions
    model = make()
    attention = H.capture_attention(model, batch["input_ids"], batch["attention_mask"], range(len(reference)))
    real = batch["attention_mask"].bool()
    worst = 0.0
    for layer, eager in enumerate(reference):
        diff = (attention.patterns[layer] - eager).permute(0, 2, 1, 3)  # [batch, q_pos, n_heads, k_pos]
        worst = max(worst, float(diff[real].abs().max()))
    return worst


@pytest.mark.parametrize("name", NAMES)
def test_recomputed_pattern_equals_eager_attention(name, pair):
    batch, _ = pair
    assert _pattern_parity(FAMILIES[name], batch) <= ATOL


@pytest.mark.parametrize(
    "make",
    [lambda: tiny_gemma3(softcapping=5.0), tiny_gemma2],
    ids=["gemma3-softcapping-field-unused", "gemma2-softcapping-applied"],
)
def test_soft_capping_is_applied_exactly_where_the_model_applies_it(make, pair):
    batch, _ = pair
    assert _pattern_parity(make, batch) <= ATOL


def test_patterns_skip_pads_and_windows(family, pair):
    name, model = family
    batch, _ = pair
    layout = H.head_layout(model)
    attention = H.capture_attention(
        model, batch["input_ids"], batch["attention_mask"], range(layout.n_layers)
    )
    real = batch["attention_mask"].bool()
    everything = torch.ones_like(real)
    for layer, pattern in attention.patterns.items():
        mass = H.qk_attention_to_positions(pattern, everything, query_position=-1)  # [batch, n_heads]
        torch.testing.assert_close(mass, torch.ones_like(mass))
        assert float(H.qk_attention_to_positions(pattern, ~real).abs().max()) == 0.0  # pads get nothing
        sliding = {"gpt_neo": (1, 2), "gemma3": (0, 1)}.get(name, ())
        if layer in sliding:  # keys SLIDING_WINDOW or more tokens back are out of reach
            assert float(pattern[..., -1, : pattern.shape[-1] - SLIDING_WINDOW].abs().max()) == 0.0


def test_pattern_times_values_is_z(family, pair):
    _, model = family
    batch, _ = pair
    layout = H.head_layout(model)
    layers = list(range(layout.n_layers))
    z = H.capture_head_outputs(model, batch["input_ids"], batch["attention_mask"], layers)
    attention = H.capture_attention(model, batch["input_ids"], batch["attention_mask"], layers)
    for layer in layers:
        for head in range(layout.n_heads):
            v = attention.values[layer][:, :, layout.kv_head(head)]  # [batch, k_pos, d_head]
            rebuilt = attention.patterns[layer][:, head] @ v  # [batch, q_pos, d_head]
            assert _real_max(rebuilt - z[layer][:, :, head], batch["attention_mask"]) <= ATOL


# --- ablation and patching ------------------------------------------------------------------------------


def test_ablation_changes_the_output_and_only_that_head(family, pair):
    _, model = family
    batch, _ = pair
    layout = H.head_layout(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    clean = H.capture_head_outputs(model, ids, mask, [1])[1]
    mean_z = H.mean_head_outputs(H.capture_head_outputs(model, ids, mask, [1]), mask)
    for mode in ("zero", "mean"):
        with H.ablate_heads(model, [(1, 2)], mode=mode, mean_z=mean_z):
            ablated = H.capture_head_outputs(model, ids, mask, [1])[1]
            logits = _logits(model, batch)
        expected = (
            torch.zeros_like(clean[:, :, 2]) if mode == "zero" else mean_z[1][2].expand_as(clean[:, :, 2])
        )
        torch.testing.assert_close(ablated[:, :, 2], expected)
        others = [h for h in range(layout.n_heads) if h != 2]
        assert torch.equal(ablated[:, :, others], clean[:, :, others])
        assert _real_max(logits - _logits(model, batch), mask) > 1e-4
    assert hooks_removed(model)


@pytest.mark.parametrize("mode", H.PATCH_MODES)
def test_patching_a_run_with_itself_changes_nothing(family, pair, mode):
    _, model = family
    _, neutral = pair
    layout = H.head_layout(model)
    ids, mask = neutral["input_ids"], neutral["attention_mask"]
    layers = list(range(layout.n_layers))
    heads = [(layer, head) for layer in layers for head in range(layout.n_heads)]
    source_z = H.capture_head_outputs(model, ids, mask, layers)
    source_attention = H.capture_attention(model, ids, mask, layers)
    clean = _logits(model, neutral)
    with H.patch_heads(model, heads, source_z, mode=mode, source_attention=source_attention):
        patched = _logits(model, neutral)
    assert _real_max(patched - clean, mask) <= 1e-4
    assert hooks_removed(model)


def test_pattern_v_equals_z_patching_and_moves_the_output(family, pair):
    _, model = family
    emotion, neutral = pair
    layout = H.head_layout(model)
    heads = [(0, 1), (1, 0), (1, layout.n_heads - 1)]
    source_z = H.capture_head_outputs(model, emotion["input_ids"], emotion["attention_mask"], [0, 1])
    source_attention = H.capture_attention(model, emotion["input_ids"], emotion["attention_mask"], [0, 1])
    positions = H.shared_positions(emotion["attention_mask"], neutral["attention_mask"])
    clean = _logits(model, neutral)
    with H.patch_heads(model, heads, source_z, mode="z", positions=positions):
        by_z = _logits(model, neutral)
    patch = H.patch_heads(
        model, heads, mode="pattern_v", source_attention=source_attention, positions=positions
    )
    with patch:
        by_pattern_v = _logits(model, neutral)
    mask = neutral["attention_mask"]
    assert _real_max(by_pattern_v - by_z, mask) <= 1e-4
    assert _real_max(by_z - clean, mask) > 1e-3


def test_v_only_uses_the_current_pattern_over_source_values(family, pair):
    _, model = family
    emotion, neutral = pair
    layout = H.head_layout(model)
    ids, mask = neutral["input_ids"], neutral["attention_mask"]
    source = H.capture_attention(model, emotion["input_ids"], emotion["attention_mask"], [1])
    current = H.capture_attention(model, ids, mask, [1])
    clean_z = H.capture_head_outputs(model, ids, mask, [1])[1]
    head = layout.n_heads - 1
    kv = layout.kv_head(head)
    with H.patch_heads(model, [(1, head)], mode="v_only", source_attention=source):
        patched_z = H.capture_head_outputs(model, ids, mask, [1])[1]
    expected = current.patterns[1][:, head] @ source.values[1][:, :, kv]  # [batch, q_pos, d_head]
    assert _real_max(patched_z[:, :, head] - expected, mask) <= ATOL
    others = [h for h in range(layout.n_heads) if h != head]  # the rest of its KV group included
    assert torch.equal(patched_z[:, :, others], clean_z[:, :, others])
    assert _real_max(patched_z[:, :, head] - clean_z[:, :, head], mask) > 1e-4


# --- screening, attribution, circuits --------------------------------------------------------------------


def test_batched_screening_equals_the_loop(family, pair):
    _, model = family
    batch, _ = pair
    layout = H.head_layout(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    heads = [(layer, head) for layer in range(layout.n_layers) for head in range(layout.n_heads)]
    direction = _direction(model, 1)
    boundary = layout.n_layers - 1
    batched = H.screen_heads_by_ablation(model, ids, mask, direction, boundary, heads, heads_per_pass=5)
    loop = H.screen_heads_loop(model, ids, mask, direction, boundary, heads)
    torch.testing.assert_close(batched, loop, rtol=0, atol=1e-4)
    late = [i for i, (layer, _) in enumerate(heads) if layer >= boundary]
    assert (batched[late] == 0).all() and batched.abs().max() > 1e-5
    clean = readout_projection(model, ids, mask, direction, boundary).mean()
    with H.ablate_heads(model, [heads[0]]):
        ablated = readout_projection(model, ids, mask, direction, boundary).mean()
    assert abs(float(ablated - clean) - float(loop[0])) <= 1e-5


def _readout64(model: nn.Module, batch: dict[str, Tensor], direction: Tensor, boundary: int) -> float:
    """Mean projection of the last token's residual at ``boundary`` on the unit direction, in float64."""
    hidden = capture_residuals(model, batch["input_ids"], batch["attention_mask"], [boundary])[:, 0, -1]
    return float((hidden.double() @ (direction / direction.norm())).mean())


@pytest.mark.parametrize("name", NAMES)
def test_attribution_equals_finite_differences(name, pair):
    emotion, neutral = pair
    eps = 1e-2  # central differences are exact to O(eps^2); the norms compute in float32 even in a float64 model
    model = FAMILIES[name]().double()
    layout = H.head_layout(model)
    direction = _direction(model, 2).double()
    boundary = layout.n_layers
    e_ids, e_mask = emotion["input_ids"], emotion["attention_mask"]
    n_ids, n_mask = neutral["input_ids"], neutral["attention_mask"]
    ablation = H.ablation_attribution(model, n_ids, n_mask, direction, boundary)
    patching = H.attribution_scores(model, emotion, neutral, direction, boundary)
    assert H.attribution_scores(model, neutral, neutral, direction, boundary).abs().max() == 0
    z_neu = H.capture_head_outputs(model, n_ids, n_mask, [0, 1])
    z_emo = H.capture_head_outputs(model, e_ids, e_mask, [0, 1])
    shared = H.shared_positions(e_mask, n_mask)

    def slope(layer: int, head: int, step: Tensor, positions: Tensor | None = None) -> float:
        """Central difference of the readout along ``step`` of head ``(layer, head)``'s ``z``."""
        moved = []
        for sign in (1, -1):
            source = {layer: z_neu[layer] + sign * eps * step}
            with H.patch_heads(model, [(layer, head)], source, positions=positions):
                moved.append(_readout64(model, neutral, direction, boundary))
        return (moved[0] - moved[1]) / (2 * eps)

    for layer, head in [(0, 0), (1, layout.n_heads - 1)]:
        ablate = slope(layer, head, -z_neu[layer])  # toward z = 0
        assert ablate == pytest.approx(float(ablation[layer, head]), rel=1e-3, abs=1e-6)
        patch = slope(layer, head, z_emo[layer] - z_neu[layer], shared)  # toward the emotion run
        assert patch == pytest.approx(float(patching[layer, head]), rel=1e-3, abs=1e-6)
    assert ablation.abs().max() > 1e-4 and patching.abs().max() > 1e-4


def test_mlp_ablation_reaches_only_later_boundaries(family, pair):
    _, model = family
    batch, _ = pair
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n_layers = len(decoder_blocks(model))
    direction = _direction(model, 3)
    hidden = _forward(model, batch, output_hidden_states=True).hidden_states
    last = mask.shape[1] - 1  # left padding: every row's last real token
    for boundary in (0, 1):
        expected = hidden[boundary][:, last] @ (direction / direction.norm())
        torch.testing.assert_close(readout_projection(model, ids, mask, direction, boundary), expected)
    clean = {b: readout_projection(model, ids, mask, direction, b) for b in (1, n_layers)}
    with ablate_mlps(model, [1]):
        assert torch.equal(readout_projection(model, ids, mask, direction, 1), clean[1])
        moved = readout_projection(model, ids, mask, direction, n_layers)
    assert (moved - clean[n_layers]).abs().max() > 1e-4
    assert hooks_removed(model)


# --- OV readout -------------------------------------------------------------------------------------------


def _measured_write(model: nn.Module, layer: int, head: int, direction: Tensor) -> Tensor:
    """What head ``(layer, head)`` writes for input ``direction``, measured through the model's own modules.

    A one-token forward (the pattern is 1) whose block ``layer`` input is replaced by the direction at unit
    RMS, minus the same forward with a zero input (removes the norm and projection biases), with every
    other head's ``z`` zeroed, read at the output projection; divided by the input scale.
    """
    layout = H.head_layout(model)
    block = decoder_blocks(model)[layer]
    scale = model.config.hidden_size**0.5
    written: list[Tensor] = []

    def run(x: Tensor) -> Tensor:
        def replace(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            new = x.to(hidden.dtype).expand_as(hidden)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        def keep_one(_module, args):
            z = args[0].reshape(*args[0].shape[:-1], layout.n_heads, layout.head_dim).clone()
            z[..., [h for h in range(layout.n_heads) if h != head], :] = 0
            return (z.reshape(args[0].shape),)

        def record(_module, _args, output):
            written.append(output.detach().clone())

        proj = output_projection(block)
        handles = [
            block.register_forward_pre_hook(replace, with_kwargs=True),
            proj.register_forward_pre_hook(keep_one),
            proj.register_forward_hook(record),
        ]
        try:
            with torch.inference_mode():
                model(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, 1, dtype=torch.long))
        finally:
            for handle in handles:
                handle.remove()
        return written.pop()[0, 0]  # [d_model]

    unit = direction / direction.norm()
    return (run(unit * scale) - run(torch.zeros_like(unit))) / scale


def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Random gains and biases in every norm, so folding them into the OV readout is put to the test."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for param in (getattr(module, "weight", None), getattr(module, "bias", None)):
                    if isinstance(param, Tensor):
                        param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("name", NAMES)
def test_ov_readout_equals_the_measured_head_write(name):
    model = _randomize_norms(FAMILIES[name](), seed=6)
    layout = H.head_layout(model)
    direction = _direction(model, 4)
    for layer, head in [(0, 0), (layout.n_layers - 1, layout.n_heads - 1)]:
        report = H.ov_circuit(model, layer, head, direction, {"self": direction}, unembed_top_k=5)
        measured = _measured_write(model, layer, head, direction)  # [d_model]
        post = attention_output_norm(decoder_blocks(model)[layer])
        if (
            post is not None
        ):  # Gemma: the head's write is normalised; the readout keeps its gain, not its scale
            with torch.inference_mode():
                measured = post(measured) * (measured.pow(2).mean() + post.eps).sqrt()
        torch.testing.assert_close(report.output, measured, rtol=1e-4, atol=1e-5)
        assert report.kv_head == layout.kv_head(head) and len(report.top_token_ids) == 5
        assert report.gain == pytest.approx(float(report.output.norm()))
        assert report.cosines["self"] == pytest.approx(
            float(torch.nn.functional.cosine_similarity(measured, direction, dim=0)), abs=1e-5
        )
    assert (name == "gemma3") == (post is not None)


# --- steering under generate ------------------------------------------------------------------------------


def _generate(model: nn.Module, enc: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    out = model.generate(
        **enc, max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    return out.sequences, torch.stack(out.scores, dim=1)  # [batch, width + 2], [batch, 2, vocab]


def _steered_logits(model: nn.Module, ids: Tensor, mask: Tensor, vectors: Tensor, at: list[int]) -> Tensor:
    """Last-position logits of a plain forward with ``vectors`` added at resid_pre of block 1 at ``at``."""

    def hook(_module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        hidden[:, at] += vectors[:, None, :]
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handle = decoder_blocks(model)[1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            return model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
            ).logits[:, -1]
    finally:
        handle.remove()


def test_steering_under_the_kv_cache_with_left_padding(family, pair):
    _, model = family
    _, neutral = pair
    enc = dict(neutral)
    width = enc["input_ids"].shape[1]
    vectors = 8.0 * torch.randn(
        len(NEUTRAL), model.config.hidden_size, generator=torch.Generator().manual_seed(5)
    )
    base_seq, base_scores = _generate(model, enc)
    with add_to_residual(model, 1, torch.zeros_like(vectors)):
        seq, scores = _generate(model, enc)
    assert torch.equal(seq, base_seq) and torch.equal(scores, base_scores)  # alpha = 0 is the identity
    with add_to_residual(model, 1, vectors, prompt_positions="all"):
        _, scores = _generate(model, enc)
    manual = _steered_logits(model, enc["input_ids"], enc["attention_mask"], vectors, list(range(width)))
    torch.testing.assert_close(scores[:, 0], manual, atol=1e-4, rtol=1e-4)
    assert ((scores[:, 0] - base_scores[:, 0]).abs().amax(dim=-1) > 1e-2).all()
    with add_to_residual(model, 1, vectors, prompt_positions="none"):
        seq, scores = _generate(model, enc)
    torch.testing.assert_close(scores[:, 0], base_scores[:, 0])  # the prompt is untouched
    ids = seq[:, : width + 1]
    mask = torch.cat([enc["attention_mask"], torch.ones(len(NEUTRAL), 1, dtype=torch.long)], dim=1)
    torch.testing.assert_close(
        scores[:, 1], _steered_logits(model, ids, mask, vectors, [width]), atol=1e-4, rtol=1e-4
    )
    assert hooks_removed(model)


# --- TransformerLens bridge parity ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bridge_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The byte tokenizer loaded from a folder: the bridge reloads its tokenizer by ``name_or_path``."""
    path = tmp_path_factory.mktemp("byte-tokenizer")
    byte_tokenizer().save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def bridge_max_abs_diff(name: str, tokenizer) -> dict[str, float]:
    """Max |ours - bridge| of ``hook_z``, ``hook_pattern`` and ``hook_v`` over every layer of a family."""
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = _eager(FAMILIES[name])
    hf_model.config._name_or_path = f"tiny-{name}"
    hf_model.config.architectures = [type(hf_model).__name__]
    bridge = TransformerBridge.boot_transformers(
        f"tiny-{name}", hf_model=hf_model, tokenizer=tokenizer, device="cpu"
    )
    ids = tokenizer(["I am so grateful!", "Notes on a cat..."], return_tensors="pt")[
        "input_ids"
    ]  # equal lengths
    ours = FAMILIES[name]()
    layers = list(range(H.head_layout(ours).n_layers))
    cache: dict[str, Tensor] = {}

    def recorder(hook_name: str):
        def record(tensor: Tensor, hook) -> Tensor:
            cache[hook_name] = tensor.detach().clone()
            return tensor

        return record

    names = [f"blocks.{ly}.attn.{n}" for ly in layers for n in ("hook_z", "hook_pattern", "hook_v")]
    with torch.inference_mode():
        bridge.run_with_hooks(ids, fwd_hooks=[(n, recorder(n)) for n in names])
    mask = torch.ones_like(ids)
    z = H.capture_head_outputs(ours, ids, mask, layers)
    attention = H.capture_attention(ours, ids, mask, layers)
    diffs = {"hook_z": 0.0, "hook_pattern": 0.0, "hook_v": 0.0}
    for layer in layers:
        for key, mine in (("hook_z", z[layer]), ("hook_pattern", attention.patterns[layer]),
                          ("hook_v", attention.values[layer])):  # fmt: skip
            theirs = cache[f"blocks.{layer}.attn.{key}"]
            assert theirs.shape == mine.shape, (key, layer, tuple(theirs.shape), tuple(mine.shape))
            diffs[key] = max(diffs[key], float((theirs - mine).abs().max()))
    return diffs


@pytest.mark.parametrize("name", NAMES)
def test_hooks_match_the_transformer_lens_bridge(name, bridge_tokenizer):
    diffs = bridge_max_abs_diff(name, bridge_tokenizer)
    assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_a_flash_attention_padding_mask_gives_the_same_pattern(name, pair):
    """Flash attention passes the ``[batch, k_pos]`` padding mask; causality and the window are implied."""
    batch, _ = pair
    model = FAMILIES[name]()
    calls: list[AttentionCall] = []

    def record(module, args, kwargs):
        calls.append(read_call(module, args, kwargs))

    attn = attention_module(decoder_blocks(model)[0])  # a sliding-window layer for Gemma-3
    handle = attn.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _forward(model, batch)
    finally:
        handle.remove()
    layout = H.head_layout(model)
    padding_only = AttentionCall(calls[0].hidden, batch["attention_mask"], calls[0].rotary)
    with torch.inference_mode():
        full = head_patterns(attn, layout, calls[0])
        got = head_patterns(attn, layout, padding_only)
    real = batch["attention_mask"].bool()
    assert _real_max((got - full).permute(0, 2, 1, 3), real) <= ATOL
