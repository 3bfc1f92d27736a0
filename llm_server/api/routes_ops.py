"""Operator endpoints: /health and /metrics."""

from fastapi import APIRouter

router = APIRouter()
