"""JSON request bodies parsed so that one client's large body cannot stall the others.

A body under RA_MAX_BODY_BYTES (16 MiB) can hold ~800,000 numbers. Parsing it takes orjson
~0.1 s, the stdlib's json over 1 s, and neither lets go of the interpreter lock meanwhile: in a
thread it still holds the event loop, and every other request, for that long (measured: `GET /`
p95 from 15 ms to 200 ms with one such client, 390 ms with four; benchmarks/p13_large_bodies.py).

So a body over INLINE_BYTES is first read in a separate process, which says whether it is JSON
the API accepts and how many values it holds. No route takes more than a few thousand values
(4,096 feature ids, 256 typed texts), so a body of more than MAX_VALUES is refused there, and
only a body within it is parsed again here: a 12 MB body of typed texts is a few hundred values,
which orjson reads in ~10 ms. Smaller bodies are parsed inline (~1 ms).
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import orjson

INLINE_BYTES = 256 * 1024
MAX_VALUES = 100_000  # values (numbers, strings, ...) in one body; the largest real one holds ~4,400
READERS = 2  # processes reading large bodies, per server process

_pool: ProcessPoolExecutor | None = None


class BodyRefused(ValueError):
    """A JSON body the API does not accept; `kind` is the 422's error type."""

    def __init__(self, message: str, kind: str = "value_error"):
        super().__init__(message)
        self.kind = kind


NUL = "\x00"
NUL_MESSAGE = "holds a NUL character (\\u0000), which no text here may contain"


def _count(value: Any, limit: int) -> tuple[int, bool]:
    """(values in `value`, up to just past `limit`; whether a string in it holds a NUL)."""
    stack, n, nul = [value], 0, False
    while stack and n <= limit:
        item = stack.pop()
        n += 1
        if isinstance(item, str):
            nul = nul or NUL in item
        elif isinstance(item, dict):
            nul = nul or any(NUL in k for k in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return n, nul


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyRefused(f"the body is not JSON this API accepts ({exc}): send finite numbers (no NaN, Infinity "
                          "or numbers beyond a double) and strings of valid Unicode", "json_invalid") from None


def check(body: bytes) -> tuple[str, str] | None:
    """What is wrong with a body, as (message, kind), or None: JSON the API accepts (orjson
    refuses NaN, Infinity, numbers beyond a double and lone surrogates), no NUL, at most
    MAX_VALUES values. Run in a reader process for a large body."""
    try:
        value = _loads(body)
    except BodyRefused as exc:
        return str(exc), exc.kind
    n, nul = _count(value, MAX_VALUES)
    if n > MAX_VALUES:
        return f"the body holds more than {MAX_VALUES:,} values; no request here takes that many", "value_error"
    if nul:
        return f"the body {NUL_MESSAGE}", "value_error"
    return None


def parse(body: bytes) -> Any:
    """A body already found acceptable by size or by `check`: parsed, NULs refused."""
    value = _loads(body)
    if b"\\u0000" in body and _count(value, len(body))[1]:  # a NUL arrives only escaped: walk only then
        raise BodyRefused(f"the body {NUL_MESSAGE}")
    return value


def _exit_with_parent(parent: int) -> None:
    """A reader's initializer: it ends when the server process does, however that ended."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _readers() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:  # spawned, not forked: the server process has threads
        _pool = ProcessPoolExecutor(READERS, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_exit_with_parent, initargs=(os.getpid(),))
    return _pool


async def parse_body(body: bytes) -> Any:
    """The body's JSON value, or BodyRefused; the event loop is never held for a large body's parse."""
    global _pool
    if len(body) > INLINE_BYTES:
        try:
            problem = await asyncio.get_running_loop().run_in_executor(_readers(), check, body)
        except BrokenProcessPool:  # a reader died (e.g. out of memory): the next body starts new ones
            _pool = None
            raise BodyRefused("the body could not be read: send it again") from None
        if problem is not None:
            raise BodyRefused(*problem)
    return parse(body)
