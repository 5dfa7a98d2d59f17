"""Where a rendered chat text's response begins and ends: what the pages grey and mark, and the
workers' analysis reads. Torch-free; workers/chat.py renders the texts."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatMarkers:
    """What opens and closes the assistant's turn in a template's rendering: how the response of
    any rendered text is found again (a corpus text, or one a user types on a text page)."""
    assistant_header: str
    end_of_turn: str

    def response_span(self, text: str) -> tuple[int, int] | None:
        """Character offsets of the last assistant turn's content; None when the text has none."""
        start = text.rfind(self.assistant_header)
        if start < 0:
            return None
        start += len(self.assistant_header)
        end = text.find(self.end_of_turn, start) if self.end_of_turn else -1
        return start, end if end >= 0 else len(text)


MARKER_KEYS = ("chat_assistant_header", "chat_end_of_turn")


def markers_info(markers: ChatMarkers | None) -> dict:
    """The run_info entries a run's later jobs find the response by (none: every token is read)."""
    return {} if markers is None else dict(zip(MARKER_KEYS, (markers.assistant_header, markers.end_of_turn)))


def markers_from_info(info: dict) -> ChatMarkers | None:
    return ChatMarkers(info[MARKER_KEYS[0]], info.get(MARKER_KEYS[1], "")) if info.get(MARKER_KEYS[0]) else None


def role_parts(text: str, markers: ChatMarkers | None) -> list[dict] | None:
    """A rendered chat text cut where the response begins and ends: [{part, text}] with part
    'prompt' (the template and every earlier turn), 'response' (what the analysis reads) and
    'end' (the template after it); None when the run reads every token or the text has no response."""
    span = None if markers is None else markers.response_span(text)
    if span is None:
        return None
    start, end = span
    parts = [("prompt", text[:start]), ("response", text[start:end]), ("end", text[end:])]
    return [{"part": part, "text": piece} for part, piece in parts if piece]
