"""The one Definitions object of the code location."""


import dagster as dg

from emotion_assets.model_card import model_card
from resources.models import ModelResource
from resources.storage import ArtifactStore, NoPickleIOManager

defs = dg.Definitions(
    assets=[model_card],
    resources={
        "models": ModelResource(),
        "store": ArtifactStore(),
        "io_manager": NoPickleIOManager(),
    },
)
