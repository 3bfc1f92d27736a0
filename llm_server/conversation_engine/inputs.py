"""Input preparation: chat messages from system prompt + history + message, and model-ready tensors.

Also builds the reviser's prompt for the answer-improvement passes. Importing this module does
not import torch (the serving layer uses the message builders with the batching engine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Message = dict[str, str]
#: A system prompt: the spec's role -> text mapping, a single text, or None (no system message).
SystemPrompt = Mapping[str, str] | str | None

DEFAULT_ROLE = "assistant"
REVISER_ROLE = "reviser"
#: Used when the system prompts have no "reviser" entry.
FALLBACK_REVISER_PROMPT = (
    "You are an expert at taking the user's drafts and improving them: add relevant facts, "
    "correct errors, and structure the revised answer clearly."
)
_HISTORY_ROLES = ("user", "assistant", "system")


def system_prompt_for(system_prompt: SystemPrompt, role: str = DEFAULT_ROLE) -> str | None:
    """The system text for ``role``: a plain string is used for every role.

    Raises ValueError naming the known roles when a mapping has no entry for ``role``.
    """
    if system_prompt is None or isinstance(system_prompt, str):
        return system_prompt
    if role not in system_prompt:
        known = ", ".join(sorted(system_prompt)) or "none"
        raise ValueError(f"unknown role {role!r}; system prompts exist for: {known}")
    return system_prompt[role]


def validate_history(conversation_history: Sequence[Mapping[str, Any]] | None) -> list[Message]:
    """Copy of the history as ``{"role", "content"}`` dicts; ValueError on a malformed turn."""
    turns: list[Message] = []
    for index, turn in enumerate(conversation_history or []):
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise ValueError(f"conversation_history[{index}] must be a dict with 'role' and 'content'")
        role, content = turn["role"], turn["content"]
        if role not in _HISTORY_ROLES:
            raise ValueError(f"conversation_history[{index}].role must be one of {_HISTORY_ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"conversation_history[{index}].content must be a string")
        turns.append({"role": role, "content": content})
    return turns


def build_messages(
    system_prompt: SystemPrompt,
    message: str,
    role: str = DEFAULT_ROLE,
    conversation_history: Sequence[Mapping[str, Any]] | None = None,
) -> list[Message]:
    """System message (for ``role``) + history + the new user message."""
    messages: list[Message] = []
    system_text = system_prompt_for(system_prompt, role)
    if system_text:
        messages.append({"role": "system", "content": system_text})
    messages.extend(validate_history(conversation_history))
    messages.append({"role": "user", "content": message})
    return messages


def render_chat(tok: Any, messages: Sequence[Message]) -> str:
    """Prompt text with the tokenizer's chat template and the generation prompt appended.

    Tokenizers without a chat template get a plain "Role: text" transcript.
    """
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*lines, "Assistant:"])


def encode_messages(tok: Any, model: Any, messages: Sequence[Message]) -> dict[str, Any]:
    """``input_ids`` and ``attention_mask`` (batch of one) on the model's device.

    The template already writes every special token it needs, so the text is tokenized with
    ``add_special_tokens=False`` (no second BOS). Without a template the tokenizer's own
    special tokens are added.
    """
    has_template = bool(getattr(tok, "chat_template", None))
    encoded = tok(render_chat(tok, messages), return_tensors="pt", add_special_tokens=not has_template)
    device = getattr(model, "device", None)
    return {
        name: (encoded[name].to(device) if device is not None else encoded[name])
        for name in ("input_ids", "attention_mask")
    }


def prepare_inputs(
    tok: Any,
    model: Any,
    system_prompt: SystemPrompt,
    message: str,
    role: str = DEFAULT_ROLE,
    conversation_history: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """What ``model.generate(**inputs)`` takes for one chat turn (chat template applied once).

    ``system_prompt`` is the role -> text mapping from ``load_system_prompt()`` (``role`` picks
    the entry) or a plain string.
    """
    return encode_messages(tok, model, build_messages(system_prompt, message, role, conversation_history))


# --------------------------------------------------------------------------- review prompts

#: Section names the reviser is asked to write (and the improvement parser reads).
SUGGESTIONS_HEADING = "Suggestions:"
REVISED_ANSWER_HEADING = "Revised answer:"
COMMENTS_HEADING = "Comments:"


def build_review_prompt(question: str, draft: str) -> str:
    """The user message asking the reviser to review ``draft`` as an answer to ``question``."""
    return (
        f"Question:\n{question.strip()}\n\n"
        f"Draft answer:\n{draft.strip()}\n\n"
        "Review the draft answer. Write three sections, in this order:\n"
        f'1. "{SUGGESTIONS_HEADING}" followed by a numbered list of concrete improvements.\n'
        f'2. "{REVISED_ANSWER_HEADING}" followed by the complete improved answer.\n'
        f'3. "{COMMENTS_HEADING}" followed by one sentence on what changed.'
    )


def build_review_messages(
    system_prompt: SystemPrompt,
    question: str,
    draft: str,
    conversation_history: Sequence[Mapping[str, Any]] | None = None,
) -> list[Message]:
    """Reviser system prompt + the conversation so far + the review request."""
    if isinstance(system_prompt, Mapping):
        reviser = system_prompt.get(REVISER_ROLE) or FALLBACK_REVISER_PROMPT
    else:
        reviser = FALLBACK_REVISER_PROMPT
    return [
        {"role": "system", "content": reviser},
        *validate_history(conversation_history),
        {"role": "user", "content": build_review_prompt(question, draft)},
    ]
