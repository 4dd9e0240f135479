"""vLLM's tokenizer routes (the work is in server/tokenization.py): /tokenize, /detokenize, /tokenizer_info."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from argen.server import protocol as p
from argen.server import tokenization
from argen.server.errors import ERROR_RESPONSES
from argen.server.state import Served

router = APIRouter()


@router.post("/tokenize", response_model=p.TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: p.TokenizeRequest, served: Served) -> p.TokenizeResponse:
    return await asyncio.to_thread(tokenization.tokenize, served.gen, body, served.policy)


@router.post("/detokenize", response_model=p.DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: p.DetokenizeRequest, served: Served) -> p.DetokenizeResponse:
    return await asyncio.to_thread(tokenization.detokenize, served.gen, body, served.policy)


@router.get("/tokenizer_info")
async def tokenizer_info(served: Served) -> dict:
    return served.tokenizer_info
