from __future__ import annotations

from fastapi import APIRouter

from api.deps import StateDep
from api.protocol.errors import error_responses
from api.protocol.models import ModelCard, ModelList
from api.state import AppState
from tasks.errors import ModelNotFound, quote

router = APIRouter()


def _card(state: AppState, name: str) -> ModelCard:
    entry = state.catalog.get(name)
    return ModelCard(
        id=name,
        created=state.started_at,
        capability=entry.capability,
        max_input_tokens=entry.max_input_tokens,
        **entry.options.public(),  # the capability's own fields
    )


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 429))
async def list_models(state: StateDep) -> ModelList:
    names = state.catalog.names(state.settings.models)  # aliases too: clients pick by name
    return ModelList(data=[_card(state, m) for m in names])


@router.get(
    "/v1/models/{model_id:path}", response_model=ModelCard, responses=error_responses(401, 404, 429)
)
async def get_model(model_id: str, state: StateDep) -> ModelCard:
    if model_id not in state.catalog.names(state.settings.models):
        raise ModelNotFound(f"The model {quote(model_id)} does not exist", param="model")
    return _card(state, model_id)
