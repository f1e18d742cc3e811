"""OpenAI's batch file format: the input lines a job runs, the lines it writes, and what an
earlier run of the same job already wrote.

An input line is ``{"custom_id": "...", "method": "POST", "url": "/v1/embeddings", "body":
{...}}``; ``url`` is one of :data:`URLS` or a user model's ``/models/NAME/predict``.  Each
answered line becomes ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}``: in the output file when the route answered 2xx, in the error file otherwise
(the route's own status and body, as OpenAI's error file has them).  A line that cannot be run
at all (not JSON, no custom_id, another method or url) goes to the error file with ``response:
null`` and ``error: {"code", "message", "line"}`` (its line number in the input, from 1).

Every written line ends with a newline and is flushed whole, so a job killed mid-write leaves
at most one partial last line: :func:`read_done` cuts it off, and its request runs again.
"""

from __future__ import annotations

import re
import secrets
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

#: the OpenAI routes a batch line may name (users' models: :data:`MODEL_URL`)
URLS = ("/v1/embeddings", "/v1/chat/completions", "/v1/completions")
MODEL_URL = re.compile(r"/models/[A-Za-z0-9_.-]+/predict")
ACCEPTED = ", ".join([*URLS, "/models/NAME/predict"])


@dataclass
class Request:
    """One input line to run."""

    line: int
    custom_id: str
    url: str
    body: bytes  # the line's body, as JSON

    @property
    def size(self) -> int:
        """What a job sorts its window by: the body's length (longer texts, longer prompts)."""
        return len(self.body)


class LineError(ValueError):
    """An input line that cannot be run: it becomes an error line (``code``, ``message``)."""

    def __init__(self, line: int, code: str, message: str, custom_id: str | None = None):
        super().__init__(f"line {line}: {message}")
        self.line, self.code, self.message, self.custom_id = line, code, message, custom_id


def parse_line(raw: bytes, line: int) -> Request:
    """The request on input line ``line`` (numbered from 1); :class:`LineError` saying why not."""
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise LineError(line, "invalid_json_line", f"not a JSON object: {error}") from None
    if not isinstance(entry, dict):
        raise LineError(line, "invalid_json_line", f"not a JSON object: a {type(entry).__name__}")
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError(line, "missing_custom_id", "custom_id must be a non-empty string")
    method, url, body = entry.get("method"), entry.get("url"), entry.get("body")
    if method != "POST":
        raise LineError(line, "invalid_method", f"method must be POST (got {_shown(method)})", custom_id)
    if not isinstance(url, str) or not (url in URLS or MODEL_URL.fullmatch(url)):
        raise LineError(line, "invalid_url", f"url must be one of {ACCEPTED} (got {_shown(url)})", custom_id)
    if not isinstance(body, dict):
        raise LineError(line, "invalid_body", f"body must be a JSON object (got {_shown(body)})", custom_id)
    if body.get("stream") is True:
        raise LineError(line, "invalid_body", "stream: true is not served in a batch job (each line gets one answer)", custom_id)
    return Request(line, custom_id, url, orjson.dumps(body))


def _shown(value: Any) -> str:
    text = orjson.dumps(value).decode() if value is not None else "nothing"
    return text if len(text) <= 60 else text[:57] + "..."


def answer_line(custom_id: str, status: int, body: bytes) -> bytes:
    """The line of a request a route answered: ``body`` is the route's JSON answer, as it sent it."""
    return b"".join((
        b'{"id":"batch_req_', secrets.token_hex(12).encode(), b'","custom_id":', orjson.dumps(custom_id),
        b',"response":{"status_code":', str(status).encode(), b',"request_id":"req_', secrets.token_hex(12).encode(),
        b'","body":', body, b'},"error":null}\n',
    ))


def error_line(error: LineError) -> bytes:
    """The line of an input line that could not be run."""
    return orjson.dumps({
        "id": f"batch_req_{secrets.token_hex(12)}",
        "custom_id": error.custom_id,
        "response": None,
        "error": {"code": error.code, "message": error.message, "line": error.line},
    }) + b"\n"


def json_body(body: bytes, content_type: str) -> bytes:
    """A route's answer as one line of JSON: as sent when it is (every route of batchserve
    answers JSON on one line), else as ``{"text": ...}``."""
    if content_type.startswith("application/json") and b"\n" not in body and body[:1] in (b"{", b"["):
        return body
    try:
        return orjson.dumps(orjson.loads(body))
    except orjson.JSONDecodeError:
        return orjson.dumps({"text": body.decode("utf-8", errors="replace")})


# --------------------------------------------------------------------------- reading files


def input_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The input's lines that are not blank, with their numbers (from 1), read as they are needed."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, 1):
            if raw.strip():
                yield number, raw


@dataclass
class Scan:
    """What a first pass over the input found: its lines, those still to run, custom_ids given twice."""

    lines: int = 0
    to_run: int = 0
    duplicates: dict[str, list[int]] = field(default_factory=dict)

    def duplicates_message(self, shown: int = 10) -> str:
        items = list(self.duplicates.items())
        named = "; ".join(f"{_shown(custom_id)} on lines {', '.join(map(str, lines))}" for custom_id, lines in items[:shown])
        more = f"; and {len(items) - shown} more" if len(items) > shown else ""
        return f"{len(items)} custom_id(s) given more than once: {named}{more}"


def scan_input(path: Path, done: Done) -> Scan:
    """Count the lines, those ``done`` does not hold, and find custom_ids given twice.

    Memory stays flat whatever the file's length: this pass keeps 8 bytes a line (a hash of
    each custom_id); only ids whose hash repeats are read again, as strings, to be named."""
    scan = Scan()
    hashes = array("q")
    for number, raw in input_lines(path):
        scan.lines += 1
        custom_id = custom_id_of(raw)
        if custom_id is None:
            scan.to_run += number not in done.lines
            continue
        scan.to_run += custom_id not in done.ids
        hashes.append(hash(custom_id))
    repeated = _repeated(hashes)
    if repeated:
        seen: dict[str, list[int]] = {}
        for number, raw in input_lines(path):
            custom_id = custom_id_of(raw)
            if custom_id is not None and hash(custom_id) in repeated:
                seen.setdefault(custom_id, []).append(number)
        scan.duplicates = {custom_id: lines for custom_id, lines in seen.items() if len(lines) > 1}
    return scan


def custom_id_of(raw: bytes) -> str | None:
    """The line's custom_id (None: not a JSON object with one)."""
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
    return custom_id if isinstance(custom_id, str) and custom_id else None


def _repeated(hashes: array) -> set[int]:
    """The values found more than once in ``hashes``."""
    try:
        import numpy as np
    except ImportError:  # the server extra alone: a counter (about 100 bytes a line, for this pass only)
        from collections import Counter

        return {value for value, count in Counter(hashes).items() if count > 1}
    values = np.sort(np.frombuffer(hashes, dtype=np.int64)) if hashes else np.zeros(0, dtype=np.int64)
    return set(values[1:][values[1:] == values[:-1]].tolist())


class OutputError(ValueError):
    """An output file that is not a batch job's output (a line in the middle is not one)."""


@dataclass
class Done:
    """What earlier runs wrote: the custom_ids answered or reported, and the input lines
    reported without one (a line that is not JSON has no custom_id)."""

    ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.ids) + len(self.lines)

    def has(self, custom_id: str | None, line: int) -> bool:
        return custom_id in self.ids if custom_id is not None else line in self.lines


def read_done(path: Path, done: Done) -> None:
    """Add what ``path`` (an output or error file; absent: nothing) holds to ``done``.  A last
    line cut short (the job was killed while writing it) is removed from the file."""
    if not path.exists():
        return
    kept = 0
    with open(path, "rb") as file:
        for number, raw in enumerate(file, 1):
            if not raw.endswith(b"\n"):
                break  # the last line, cut short
            try:
                entry = orjson.loads(raw)
            except orjson.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict) or "custom_id" not in entry:
                raise OutputError(f"{path} line {number} is not a batch output line; give -o a new file or this job's own")
            custom_id = entry["custom_id"]
            if isinstance(custom_id, str):
                done.ids.add(custom_id)
            elif isinstance(entry.get("error"), dict) and isinstance(entry["error"].get("line"), int):
                done.lines.add(entry["error"]["line"])
            kept += len(raw)
    if kept != path.stat().st_size:
        with open(path, "r+b") as file:
            file.truncate(kept)


def open_appending(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")
