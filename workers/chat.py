"""Chat-formatted texts: conversations rendered with the tokenizer's chat template, as the reward
model reads them, with where each message (and the response: the last assistant message) sits
in the rendered text.

A conversation is a list of {role, content} messages (TRL's conversational form), or a prompt and
a response (user turn + assistant turn). Everything here is torch-free: it needs a tokenizer (or
anything with `apply_chat_template` and `chat_template`) only.
"""
from __future__ import annotations

from dataclasses import dataclass

from backend.core.chat_roles import ChatMarkers
from backend.core.run_config import ConfigError

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


PROBE_USER, PROBE_ASSISTANT = "\u2063user\u2063", "\u2063assistant\u2063"


def chat_markers(tokenizer, template: str) -> ChatMarkers:
    """The assistant header (what the generation prompt adds after a user turn) and the end of
    turn (what follows an assistant message's content, up to its first line break)."""
    user = [{"role": "user", "content": PROBE_USER}]
    prompt = _render(tokenizer, user, template)
    header = _render(tokenizer, user, template, generation_prompt=True)[len(prompt):]
    full = _render(tokenizer, user + [{"role": "assistant", "content": PROBE_ASSISTANT}], template)
    after = full[full.index(PROBE_ASSISTANT) + len(PROBE_ASSISTANT):]
    end = after.strip().split("\n")[0] if after.strip() else ""
    if not header.strip():
        raise ConfigError("dataset.chat_template: the template's generation prompt is empty, so the response cannot "
                          "be told apart from the prompt (set analysis.tokens: all)")
    return ChatMarkers(header, end)


def chat_conversations(table, columns, key_prefix: str = "dataset") -> list[list[dict]] | None:
    """The rows of a pyarrow table as conversations when it has a messages column or prompt and
    response columns (`columns`: the DatasetConfig naming them); None when it has neither."""
    names = table.column_names
    if columns.messages_column in names:
        key = f"{key_prefix}.messages_column"
        return [check_messages(m, key, i) for i, m in enumerate(table.column(columns.messages_column).to_pylist())]
    if columns.prompt_column in names and columns.response_column in names:
        key = f"{key_prefix}.response_column"
        prompts = table.column(columns.prompt_column).to_pylist()
        responses = table.column(columns.response_column).to_pylist()
        return [prompt_response_messages(p, r, key, i) for i, (p, r) in enumerate(zip(prompts, responses))]
    return None


def render_conversations(tokenizer, conversations: list[list[dict]], chat_template: str | None
                         ) -> tuple[list[str], ChatMarkers]:
    """Each conversation as the text the model reads, and the markers its response is found by."""
    template = require_chat_template(tokenizer, "dataset.chat_template", chat_template)
    texts = [render_chat(tokenizer, messages, template).text for messages in conversations]
    return texts, chat_markers(tokenizer, template)


def is_conversation_list(texts: list) -> bool:
    return bool(texts) and isinstance(texts[0], list)


def prepare_chat_texts(texts: list, model_path: str, dataset, analysis) -> tuple[list[str], ChatMarkers | None]:
    """A dataset's texts as the model reads them: conversations rendered with the chat template
    (the tokenizer loaded alone, before any compute), plain texts as they are. Returns the markers
    the response is found by when analysis reads only the response (analysis.tokens, whose default
    is response for chat data), else None."""
    if not is_conversation_list(texts):
        if analysis.tokens == "response":
            raise ConfigError("analysis.tokens: 'response' needs chat data (a messages column, or prompt and response "
                              f"columns: dataset.messages_column, prompt_column, response_column); "
                              f"{dataset.source} has plain texts")
        return texts, None
    from transformers import AutoTokenizer  # lazy: transformers brings torch; plain texts and workers/datasets.py need neither

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rendered, markers = render_conversations(tokenizer, texts, dataset.chat_template)
    return rendered, markers if (analysis.tokens or "response") == "response" else None
