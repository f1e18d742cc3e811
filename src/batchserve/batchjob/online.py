"""OpenAI's Batch API inside a server: the batches of a :class:`~batchserve.batchjob.store.Store`
run one after another by the same job as ``run-batch`` (:class:`~batchserve.batchjob.runner.Job`),
through the server's own app in this process.

A batch goes ``validating`` (the input file read once: custom_ids given twice, lines whose url is
not the batch's endpoint, more lines than the limit: each fails the batch, with its errors) →
``in_progress`` (the job; its counts saved every second) → ``finalizing`` → ``completed``, its
results registered as files.  A cancel stops taking lines, lets those in flight finish and ends
``cancelled``; a batch past its completion window ends ``expired``; both keep what was done as
result files, as OpenAI does.

Its requests are the job's: marked as this process's own (no API key asked, the key was checked
when the batch was created) and as offline work, which the batchers serve after online requests.
A server that stops lets what is in flight finish within its grace and leaves the batch
``in_progress``: the next start runs the rest (the job skips every custom_id in its results),
so nothing is lost and nothing runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from batchserve.batchjob.lines import Done, custom_id_of, input_lines, read_done, scan_input
from batchserve.batchjob.progress import Counts, Progress
from batchserve.batchjob.runner import INTERNAL_SCOPE, Job, JobOptions, LocalApp
from batchserve.batchjob.store import ENDED, Store

log = logging.getLogger("batchserve.batches")

#: how often a running batch saves its counts and looks for a cancel, seconds
CHECK_EVERY = 0.5
#: errors a failed validation names at most
SHOWN_ERRORS = 20


class BatchQueue:
    """Runs a store's batches in this process, one at a time, in the order they were created."""

    def __init__(
        self,
        store: Store,
        app: Any,
        *,
        in_flight: int,
        deadline: float,
        ready: Callable[[], Awaitable[bool]],
        window: int = 1024,
        max_body_bytes: int | None = None,
    ):
        self.store = store
        self.local = LocalApp(app, scope={INTERNAL_SCOPE: True}, max_body_bytes=max_body_bytes)
        self.in_flight = in_flight
        self.deadline = deadline
        self.ready = ready
        self.window = window
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.job: Job | None = None
        self.closing = False

    def start(self) -> None:
        self.task = asyncio.create_task(self._run_forever())

    def submit(self, batch_id: str) -> None:
        self.queue.put_nowait(batch_id)

    async def close(self, grace: float) -> None:
        """Stop: the running batch's requests in flight get ``grace`` seconds; it stays
        ``in_progress`` for the next start."""
        self.closing = True
        job = self.job
        if self.task is None:
            return
        if job is not None:  # the job ends once what it has in flight is answered; then the loop ends
            job.stop("the server stops")
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.task), grace)
        self.task.cancel()  # idle (waiting for a batch) or past the grace: nothing to wait for
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def cancel_waiting(self, batch_id: str) -> None:
        """A batch that no process runs yet ends ``cancelled`` now; one that runs sees its cancel
        file within :data:`CHECK_EVERY` seconds."""
        with self.store.running(batch_id) as mine:
            batch = self.store.batch(batch_id) if mine else None
            if batch is not None and batch["status"] not in ENDED:
                self._end(batch, "cancelled")

    async def _run_forever(self) -> None:
        if not await self.ready():
            return  # the models did not start: nothing can run (the server says why)
        for batch in reversed(self.store.batches()):  # oldest first: those a stopped server left
            if batch["status"] not in ENDED:
                self.queue.put_nowait(batch["id"])
        while not self.closing:
            batch_id = await self.queue.get()
            try:
                await self.run(batch_id)
            except Exception:  # a bug, or the disk: this batch stays as it was, the next ones run
                log.exception("batch %s stopped unfinished", batch_id)

    async def run(self, batch_id: str) -> None:
        """Run one batch to its end (or to this server's stop), unless another process runs it."""
        with self.store.running(batch_id) as mine:
            if not mine:
                return
            batch = self.store.batch(batch_id)
            if batch is None or batch["status"] in ENDED:
                return
            if batch["status"] == "cancelling":
                self._end(batch, "cancelled")
                return
            if time.time() >= batch["expires_at"]:
                self._end(batch, "expired")
                return
            if batch["status"] == "validating" and not self._validate(batch):
                return
            stopped = await self._run_job(batch)
            if stopped is not None:
                self._end(batch, stopped)

    # ------------------------------------------------------------------ steps

    def _validate(self, batch: dict[str, Any]) -> bool:
        """Read the input once; fail the batch (False) when it cannot run as a whole."""
        path = self.store.file_path(batch["input_file_id"])
        errors: list[dict[str, Any]] = []
        lines = 0
        if path is None or not path.exists():
            errors.append({"code": "missing_input_file", "message": f"the input file {batch['input_file_id']} was deleted",
                           "param": "input_file_id", "line": None})
        else:
            scan = scan_input(path, Done())
            lines = scan.lines
            for custom_id, numbers in list(scan.duplicates.items())[:SHOWN_ERRORS]:
                errors.append({"code": "duplicate_custom_id", "param": "custom_id", "line": numbers[1],
                               "message": f"custom_id {custom_id!r} is given on lines {', '.join(map(str, numbers))}"})
            errors.extend(_endpoint_errors(path, batch["endpoint"], SHOWN_ERRORS - len(errors)))
            if lines > self.store.limits.max_lines:
                errors.append({"code": "too_many_lines", "param": None, "line": None,
                               "message": f"{lines} requests; a batch holds at most {self.store.limits.max_lines}"})
            if lines == 0:
                errors.append({"code": "empty_file", "param": None, "line": None, "message": "the input file holds no request"})
        if errors:
            batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": errors})
            batch["request_counts"]["total"] = lines
            self.store.save_batch(batch)
            return False
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        batch["request_counts"]["total"] = lines
        self.store.save_batch(batch)
        return True

    async def _run_job(self, batch: dict[str, Any]) -> str | None:
        """The job; None when it ran every line, else how the batch ends (``cancelled``,
        ``expired``) or stops (the server's stop: left ``in_progress``)."""
        results = self.store.results_dir(batch["id"])
        path = self.store.file_path(batch["input_file_id"])
        assert path is not None  # validated: a file in use by a batch not ended cannot be deleted
        options = JobOptions(
            input=path, output=results / "output.jsonl", errors=results / "errors.jsonl",
            window=self.window, in_flight=self.in_flight, quiet=True,
        )
        done_ok, done_failed = Done(), Done()
        read_done(options.output, done_ok)
        read_done(options.errors, done_failed)
        done = Done(ids=done_ok.ids | done_failed.ids, lines=done_ok.lines | done_failed.lines)
        counts = Counts(total=max(0, batch["request_counts"]["total"] - len(done)), before=len(done))
        before = (len(done_ok), len(done_failed))
        job = Job(self.local, options, counts, Progress(counts, quiet=True), deadline=self.deadline)
        self.job = job
        watching = asyncio.create_task(self._watch(batch, job, counts, before))
        try:
            await job.run(input_lines(path), done)
        finally:
            self.job = None
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        self._save_counts(batch, counts, before)
        if job.stopping is None:
            self._end(batch, "completed")
            return None
        if job.stopping in ("cancelled", "expired"):
            return job.stopping
        log.warning("batch %s: stopped with the server after %d of %d requests; the next start runs the rest",
                    batch["id"], counts.done + counts.before, batch["request_counts"]["total"])
        return None

    async def _watch(self, batch: dict[str, Any], job: Job, counts: Counts, before: tuple[int, int]) -> None:
        cancel = self.store.cancel_path(batch["id"])
        while True:
            await asyncio.sleep(CHECK_EVERY)
            self._save_counts(batch, counts, before)
            if job.stopping is None and cancel.exists():
                batch.update(status="cancelling", cancelling_at=int(cancel.stat().st_mtime))
                job.stop("cancelled")
            elif job.stopping is None and time.time() >= batch["expires_at"]:
                job.stop("expired")

    def _save_counts(self, batch: dict[str, Any], counts: Counts, before: tuple[int, int]) -> None:
        batch["request_counts"].update(completed=before[0] + counts.answered, failed=before[1] + counts.errors)
        self.store.save_batch(batch)

    def _end(self, batch: dict[str, Any], status: str) -> None:
        """The batch ends ``status``; its results (any line written) become files."""
        now = int(time.time())
        if status == "completed":
            batch.update(status="finalizing", finalizing_at=now)
            self.store.save_batch(batch)
        results = self.store.batches_dir / batch["id"]
        for name, field in (("output.jsonl", "output_file_id"), ("errors.jsonl", "error_file_id")):
            path = results / name
            if batch[field] is None and path.exists() and path.stat().st_size:
                batch[field] = self.store.add_result(path, f"{batch['id']}_{name}")["id"]
        batch.update(status=status, **{f"{status}_at": int(time.time())})
        self.store.save_batch(batch)
        self.store.cancel_path(batch["id"]).unlink(missing_ok=True)
        log.info("batch %s %s: %s", batch["id"], status, batch["request_counts"])


def _endpoint_errors(path: Path, endpoint: str, most: int) -> list[dict[str, Any]]:
    """A line per request whose url is not the batch's endpoint (at most ``most``)."""
    errors: list[dict[str, Any]] = []
    if most <= 0:
        return errors
    for number, raw in input_lines(path):
        if custom_id_of(raw) is None:
            continue  # not a request: the job writes its error line
        url = orjson.loads(raw).get("url")
        if url != endpoint:
            errors.append({"code": "mismatched_endpoint", "param": "url", "line": number,
                           "message": f"line {number}: url {url!r} is not the batch's endpoint {endpoint}"})
            if len(errors) >= most:
                break
    return errors
