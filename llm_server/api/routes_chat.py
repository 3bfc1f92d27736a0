"""The spec's endpoints: /chat/blocking, /chat/stream (POST and GET) and /ping."""

from fastapi import APIRouter

router = APIRouter()
