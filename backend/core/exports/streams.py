"""Writers that hand their bytes over as they go, so a large export streams to the browser (or a
file) chunk by chunk instead of being built whole in memory first."""
from __future__ import annotations

import io
from typing import Any


class ChunkSink(io.RawIOBase):
    """A write-only file whose bytes are taken out with drain(): the target of zipfile and pyarrow's
    Parquet writer. It says where it is (tell) but cannot seek, so zipfile writes data descriptors."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._written += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._written

    def drain(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as typed: text starting =, +, -, @, tab or CR would run as a
    formula, so it gets a leading apostrophe (OWASP's CSV-injection advice, as the labels CSV does)."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value
