"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models."""

from fastapi import APIRouter

router = APIRouter()
