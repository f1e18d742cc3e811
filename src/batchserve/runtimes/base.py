"""The interfaces between a model's users (apps, the generation engine) and what runs it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Generator

import numpy as np

if TYPE_CHECKING:
    import torch


class EncoderRuntime(ABC):
    """A sentence encoder: texts → one float32 vector each, as the model defines them
    (pooled and, for models that say so, normalized).

    ``encode`` runs its texts as one forward pass (padded to the longest): how a batch is
    split into passes is the batcher's business (see :mod:`batchserve.batching`).
    Texts longer than :attr:`max_length` tokens are truncated, as sentence-transformers does.
    """

    #: short name of the runtime ("torch", "onnx")
    name: str = ""

    def __init__(self, path: str, device: str = "cpu", threads: int | None = None):
        self.path = path
        self.device = device
        self.threads = threads

    @abstractmethod
    def load(self) -> None:
        """Load the model (called once, in the process that will run it)."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Tokens per text, special tokens included; longer texts are truncated."""

    @abstractmethod
    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text after truncation, special tokens included."""

    @abstractmethod
    def encode(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), dimensions]`` float32, in the order of ``texts``."""

    def describe(self) -> dict[str, Any]:
        """Facts for ``/readyz``: runtime, device, precision..."""
        return {"runtime": self.name, "device": self.device}


class CausalLM(ABC):
    """A causal language model over *sequences* whose KV cache the runtime owns.

    The generation engine schedules (who joins, who leaves, sampling, stop strings,
    deadlines); a ``CausalLM`` executes.  Sequences are named by small integer ids the
    engine chooses (below its ``max_rows``, reused once released); the runtime keeps each
    sequence's tokens, positions and KV cache.  Every call runs in the engine's thread, one
    at a time.

    The step protocol, as the engine drives it:

    * :meth:`prefill` new sequences from their prompts (one pass for all of them) → the
      logits of each prompt's last token;
    * :meth:`fork` a prefilled sequence into ``n - 1`` more (its KV cache copied: the
      alternatives of one request share the prefill);
    * :meth:`decode` one token for every live sequence → the logits after it;
    * :meth:`release` sequences that finished or were cancelled; :meth:`clear` drops all.

    Logits are ``torch.Tensor`` ``[rows, vocabulary]`` (any float dtype, any device; a
    runtime without torch wraps its buffer with ``torch.from_numpy``), row ``i`` for
    ``seq_ids[i]``.  Scoring (:meth:`score`, :meth:`next_logits`) is other work on the same
    model, between two steps.
    """

    #: short name of the runtime ("torch", "llama.cpp")
    name: str = ""
    #: whether the running rows are padded to a common length (then prompts of similar lengths
    #: decode together with less padding: a batch job sorts its lines by length)
    pads_rows: bool = True
    #: the served model's name (``/v1/models``, responses)
    model_name: str = "model"
    #: facts about how the model was loaded, for ``/readyz`` (path, seconds...)
    load_info: dict[str, Any] = {}
    #: KV-cache tokens the running sequences may hold in all (None: as many as memory allows);
    #: a runtime that allocates its cache up front says how big it is, and the engine admits no more
    max_kv_tokens: int | None = None

    @classmethod
    @abstractmethod
    def load(
        cls,
        path: str | None = None,
        cache_dir: str | None = None,
        device: str = "cpu",
        max_sequences: int = 32,
        threads: int | None = None,
        prefix_cache_tokens: int = 0,
    ) -> "CausalLM":
        """The runtime with ``path`` loaded (None: the bundled model).

        ``max_sequences``: the most sequences live at once (the engine's ``max_rows``; a
        runtime that sizes its KV cache up front, llama.cpp's ``n_seq_max``, uses it);
        ``threads``: CPU threads for the passes (None: the runtime's default);
        ``prefix_cache_tokens``: the budget of a runtime that keeps released sequences for
        later prompts beginning with their tokens (0: keep none; ignored by a runtime
        without a prefix cache).
        """

    # ---------------------------------------------------------------- the model's facts

    @property
    @abstractmethod
    def max_positions(self) -> int:
        """The context size: prompt + generated tokens of one sequence."""

    @property
    @abstractmethod
    def stop_tokens(self) -> set[int]:
        """End-of-sequence token ids."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """A Hugging Face style tokenizer: ``decode(ids, skip_special_tokens=...)`` (the
        incremental detokenizer), ``apply_chat_template`` and ``chat_template`` (chat)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ---------------------------------------------------------------- sequences

    @abstractmethod
    def prefill(self, seq_ids: list[int], prompts: list[list[int]]) -> "torch.Tensor":
        """Start sequences ``seq_ids`` (not live yet) with ``prompts``; the logits after
        each prompt's last token.  On failure no sequence was started."""

    @abstractmethod
    def fork(self, seq_id: int, new_ids: list[int]) -> None:
        """Start each of ``new_ids`` as a copy of live sequence ``seq_id`` (tokens and KV cache)."""

    @abstractmethod
    def decode(self, seq_ids: list[int], tokens: list[int]) -> "torch.Tensor":
        """Append ``tokens[i]`` to sequence ``seq_ids[i]``; the logits after each.

        ``seq_ids`` names every live sequence, each once (the engine decodes its whole
        running batch at every step); their order is the order of the logits' rows.
        """

    @abstractmethod
    def release(self, seq_ids: list[int]) -> None:
        """Forget these sequences; their KV cache is free for others."""

    @abstractmethod
    def clear(self) -> None:
        """Forget every sequence (after a failed step, or when the engine idles)."""

    @property
    @abstractmethod
    def live(self) -> list[int]:
        """Ids of the sequences started and not released."""

    # ---------------------------------------------------------------- scoring

    def score(self, sequences: list[list[int]], deadline: float | None = None) -> list[float]:
        """:meth:`score_passes` run to its end: the scores."""
        passes = self.score_passes(sequences, deadline)
        while True:
            try:
                next(passes)
            except StopIteration as done:
                return done.value

    @abstractmethod
    def score_passes(self, sequences: list[list[int]], deadline: float | None = None) -> Generator[None, None, list[float]]:
        """A generator that yields after each pass and returns the scores: the sum of
        ``log p(token | tokens before it)`` over each sequence (its first token is given).
        Sequences that begin alike (see :func:`prefix_groups`) run their shared
        first tokens once, whatever their order; several texts' candidates may come in
        one call.  Past ``deadline`` (``time.monotonic()``) no further pass runs: raises
        :class:`~batchserve.errors.DeadlineExceededError`.  Memory bounded whatever the
        number and length of the sequences.  The live sequences are left as they are (a
        runtime with sequence slots scores on slots of its own, from ``max_sequences`` up).
        Between two passes other calls may run (a decode step, :meth:`next_logits`), never
        another scoring; closing the generator frees what it holds."""

    @abstractmethod
    def next_logits(self, ids: list[int]) -> "torch.Tensor":
        """``[vocabulary]`` logits of the token after ``ids`` (no sequence is started)."""

    def describe(self) -> dict[str, Any]:
        """Facts for ``/readyz``: runtime, device, precision..."""
        return {"runtime": self.name}

    def prefix_cache_stats(self) -> dict[str, int] | None:
        """The prefix cache's counters (``hits``, ``misses``, ``reused_tokens``, ``evictions``)
        and contents (``entries``, ``tokens``, ``budget_tokens``); None: the runtime has none."""
        return None


def prefix_groups(sequences: list[list[int]], min_shared: int) -> list[tuple[int, list[int]]]:
    """``sequences``' indices in groups that run their first ``shared`` tokens once:
    ``[(shared, indices), ...]``, every index in exactly one group.

    In sorted order, neighbours share their first tokens; a run of sequences is one group
    (sharing what all of them share) or is cut at its weakest link (where neighbours share
    least) into two, whichever runs fewer tokens in all; a link under ``min_shared`` tokens
    is always cut.  Candidate fills of one text form one group (their text before the mask),
    those of another text another, and a sequence alone shares all of itself.
    """
    order = sorted(range(len(sequences)), key=lambda index: sequences[index])
    links = [_common_length(sequences[a], sequences[b]) for a, b in zip(order, order[1:])]
    lengths = [len(sequences[index]) for index in order]
    best: dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]] = {}  # (lo, hi) -> tokens run, groups
    stack = [(0, len(order), False)] if order else []
    while stack:  # runs order[lo:hi], children before parents
        lo, hi, children_done = stack.pop()
        if hi - lo == 1:
            best[lo, hi] = (lengths[lo], [(lengths[lo], lo, hi)])
            continue
        weakest = min(links[lo : hi - 1])
        cut = lo + links[lo : hi - 1].index(weakest) + 1
        if not children_done:
            stack += [(lo, hi, True), (lo, cut, False), (cut, hi, False)]
            continue
        left, right = best.pop((lo, cut)), best.pop((cut, hi))
        split = (left[0] + right[0], left[1] + right[1])
        whole = sum(lengths[lo:hi]) - (hi - lo - 1) * weakest
        best[lo, hi] = split if weakest < min_shared or split[0] <= whole else (whole, [(weakest, lo, hi)])
    groups = best[0, len(order)][1] if order else []
    return [(shared, order[lo:hi]) for shared, lo, hi in groups]


def _common_length(first: list[int], second: list[int]) -> int:
    """How many first tokens ``first`` and ``second`` share."""
    for position in range(min(len(first), len(second))):
        if first[position] != second[position]:
            return position
    return min(len(first), len(second))
