"""Where OpenAI's Batch API keeps its files and batches: a directory, so that they survive a restart.

::

    DIR/files/file-ID.json          the file's object (what GET /v1/files/ID answers) and where its bytes are
    DIR/files/file-ID.jsonl         an uploaded file's bytes
    DIR/batches/batch_ID.json       the batch's object (status, counts, times, file ids)
    DIR/batches/batch_ID/           its results while it runs: output.jsonl, errors.jsonl (run-batch's files)
    DIR/batches/batch_ID.cancel     a cancel asked for (by any process), seen by the one running it
    DIR/batches/batch_ID.lock       held (flock) by the process running the batch

Every object is written whole (a temporary file renamed into place), so a process killed
mid-write leaves the previous version.  Several HTTP processes (gunicorn) share one directory:
reads go to the disk each time, a batch is run by the process holding its lock, and a cancel
is a file of its own, so no two processes write the same object.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

#: a batch that has ended: nothing runs it any more
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
#: how long a batch may take (OpenAI's one completion window)
COMPLETION_WINDOWS = {"24h": 24 * 3600}
#: the file object's fields a client sees (the stored object also says where its bytes are)
_PRIVATE = ("path",)


class StoreLimitError(ValueError):
    """A limit of the store was reached (``status``: the HTTP status it answers)."""

    def __init__(self, message: str, status: int = 400, code: str = "limit_reached"):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class StoreLimits:
    max_file_bytes: int = 100_000_000
    max_files: int = 1000
    max_lines: int = 50_000
    max_pending: int = 100


def _now() -> int:
    return int(time.time())


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """``value`` to ``path``, whole or not at all."""
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(orjson.dumps(value))
        os.replace(scratch, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


class Store:
    """The files and batches of one server (one directory, shared by its HTTP processes)."""

    def __init__(self, root: Path, limits: StoreLimits | None = None):
        self.root = root
        self.limits = limits or StoreLimits()
        self.files_dir = root / "files"
        self.batches_dir = root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ files

    def add_file(self, source: BinaryIO, filename: str, purpose: str) -> dict[str, Any]:
        """Copy an upload in (``source`` read to its end): its file object.  :class:`StoreLimitError`
        past the size or count limit (nothing is kept)."""
        if self.count_files(purpose="batch") >= self.limits.max_files:
            raise StoreLimitError(
                f"this server keeps at most {self.limits.max_files} uploaded files; delete some (DELETE /v1/files/ID)",
                code="file_limit_reached",
            )
        file_id = f"file-{secrets.token_hex(12)}"
        target = self.files_dir / f"{file_id}.jsonl"
        fd, scratch = tempfile.mkstemp(dir=self.files_dir, prefix=f".{file_id}-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as file:
                while chunk := source.read(1 << 20):
                    size += len(chunk)
                    if size > self.limits.max_file_bytes:
                        raise StoreLimitError(f"file larger than {self.limits.max_file_bytes} bytes", 413, "too_large")
                    file.write(chunk)
            os.replace(scratch, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch)
            raise
        return self._register(file_id, target, filename, purpose, size)

    def add_result(self, path: Path, filename: str) -> dict[str, Any]:
        """A batch's result file (kept where it is) as a file of purpose ``batch_output``; never
        refused, so no result is lost to a limit."""
        return self._register(f"file-{secrets.token_hex(12)}", path, filename, "batch_output", path.stat().st_size)

    def _register(self, file_id: str, path: Path, filename: str, purpose: str, size: int) -> dict[str, Any]:
        stored = {
            "id": file_id, "object": "file", "bytes": size, "created_at": _now(), "filename": filename,
            "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None,
            "path": str(path.relative_to(self.root)),
        }
        _write_json(self.files_dir / f"{file_id}.json", stored)
        return _public(stored)

    def file(self, file_id: str) -> dict[str, Any] | None:
        """The file object (None: no such file)."""
        stored = self._stored_file(file_id)
        return _public(stored) if stored is not None else None

    def file_path(self, file_id: str) -> Path | None:
        """Where the file's bytes are (None: no such file)."""
        stored = self._stored_file(file_id)
        return self.root / stored["path"] if stored is not None else None

    def _stored_file(self, file_id: str) -> dict[str, Any] | None:
        if not _is_id(file_id, "file-"):
            return None
        return _read_json(self.files_dir / f"{file_id}.json")

    def files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """Every file object, newest first."""
        found = (_read_json(path) for path in self.files_dir.glob("file-*.json"))
        kept = [_public(f) for f in found if f is not None and (purpose is None or f.get("purpose") == purpose)]
        return sorted(kept, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    def count_files(self, purpose: str | None = None) -> int:
        return len(self.files(purpose)) if purpose else sum(1 for _ in self.files_dir.glob("file-*.json"))

    def delete_file(self, file_id: str) -> bool:
        """Delete the file (False: there was none).  :class:`StoreLimitError` (409) while a batch
        not yet ended reads it."""
        stored = self._stored_file(file_id)
        if stored is None:
            return False
        using = [b["id"] for b in self.batches() if b["input_file_id"] == file_id and self.status(b) not in ENDED]
        if using:
            raise StoreLimitError(f"{file_id} is the input of {', '.join(using)}, not yet ended", 409, "file_in_use")
        (self.files_dir / f"{file_id}.json").unlink(missing_ok=True)
        if stored.get("purpose") != "batch_output":  # a result stays in its batch's directory
            (self.root / stored["path"]).unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------------ batches

    def add_batch(
        self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict[str, str] | None
    ) -> dict[str, Any]:
        """A new batch, ``validating``: its object.  :class:`StoreLimitError` (429) past the
        number of batches not yet ended."""
        pending = sum(1 for b in self.batches() if self.status(b) not in ENDED)
        if pending >= self.limits.max_pending:
            raise StoreLimitError(
                f"{pending} batches are not finished yet (the limit is {self.limits.max_pending}); try again later",
                429, "too_many_batches",
            )
        created = _now()
        batch = {
            "id": f"batch_{secrets.token_hex(12)}", "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": completion_window, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": created, "in_progress_at": None,
            "expires_at": created + COMPLETION_WINDOWS[completion_window], "finalizing_at": None, "completed_at": None,
            "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
        }
        self.save_batch(batch)
        return batch

    def save_batch(self, batch: dict[str, Any]) -> None:
        _write_json(self.batches_dir / f"{batch['id']}.json", batch)

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        """The batch's object as a client sees it (a cancel asked for shows as ``cancelling``)."""
        if not _is_id(batch_id, "batch_"):
            return None
        batch = _read_json(self.batches_dir / f"{batch_id}.json")
        if batch is None:
            return None
        cancel = self.cancel_path(batch_id)
        if batch["status"] not in ENDED and batch["status"] != "cancelling" and cancel.exists():
            batch["status"] = "cancelling"
            batch["cancelling_at"] = int(cancel.stat().st_mtime)
        return batch

    def batches(self) -> list[dict[str, Any]]:
        """Every batch, newest first."""
        found = (self.batch(path.stem) for path in self.batches_dir.glob("batch_*.json"))
        return sorted((b for b in found if b is not None), key=lambda b: (b["created_at"], b["id"]), reverse=True)

    def status(self, batch: dict[str, Any]) -> str:
        return str(batch["status"])

    def results_dir(self, batch_id: str) -> Path:
        path = self.batches_dir / batch_id
        path.mkdir(exist_ok=True)
        return path

    def cancel_path(self, batch_id: str) -> Path:
        return self.batches_dir / f"{batch_id}.cancel"

    @contextlib.contextmanager
    def running(self, batch_id: str) -> Iterator[bool]:
        """Hold the batch's lock while the block runs: yields False when another process holds it."""
        with open(self.batches_dir / f"{batch_id}.lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def remove_results(self, batch_id: str) -> None:
        shutil.rmtree(self.batches_dir / batch_id, ignore_errors=True)


def _public(stored: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in stored.items() if name not in _PRIVATE}


def _is_id(value: str, prefix: str) -> bool:
    """An id this store made: the prefix and hex digits only (never a path)."""
    rest = value[len(prefix):]
    return value.startswith(prefix) and len(rest) == 24 and all(c in "0123456789abcdef" for c in rest)
