"""The spec's Python examples, run on the real embedded SmolLM2 (integration; small token budgets)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_server.conversation_engine.conversation_engine import ConversationEngine
from llm_server.conversation_engine.improvement import RESULT_KEYS, STAGE_HEADINGS
from llm_server.conversation_engine.inputs import prepare_inputs
from llm_server.conversation_engine.outputs import stream_generate
from llm_server.helper_functionality.yaml_loading import load_system_prompt
from tests.conftest import write_model_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent

# "Using the Conversation Engine Directly", verbatim from the spec.
SPEC_SNIPPET = """
from llm_server.conversation_engine.conversation_engine import ConversationEngine
from llm_server.helper_functionality.model_loading import initialize
from llm_server.helper_functionality.yaml_loading import (
    load_model_config, 
    load_system_prompt
)

# Load configuration and model
config = load_model_config()
system_prompt = load_system_prompt()
tokenizer, model = initialize(
    device=config.get("device", "auto"),
    model_id=config.get("id")
)

# Create conversation engine
engine = ConversationEngine(
    tok=tokenizer,
    model=model,
    system_prompt=system_prompt,
    improvement=True,
    intermediate_steps=True
)

# Generate streaming response
for chunk in engine.stream_reply("How do neural networks learn?"):
    print(chunk, end="", flush=True)

# Access final result
print(f"Final reply: {engine.last_result.get('revision2', 'No revision')}")

"""  # noqa: W291 - verbatim, the spec's trailing space included


@pytest.fixture
def spec_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Config folder: the shipped files with 16 new tokens per pass (greedy, repetition penalty kept)."""
    folder = write_model_config(tmp_path / "config", max_new_tokens=16, do_sample=False)
    monkeypatch.setenv("LLM_SERVER_CONFIG_DIR", str(folder))
    return folder


def test_spec_engine_snippet_runs_as_pasted(spec_config: Path) -> None:
    env = {**os.environ, "LLM_SERVER_CONFIG_DIR": str(spec_config), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SPEC_SNIPPET)],
        capture_output=True, text=True, timeout=900, cwd=REPO, env=env,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    final_line = next(line for line in out.splitlines() if line.startswith("Final reply: "))
    final = final_line.removeprefix("Final reply: ").strip()
    assert final and final not in ("None", "No revision")
    for heading in STAGE_HEADINGS:
        assert out.count(heading) == 1, heading  # every improvement stage is shown


def test_simple_and_multi_turn_conversation(embedded: tuple[Any, Any], spec_config: Path) -> None:
    tokenizer, model = embedded
    engine = ConversationEngine(tokenizer, model, load_system_prompt())
    streamed = "".join(engine.stream_reply("Hello, how are you today?"))
    assert streamed.strip() and engine.last_result["reply"] == streamed.strip()
    engine.conversation_history = [
        {"role": "user", "content": "My name is Alice"},
        {"role": "assistant", "content": "Nice to meet you, Alice! How can I help you today?"},
    ]
    for _ in engine.stream_reply("What's my name?"):
        pass
    assert len(engine.conversation_history) == 4
    assert engine.conversation_history[-1]["content"] == engine.last_result["reply"]


def test_answer_improvement_mode(embedded: tuple[Any, Any], spec_config: Path) -> None:
    tokenizer, model = embedded
    engine = ConversationEngine(tokenizer, model, load_system_prompt()).set_improvement(True)
    streamed = "".join(engine.stream_reply("Explain quantum computing"))
    result = engine.last_result
    assert set(result) == set(RESULT_KEYS)
    assert result["draft_answer"] and result["revision2"] and result["revision2"] != "None"
    assert streamed == result["reply"] == result["revision2"]


def test_custom_input_preparation_and_streaming(embedded: tuple[Any, Any], spec_config: Path) -> None:
    tokenizer, model = embedded
    system_prompt = load_system_prompt()
    history = [
        {"role": "user", "content": "Explain recursion"},
        {"role": "assistant", "content": "Recursion is when a function calls itself..."},
    ]
    inputs = prepare_inputs(tokenizer, model, system_prompt, "Can you give an example?", conversation_history=history)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[-1] > inputs["input_ids"].shape[-1]
    inputs = prepare_inputs(tokenizer, model, system_prompt, "Write a poem")
    chunks = [c for c in stream_generate(inputs, tokenizer, model, max_new_tokens=12) if c is not None]
    assert "".join(chunks).strip()
