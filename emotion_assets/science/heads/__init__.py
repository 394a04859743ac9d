"""Attention-head analysis, one module per responsibility (no Dagster dependency).

- ``layout``: head geometry (``HeadGeometry``, the one definition; ``HeadLayout`` of a loaded model);
- ``capture``: per-head outputs ``z`` (TransformerLens ``hook_z``), attention patterns and values;
- ``interventions``: ablating and patching heads (``z``, ``v_only``, ``pattern_v``) while a context is open;
- ``screening``: every head's ablation effect on a readout, many heads per forward pass;
- ``attribution``: attribution patching, the linear estimates of patching and ablation effects;
- ``readouts``: the residual readout, OV circuits, QK attention onto marked tokens and head roles.

Every attention family of the registry is supported (Llama, Qwen3, Gemma-3, GPT-2, GPT-NeoX, GPT-Neo):
``science/attention_families.py`` says where each keeps its heads. The batched and attribution-based
screens built on these are ``science/batched_heads.py`` and ``science/attribution_screening.py``.
"""

from emotion_assets.science.heads.attribution import (
    ablation_attribution,
    attribution_scores,
    head_output_gradients,
)
from emotion_assets.science.heads.capture import (
    AttentionCapture,
    capture_attention,
    capture_head_outputs,
    mean_head_outputs,
    shared_positions,
)
from emotion_assets.science.heads.interventions import (
    PATCH_MODES,
    AblationMode,
    PatchMode,
    ablate_heads,
    patch_heads,
)
from emotion_assets.science.heads.layout import Head, HeadGeometry, HeadLayout, head_layout
from emotion_assets.science.heads.readouts import (
    HeadRole,
    OVReport,
    ov_circuit,
    qk_attention_to_positions,
    role_heuristic,
)
from emotion_assets.science.heads.screening import (
    ablation_effects_per_prompt,
    screen_heads_by_ablation,
    screen_heads_loop,
)

__all__ = [
    "PATCH_MODES",
    "AblationMode",
    "AttentionCapture",
    "Head",
    "HeadGeometry",
    "HeadLayout",
    "HeadRole",
    "OVReport",
    "PatchMode",
    "ablate_heads",
    "ablation_attribution",
    "ablation_effects_per_prompt",
    "attribution_scores",
    "capture_attention",
    "capture_head_outputs",
    "head_layout",
    "head_output_gradients",
    "mean_head_outputs",
    "ov_circuit",
    "patch_heads",
    "qk_attention_to_positions",
    "role_heuristic",
    "screen_heads_by_ablation",
    "screen_heads_loop",
    "shared_positions",
]
