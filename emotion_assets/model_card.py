"""``model_card``: proves the model wiring and shows what was loaded, from where, on which device."""

import dagster as dg
import torch

from emotion_assets.automation import config_deps
from emotion_assets.common import RunConfig
from emotion_assets.context import Phase
from emotion_assets.partitions import model_profile_partitions
from jobs.jobs import REPRESENTATION_GROUP
from resources.models import ModelHandle, ModelResource
from resources.storage import ArtifactStore, reader_path, write_json
from resources.tracking import TrackingResource

SAMPLE_PROMPT = "The most surprising thing about the weather today is"


def sample_generation(handle: ModelHandle, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 16) -> str:
    """Greedy continuation of ``prompt`` (causal LMs only)."""
    batch = handle.tokenizer([prompt], return_tensors="pt").to(handle.device)
    with torch.inference_mode():
        out = handle.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return handle.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@dg.asset(
    partitions_def=model_profile_partitions,
    deps=config_deps("model_card", model_profile_partitions),
    group_name=REPRESENTATION_GROUP,
    kinds={"pytorch"},
    code_version="1",
    description="Geometry, parameter count, dtype, device, load time, provenance and a sample generation.",
)
def model_card(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    models: ModelResource,
    store: ArtifactStore,
    tracking: TrackingResource,
) -> dg.MaterializeResult:
    phase = Phase.of(context, config, store=store, tracking=tracking, phase="foundation", models=models)
    handle = phase.handle
    with phase.recorded() as rec:
        card = handle.describe()
        card["sample_prompt"] = SAMPLE_PROMPT if handle.spec.can_generate else ""
        card["sample_generation"] = sample_generation(handle) if handle.spec.can_generate else ""
        rec.timing.samples = 1
        path = write_json(phase.directory("model_card") / "model_card.json", card)
        rec.artifacts(path)
        table = "\n".join(["| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in card.items()])
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(path)),
            "card": dg.MetadataValue.md(table),
            "n_parameters": dg.MetadataValue.int(card["n_parameters"]),
            "load_seconds": dg.MetadataValue.float(card["load_seconds"]),
            "sample_generation": dg.MetadataValue.text(
                card["sample_generation"] or "(encoder: no generation)"
            ),
            **rec.metadata(),
        }
    )
