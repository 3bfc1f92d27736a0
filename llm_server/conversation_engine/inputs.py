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
#: The roles a conversation-history turn may have (the one definition; the HTTP API uses it too).
HISTORY_ROLES: tuple[str, ...] = ("user", "assistant", "system")


class UnknownRoleError(ValueError):
    """``role`` names no configured system prompt."""

    def __init__(self, role: str, known: Sequence[str]) -> None:
        self.role = role
        self.known = tuple(known)
        super().__init__(f"unknown role {role!r}; system prompts exist for: {', '.join(self.known) or 'none'}")


class HistoryError(ValueError):
    """A malformed conversation-history turn.

    ``index`` is the turn's position, ``field`` the offending key (``"role"``, ``"content"``)
    or None when the turn itself is wrong, ``problem`` what is wrong with it (callers with
    their own field names, like the HTTP API, build their message from these).
    """

    def __init__(self, index: int, field: str | None, problem: str) -> None:
        self.index = index
        self.field = field
        self.problem = problem
        where = f"conversation_history[{index}]" + (f".{field}" if field else "")
        super().__init__(f"{where} {problem}")


class ChatTemplateError(ValueError):
    """The tokenizer's chat template refused the messages (e.g. roles that do not alternate)."""


def system_prompt_for(system_prompt: SystemPrompt, role: str = DEFAULT_ROLE) -> str | None:
    """The system text for ``role``: a plain string is used for every role.

    Raises :class:`UnknownRoleError` (a ValueError) naming the known roles when a mapping has
    no entry for ``role``.
    """
    if system_prompt is None or isinstance(system_prompt, str):
        return system_prompt
    if role not in system_prompt:
        raise UnknownRoleError(role, sorted(system_prompt))
    return system_prompt[role]


def _checked_turn(index: int, turn: Any) -> Message:
    if not isinstance(turn, Mapping):
        raise HistoryError(index, None, "must be a dict with 'role' and 'content'")
    for key in ("role", "content"):
        if key not in turn:
            raise HistoryError(index, key, "is missing (each turn needs 'role' and 'content')")
    role, content = turn["role"], turn["content"]
    if role not in HISTORY_ROLES:
        raise HistoryError(index, "role", f"must be one of {', '.join(HISTORY_ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise HistoryError(index, "content", "must be a string")
    return {"role": role, "content": content}


def validate_history(conversation_history: Sequence[Mapping[str, Any]] | None) -> list[Message]:
    """Copy of the history as ``{"role", "content"}`` dicts; :class:`HistoryError` on a malformed turn."""
    return [_checked_turn(index, turn) for index, turn in enumerate(conversation_history or [])]


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


def has_chat_template(tok: Any) -> bool:
    """Whether ``tok`` brings a chat template (base models often do not)."""
    return bool(getattr(tok, "chat_template", None))


def render_chat(tok: Any, messages: Sequence[Message]) -> str:
    """Prompt text with the tokenizer's chat template and the generation prompt appended.

    Tokenizers without a chat template get a plain "Role: text" transcript. A template that
    refuses the messages raises :class:`ChatTemplateError` (a ValueError).
    """
    if has_chat_template(tok):
        try:
            return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja's raise_exception (e.g. roles must alternate), bad roles...
            raise ChatTemplateError(f"the model's chat template rejected these messages: {exc}") from exc
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*lines, "Assistant:"])


def tokenize_chat(tok: Any, messages: Sequence[Message], **tokenizer_kwargs: Any) -> Any:
    """The tokenizer's encoding of :func:`render_chat`'s text (the one chat -> tokens path).

    The template already writes every special token it needs, so the text is tokenized with
    ``add_special_tokens=False`` (no second BOS). Without a template the tokenizer's own
    special tokens are added. ``tokenizer_kwargs`` go to the tokenizer (``return_tensors``...).
    """
    return tok(render_chat(tok, messages), add_special_tokens=not has_chat_template(tok), **tokenizer_kwargs)


def chat_token_ids(tok: Any, messages: Sequence[Message]) -> list[int]:
    """Prompt token ids of a chat turn (generation prompt included), as a plain list."""
    return list(tokenize_chat(tok, messages)["input_ids"])


def encode_messages(tok: Any, model: Any, messages: Sequence[Message]) -> dict[str, Any]:
    """``input_ids`` and ``attention_mask`` (batch of one) on the model's device (see :func:`tokenize_chat`)."""
    encoded = tokenize_chat(tok, messages, return_tensors="pt")
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
