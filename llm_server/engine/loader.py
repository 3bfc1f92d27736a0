"""The server's engine loader: ``model_config.yaml``'s model wrapped in the batching engine.

:func:`load_engine` is what ``create_app`` runs (in its background load thread) when no test
engine is given. It returns at once: the model is loaded by the engine's own scheduler thread
when ``start()`` runs (so one thread runs every torch op of the model: see batch_engine.py), and
``start()`` raises if the load fails. It imports torch and transformers, so the HTTP layer
imports this module only when the model is actually loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.engine.interface import Engine
from llm_server.engine.llama_weights import mark_engine_owned
from llm_server.helper_functionality import model_loading
from llm_server.helper_functionality.config_models import ModelSection

logger = logging.getLogger(__name__)


def load_engine(model_cfg: ModelSection, engine_cfg: EngineConfig, served_name: str) -> Engine:
    """Load the model of ``model_cfg`` (the ``model`` section) into a :class:`BatchEngine`.

    ``engine_cfg`` is the validated ``server.engine`` section;
    ``served_name`` is the name clients see (/v1/models). The engine is returned unstarted: its
    ``start()`` loads the model on the engine's own thread.
    """
    return BatchEngine.from_loader(partial(_load_model, model_cfg), served_name, engine_cfg)


def _load_model(model_cfg: ModelSection) -> tuple[Any, Any]:
    """``(tokenizer, model)`` of the ``model`` section (runs on the engine's scheduler thread)."""
    tokenizer, model = model_loading.initialize(device=model_cfg.device, model_id=model_cfg.id)
    mark_engine_owned(model)  # only the engine runs it: its runner keeps one copy of the weights
    _note_python_api_only_options(model_cfg.optimizations.model_dump(), model.device)
    return tokenizer, model


def _note_python_api_only_options(optimizations: Mapping[str, Any], device: Any) -> None:
    """Say at start which model_config options the server's batching engine does not use.

    ``initialize`` has already accepted these values, so resolving them again cannot fail.
    """
    compiled = model_loading.resolve_compile(optimizations.get("compile"), device)
    attention = model_loading.resolve_attention(optimizations.get("attn_implementation"), device)
    if compiled or attention == "flash_attention_2":
        logger.info("optimizations.compile / attn_implementation apply to model.generate (the Python API); "
                    "the server's batching engine runs its own forward for Llama-family models")
