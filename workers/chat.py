"""Chat-formatted texts: conversations rendered with the tokenizer's chat template, as the reward
model reads them, with where each message (and the response: the last assistant message) sits
in the rendered text.

A conversation is a list of {role, content} messages (TRL's conversational form), or a prompt and
a response (user turn + assistant turn). Everything here is torch-free: it needs a tokenizer (or
anything with `apply_chat_template` and `chat_template`) only.
"""
from __future__ import annotations

from dataclasses import dataclass

from workers.config import ConfigError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class RoleSpan:
    role: str
    start: int  # character offsets of the message's content in the rendered text
    end: int


@dataclass(frozen=True)
class RenderedChat:
    text: str  # what the reward model reads
    roles: tuple[RoleSpan, ...]  # each message's content, in order

    @property
    def response(self) -> RoleSpan | None:
        """The last assistant message: what a reward model judges."""
        return next((span for span in reversed(self.roles) if span.role == "assistant"), None)


def require_chat_template(tokenizer, key: str, chat_template: str | None = None) -> str:
    """The template conversations are rendered with: `chat_template` (the config's own) or the
    tokenizer's; a tokenizer without one is refused before any compute, naming `key`."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(f"{key}: the data is chat-formatted but the model's tokenizer has no chat template (set "
                          "dataset.chat_template to a Jinja template, or give plain texts in a text column)")
    return template


def check_messages(messages, key: str, row: int) -> list[dict]:
    """A conversation as a list of {role, content} dicts with known roles and string contents."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{key}: row {row} is not a non-empty list of {{role, content}} messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConfigError(f"{key}: row {row}, message {i} is not a {{role, content}} mapping")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ConfigError(f"{key}: row {row}, message {i} has the unknown role {role!r} (roles: {', '.join(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise ConfigError(f"{key}: row {row}, message {i} ({role}) has no text content")
        out.append({"role": role, "content": content})
    return out


def prompt_response_messages(prompt, response, key: str, row: int) -> list[dict]:
    """A prompt / response row as a conversation; a prompt may itself be a message list."""
    if not isinstance(response, str) or not response.strip():
        raise ConfigError(f"{key}: row {row} has no response text")
    if isinstance(prompt, list):
        head = check_messages(prompt, key, row)
    elif isinstance(prompt, str) and prompt.strip():
        head = [{"role": "user", "content": prompt}]
    else:
        raise ConfigError(f"{key}: row {row} has no prompt text")
    return head + [{"role": "assistant", "content": response}]


def _render(tokenizer, messages: list[dict], template: str, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)


def render_chat(tokenizer, messages: list[dict], template: str) -> RenderedChat:
    """The conversation rendered as one text, with each message's content located in it: the
    content of message i is searched after the rendering of messages[:i] (templates may add a
    default system prompt, so positions are found, not computed)."""
    text = _render(tokenizer, messages, template)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if i:
            before = _render(tokenizer, messages[:i], template)
            if text.startswith(before):
                cursor = max(cursor, len(before))
        start = text.find(message["content"], cursor)
        if start < 0:  # a template that rewrites contents (strips them, say): locate the stripped form
            stripped = message["content"].strip()
            start = text.find(stripped, cursor)
            end = start + len(stripped)
        else:
            end = start + len(message["content"])
        if start < 0:
            raise ConfigError(f"dataset.chat_template: message {i} ({message['role']}) cannot be found in its "
                              "rendering: the template changes message contents")
        spans.append(RoleSpan(message["role"], start, end))
        cursor = end
    return RenderedChat(text, tuple(spans))
