"""Streaming NDJSON → `Row` parsing with per-line errors.

Uploads can be large, so the parser holds at most one line (bounded by ``max_line_bytes``) and
never raises: every bad line becomes a `RowError` tagged with its 1-based line number, letting the
API report all problems at once (or stop after N) without buffering the body.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

from .rows import Row, RowError, parse_row

_BOM = b"\xef\xbb\xbf"
DEFAULT_MAX_LINE_BYTES = 1 << 20

ParsedLine = tuple[int, Row | RowError]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_line(line: bytes) -> Row | RowError:
    """Decode one complete line (without its terminator) into a Row or a RowError."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RowError("line", f"invalid UTF-8 at byte {exc.start}")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return RowError("line", f"invalid JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return RowError("line", "invalid JSON: nested too deeply")
    except ValueError as exc:  # NaN/Infinity, integers over the interpreter's digit limit
        return RowError("line", f"invalid JSON: {exc}")
    if not isinstance(obj, dict):
        kind = "array" if isinstance(obj, list) else type(obj).__name__
        return RowError("line", f"expected a JSON object, got {kind}")
    try:
        return parse_row(obj)
    except RowError as exc:
        return exc
    except RecursionError:
        return RowError("line", "row nested too deeply")


class LineSplitter:
    """Incremental splitter: feed byte chunks, get complete numbered lines.

    Splitting on the ``\\n`` byte is safe for UTF-8 (it never occurs inside a multi-byte sequence),
    so chunk boundaries inside characters need no special care: lines are decoded whole.
    """

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be >= 1, got {max_line_bytes}")
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._overflow = False
        self._lineno = 0

    def _finish(self) -> ParsedLine | None:
        self._lineno += 1
        line = bytes(self._buf)
        overflow = self._overflow
        self._buf.clear()
        self._overflow = False
        if self._lineno == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if line.endswith(b"\r"):
            line = line[:-1]
        if overflow or len(line) > self.max_line_bytes:
            return self._lineno, RowError("line", f"line longer than {self.max_line_bytes} bytes")
        if not line.strip(b" \t\r\f\v"):
            return None  # blank lines are allowed (and still counted)
        return self._lineno, parse_line(line)

    def _append(self, piece: memoryview) -> None:
        if self._overflow:
            return
        # +1 for a possible "\r" before "\n", +3 for a BOM on line 1: both are stripped before the check.
        slack = 1 + (len(_BOM) if self._lineno == 0 else 0)
        if len(self._buf) + len(piece) > self.max_line_bytes + slack:
            self._overflow = True
            self._buf.clear()
        else:
            self._buf += piece

    def feed(self, chunk: bytes | bytearray | memoryview) -> Iterator[ParsedLine]:
        data = chunk if isinstance(chunk, bytes) else bytes(chunk)
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                self._append(memoryview(data)[start:])
                return
            self._append(memoryview(data)[start:nl])
            start = nl + 1
            item = self._finish()
            if item is not None:
                yield item

    def close(self) -> Iterator[ParsedLine]:
        """Flush a last line that had no trailing newline."""
        if self._buf or self._overflow:
            item = self._finish()
            if item is not None:
                yield item


def dump_ndjson(rows: Iterable[Row]) -> Iterator[bytes]:
    """Canonical NDJSON lines (``Row.to_json``) for writing a snapshot; `iter_ndjson` reads them back."""
    for row in rows:
        yield json.dumps(row.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def iter_ndjson(
    chunks: Iterable[bytes], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[ParsedLine]:
    """Yield ``(line_number, Row | RowError)`` for each non-blank line of an NDJSON byte stream."""
    splitter = LineSplitter(max_line_bytes)
    for chunk in chunks:
        yield from splitter.feed(chunk)
    yield from splitter.close()


async def aiter_ndjson(
    chunks: AsyncIterable[bytes], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> AsyncIterator[ParsedLine]:
    """Async twin of `iter_ndjson` for request bodies streamed by the web layer."""
    splitter = LineSplitter(max_line_bytes)
    async for chunk in chunks:
        for item in splitter.feed(chunk):
            yield item
    for item in splitter.close():
        yield item
