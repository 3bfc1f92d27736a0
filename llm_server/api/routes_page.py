"""The built-in chat page at GET /."""

from fastapi import APIRouter

router = APIRouter()
