"""/v1/models: the text model this server serves, and the image models (/v1/images/generations)."""

from __future__ import annotations

from fastapi import APIRouter

from argen.server import protocol as p
from argen.server.errors import ERROR_RESPONSES, APIError
from argen.server.state import Served

router = APIRouter()


@router.get("/v1/models", response_model=p.ModelList)
async def models(served: Served) -> p.ModelList:
    return p.ModelList(data=[served.card, *(_image_card(name, served) for name in served.image_models)])


def _image_card(name: str, served) -> p.ModelCard:
    return p.ModelCard(id=name, created=served.card.created, context_length=served.image_models[name].model.n_pixels)


@router.get("/v1/models/{name:path}", response_model=p.ModelCard, responses={404: ERROR_RESPONSES[404]})
async def model(name: str, served: Served) -> p.ModelCard:
    if name in served.image_models:
        return _image_card(name, served)
    if name != served.model_id:
        raise APIError(
            404,
            f"the model {name[:200]!r} does not exist here; this server serves {served.model_id!r}",
            param="model",
            code="model_not_found",
        )
    return served.card
