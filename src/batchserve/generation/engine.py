"""Continuous (iteration-level) batching for a causal LM, in a thread of its own.

Every loop iteration of the engine thread:

1. drops the rows of cancelled or expired requests;
2. admits waiting requests while the row and token bounds allow (online requests first:
   offline ones, submitted inside :func:`batchserve.priority.offline`, only while no online
   request waits), has the runtime prefill
   their prompts in one pass and fork each prompt's sequence ``n - 1`` times (the
   alternatives share the prefill), samples their first tokens;
3. has the runtime decode one token for every running row, samples each row with its own
   parameters, streams the new text (each row's :class:`~batchserve.generation.text.ChoiceText`:
   detokenizing, stop strings, finish reasons) and releases the sequences of finished rows.

The engine schedules; a :class:`~batchserve.runtimes.base.CausalLM` executes (its KV
cache, positions and passes are the runtime's business).

When nothing is left to run, the engine gives the heap its tensors freed back to the
system (see :func:`batchserve.procinfo.release_free_heap`).

The event loop only enqueues requests and reads events; it never waits on the model.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from batchserve.errors import DeadlineExceededError, InputError, OverloadedError
from batchserve.generation.constraint import CompiledConstraint, Constraints
from batchserve.generation.request import GenerationRequest, error_for
from batchserve.generation.sampling import (
    MAX_TOP_LOGPROBS,
    SamplingParams,
    adjust_logits,
    row_generator,
    sample,
    token_logprobs,
)
from batchserve.generation.text import ChoiceText
from batchserve.priority import is_offline
from batchserve.procinfo import release_free_heap
from batchserve.runtimes.base import CausalLM

log = logging.getLogger("batchserve.generation")

#: seconds between two returns of freed heap memory to the system (when the engine idles)
RELEASE_EVERY = 1.0
#: seconds of queued calls run between two decode steps (at least one call)
CALLS_SECONDS = 0.05


@dataclass
class EngineLimits:
    max_rows: int = 32  # rows decoding together; more requests wait for a free row
    max_prefill_tokens: int = 4096  # prompt tokens prefilled in one step (a longer prompt goes alone)
    max_waiting_rows: int = 1024  # rows waiting past which a submit gets 503
    max_kv_tokens: int = 262_144  # prompt + max_tokens over all running and waiting rows; past it, 503


@dataclass
class Row:
    """One sequence of the running batch: a choice of a request."""

    request: GenerationRequest
    choice: int
    seq_id: int  # the runtime's sequence
    generator: torch.Generator
    text: ChoiceText  # its tokens, their text, and whether and why it finished
    length: int  # tokens of this sequence so far (prompt + generated)
    matcher: Any = None  # a constrained row's own matcher (llguidance), told each token drawn

    @property
    def last_token(self) -> int:
        return self.text.tokens[-1]

    @property
    def finished(self) -> bool:
        return self.text.finish_reason is not None


class GenerationEngine:
    """Drives a causal-LM runtime; requests join and leave its running batch at every decode step."""

    def __init__(self, lm: CausalLM, limits: EngineLimits | None = None, name: str | None = None):
        self.lm = lm
        self.limits = limits or EngineLimits()
        self.name = name or lm.model_name
        self.max_positions = lm.max_positions
        self.stop_tokens = lm.stop_tokens
        #: compiles requests' constraints for this model's vocabulary (see :meth:`submit`)
        self.constraints = Constraints(lm.tokenizer, lm.stop_tokens)

        self._waiting: collections.deque[GenerationRequest] = collections.deque()  # online requests, oldest first
        self._waiting_offline: collections.deque[GenerationRequest] = collections.deque()  # priority.offline()'s
        self._calls: collections.deque[tuple] = collections.deque()  # (function, future) to run between steps
        self._jobs: collections.deque[tuple] = collections.deque()  # (generator, future): a call run a step at a time
        self._wakeup = threading.Condition()
        self._rows: list[Row] = []
        self._free_seqs: list[int] = []  # sequence ids released, reused smallest first
        self._next_seq = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.tokens_generated = 0
        self.first_tokens = 0  # requests given their first tokens, and the seconds they waited for them
        self.first_token_seconds = 0.0
        self._released_at = -RELEASE_EVERY
        self._heap_dirty = False  # steps ran since the heap was last given back

    # ------------------------------------------------------------------ public, any thread

    @property
    def tokenizer(self):
        """The runtime's tokenizer (chat templates, token counts)."""
        return self.lm.tokenizer

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"generation-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def active_rows(self) -> int:
        return len(self._rows)

    @property
    def waiting_requests(self) -> int:
        """Requests waiting for rows, online and offline."""
        return len(self._waiting) + len(self._waiting_offline)

    @property
    def waiting_offline_requests(self) -> int:
        """Of :attr:`waiting_requests`, the offline ones."""
        return len(self._waiting_offline)

    def describe(self) -> dict:
        return {
            "model": self.name,
            "runtime": self.lm.name,
            "active_rows": self.active_rows,
            "waiting_requests": self.waiting_requests,
            "waiting_offline_requests": self.waiting_offline_requests,
            "steps": self.steps,
            "tokens_generated": self.tokens_generated,
            "first_tokens": self.first_tokens,
            "first_token_seconds": self.first_token_seconds,
            "max_rows": self.limits.max_rows,
            "idle": self._idle() and not self._heap_dirty,  # nothing to run, freed memory given back
        }

    def encode(self, text: str) -> list[int]:
        return self.lm.encode(text)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        n: int = 1,
        timeout: float = 30.0,
        streamed: bool = True,
        constraint: CompiledConstraint | None = None,
    ) -> GenerationRequest:
        """Queue a request (call from the event loop); iterate its events or await ``result()``
        (``streamed=False``: a caller that only awaits the result gets one event per choice).
        ``constraint`` (from ``self.constraints.compile``): each choice's tokens are kept to it.

        Inside :func:`batchserve.priority.offline` the request is offline: it gets rows only
        while no online request waits, and it is admitted only while the rows waiting in both
        lanes leave room (an online request counts the online ones only: an offline backlog
        never makes it a 503).  Running rows are not preempted."""
        self._check(prompt_ids, params, n)
        if constraint is not None and params.ignore_eos:
            raise InputError("ignore_eos cannot be used with a constraint (a complete value ends with end-of-sequence)")
        request = GenerationRequest(
            prompt_ids=list(prompt_ids),
            params=params,
            n=n,
            deadline=time.monotonic() + timeout,
            loop=asyncio.get_running_loop(),
            streamed=streamed,
            constraint=constraint,
            offline=is_offline(),
        )
        lanes = (self._waiting, self._waiting_offline) if request.offline else (self._waiting,)
        with self._wakeup:
            waiting_rows = sum(r.n for lane in lanes for r in lane if not r.cancelled)
            if waiting_rows + n > self.limits.max_waiting_rows:
                raise OverloadedError(f"{waiting_rows} generation rows already waiting")
            if self._kv_tokens_in_flight(lanes) + request.kv_tokens > self.limits.max_kv_tokens:
                raise OverloadedError("too many tokens in flight for the generation engine")
            lanes[-1].append(request)
            self._wakeup.notify()
        return request

    async def call(self, function, *args):
        """Run ``function(lm, *args)`` (``lm``: the runtime) in the engine thread between two steps.

        For other uses of the same model (scoring, say): they never run concurrently with
        a decode step, so the model keeps one user and its cores.  A function that returns
        a generator is a *job*: the engine runs it a step at a time, one ``next()`` between
        two decode steps (the running batch goes on while a long job runs), jobs one after
        another, and the call's result is what the generator returns.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wakeup:
            self._calls.append((lambda: function(self.lm, *args), future))
            self._wakeup.notify()
        return await asyncio.wrap_future(future)

    def _run_calls(self) -> None:
        """Queued calls, oldest first, until :data:`CALLS_SECONDS` have passed (at least one):
        many calls queued at once (a burst of infill requests) take turns with decode steps."""
        started = time.monotonic()
        while self._calls and (time.monotonic() - started < CALLS_SECONDS or not self._rows):
            function, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = function()
            except Exception as error:
                future.set_exception(_released(error))
                continue
            if inspect.isgenerator(result):
                self._jobs.append((result, future))
            else:
                future.set_result(result)

    def _advance_job(self) -> None:
        """One step of the oldest job."""
        if not self._jobs:
            return
        job, future = self._jobs[0]
        try:
            next(job)
        except StopIteration as done:
            self._jobs.popleft()
            future.set_result(done.value)
        except Exception as error:
            self._jobs.popleft()
            future.set_exception(_released(error))

    def _check(self, prompt_ids: list[int], params: SamplingParams, n: int) -> None:
        if not prompt_ids:
            raise InputError("the prompt must not be empty")
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
            raise InputError(f"logprobs takes 0 to {MAX_TOP_LOGPROBS} top log-probabilities")
        if params.logit_bias:
            vocabulary = len(self.tokenizer)
            wrong = [token for token, _ in params.logit_bias if not 0 <= token < vocabulary]
            if wrong:
                raise InputError(f"logit_bias: {wrong[0]} is not a token id of this model (0 to {vocabulary - 1})", param="logit_bias")
        if n > self.limits.max_rows:
            raise InputError(f"n must be at most {self.limits.max_rows} on this server")
        if len(prompt_ids) + params.max_tokens > self.max_positions:
            raise InputError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                f"exceeds the model's context of {self.max_positions} tokens"
            )
        needed = n * (len(prompt_ids) + params.max_tokens)
        if needed > self.limits.max_kv_tokens:
            raise InputError(f"the request needs {needed} KV-cache tokens; the server allows {self.limits.max_kv_tokens}")

    def _kv_tokens_in_flight(self, lanes: tuple[collections.deque[GenerationRequest], ...]) -> int:
        """KV-cache tokens the running requests and those waiting in ``lanes`` may take: rows of a
        cancelled or expired request are going (dropped before the next admission), so they do not count."""
        now = time.monotonic()
        running = sum(
            len(row.request.prompt_ids) + row.request.params.max_tokens
            for row in list(self._rows)
            if not (row.request.cancelled or row.request.expired(now))
        )
        return running + sum(r.kv_tokens for lane in lanes for r in lane if not (r.cancelled or r.expired(now)))

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wakeup:
                while not self._stopping and self._idle() and not self._release_due():
                    self._wakeup.wait(self._until_release())
                if self._stopping:
                    break
                idle = self._idle()
            if idle:  # nothing to run and the heap holds what the last steps freed
                self._release_memory()
                continue
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as error:  # a failed step fails the requests in it, the engine goes on
                log.exception("generation step failed")
                self._fail_everything(_released(error))
            self._heap_dirty = True
        self._fail_everything(RuntimeError("the generation engine stopped"))

    def _idle(self) -> bool:
        return not self._waiting and not self._waiting_offline and not self._rows and not self._calls and not self._jobs

    # Giving freed memory back: once the engine idles after work, at most once a second.

    def _until_release(self) -> float | None:
        """Seconds to wait before the release is due; None: nothing to release."""
        if not self._heap_dirty:
            return None
        return max(0.0, RELEASE_EVERY - (time.monotonic() - self._released_at))

    def _release_due(self) -> bool:
        return self._until_release() == 0.0

    def _release_memory(self) -> None:
        self.lm.clear()
        release_free_heap()
        self._released_at = time.monotonic()
        self._heap_dirty = False

    def _step(self) -> None:
        self._run_calls()
        self._advance_job()
        self._drop_gone_rows()
        newcomers = self._admit()
        if newcomers:
            self._prefill(newcomers)
        if self._rows:
            self._decode()
        self.steps += 1

    def _admit(self) -> list[GenerationRequest]:
        """Waiting requests that fit in the free rows and this step's prefill budget, FIFO: the
        online ones, then (when no online request is left waiting) the offline ones."""
        admitted, rows, prefill_tokens, now = [], len(self._rows), 0, time.monotonic()
        with self._wakeup:
            for lane in (self._waiting, self._waiting_offline):
                while lane:
                    request = lane[0]
                    if request.cancelled or request.expired(now):
                        lane.popleft()
                        if not request.cancelled:
                            request.emit(DeadlineExceededError("deadline passed while waiting for a generation row"))
                        continue
                    fits_rows = rows + request.n <= self.limits.max_rows
                    fits_prefill = not admitted or prefill_tokens + len(request.prompt_ids) <= self.limits.max_prefill_tokens
                    if not (fits_rows and fits_prefill):
                        return admitted  # an online request that must wait keeps the offline ones waiting too
                    lane.popleft()
                    request.admitted_step = self.steps
                    admitted.append(request)
                    rows += request.n
                    prefill_tokens += len(request.prompt_ids)
        return admitted

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        """One prefill pass over the new prompts, then n rows per prompt (forks of its sequence)."""
        seqs = [[self._take_seq() for _ in range(request.n)] for request in requests]
        started = False
        try:  # a failure here fails only the newcomers; the running batch goes on
            logits = self.lm.prefill([ids[0] for ids in seqs], [r.prompt_ids for r in requests])
            started = True
            for ids in seqs:
                if len(ids) > 1:
                    self.lm.fork(ids[0], ids[1:])
            repeat = [index for index, request in enumerate(requests) for _ in range(request.n)]
            rows = [
                Row(
                    request=request,
                    choice=choice,
                    seq_id=ids[choice],
                    generator=row_generator(request.params.seed, choice),
                    text=ChoiceText(choice, self.tokenizer, request.params, self.stop_tokens, request.streamed),
                    length=len(request.prompt_ids),
                    matcher=request.constraint.matcher() if request.constraint is not None else None,
                )
                for request, ids in zip(requests, seqs)
                for choice in range(request.n)
            ]
        except Exception as error:
            log.exception("prefill failed")
            if started:  # the prefill ran, a fork failed: release what did start
                live = set(self.lm.live)
                self.lm.release([seq for ids in seqs for seq in ids if seq in live])
            self._free_seqs.extend(seq for ids in seqs for seq in ids)
            failure = _released(error)
            for request in requests:
                request.emit(failure)
            return
        self._rows.extend(rows)
        self._advance(rows, logits[torch.tensor(repeat, device=logits.device)])
        now = time.monotonic()
        self.first_tokens += len(requests)
        self.first_token_seconds += sum(now - request.submitted for request in requests)
        self._retire_finished()

    def _take_seq(self) -> int:
        """A sequence id for the runtime: the smallest released one, else a new one."""
        if self._free_seqs:
            self._free_seqs.sort()
            return self._free_seqs.pop(0)
        self._next_seq += 1
        return self._next_seq - 1

    def _decode(self) -> None:
        """Feed every row's last token (the runtime knows each sequence's position); sample the next one."""
        rows = self._rows
        logits = self.lm.decode([row.seq_id for row in rows], [row.last_token for row in rows])
        self._advance(rows, logits)
        self._retire_finished()

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample one token per row, then stream what it adds to each choice's text."""
        logits = logits.float().cpu()  # once for sampling and log-probabilities
        constrained = [index for index, row in enumerate(rows) if row.matcher is not None]
        adjusted = [index for index, row in enumerate(rows) if row.request.params.adjusts]
        if constrained or adjusted:  # a copy: the runtime's buffer stays as it gave it
            logits = logits.clone()
        for index in adjusted:  # penalties and biases, then the constraint's mask
            adjust_logits(logits[index], rows[index].request.params, rows[index].text.tokens)
        if constrained:
            self.constraints.mask(logits.numpy(), constrained, [rows[index].matcher for index in constrained])
        tokens = sample(logits, [row.request.params for row in rows], [row.generator for row in rows])
        self.tokens_generated += len(tokens)
        asking = [index for index, row in enumerate(rows) if row.request.params.logprobs is not None]
        found = token_logprobs(
            logits, asking, [tokens[index] for index in asking], [rows[index].request.params.logprobs for index in asking]
        )
        logprobs: list = [None] * len(rows)
        for index, entry in zip(asking, found):
            logprobs[index] = entry
        for index in constrained:
            rows[index].matcher.consume_token(tokens[index])
        for row, token, logprob in zip(rows, tokens, logprobs):
            row.length += 1
            delta = row.text.add(token, logprob)
            if delta is not None:
                row.request.emit(delta)

    def _retire_finished(self) -> None:
        keep = [index for index, row in enumerate(self._rows) if not row.finished]
        self._keep_rows(keep)

    def _drop_gone_rows(self) -> None:
        now = time.monotonic()
        keep = []
        for index, row in enumerate(self._rows):
            request = row.request
            if request.expired(now) and not request.cancelled:
                request.emit(DeadlineExceededError("generation did not finish before the request's deadline"))
                request.cancel()
            if not request.cancelled:
                keep.append(index)
        self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        kept = set(keep)
        gone = [row.seq_id for index, row in enumerate(self._rows) if index not in kept]
        self._rows = [self._rows[index] for index in keep]
        self.lm.release(gone)
        self._free_seqs.extend(gone)

    def _fail_everything(self, error: BaseException) -> None:
        failed = {id(row.request): row.request for row in self._rows}
        with self._wakeup:
            failed.update({id(request): request for request in (*self._waiting, *self._waiting_offline)})
            self._waiting.clear()
            self._waiting_offline.clear()
        for request in failed.values():
            if not request.cancelled:
                request.emit(error_for(error))
                request.cancel()
        self._rows = []
        self.lm.clear()
        self._free_seqs, self._next_seq = [], 0
        while self._calls:
            _, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(error_for(error))
        while self._jobs:
            job, future = self._jobs.popleft()
            job.close()  # its finally clauses free what it held
            future.set_exception(error_for(error))


def _released(error: BaseException) -> BaseException:
    """What callers see for ``error``, with the locals of its traceback's frames cleared.

    Those frames hold the failed work's tensors, and through the engine's own frame (which
    holds the callers' futures) they form a cycle that only a full garbage collection frees:
    hundreds of MiB could stay held.  The traceback itself (lines, for the log) stays.
    """
    traceback.clear_frames(error.__traceback__)
    return error_for(error)
