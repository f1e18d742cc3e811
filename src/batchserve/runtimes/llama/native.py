"""llama.cpp's C API, through llama-cpp-python's low-level bindings, as the llama runtime uses it.

Three small pieces, each hiding one piece of ctypes:

* :func:`route_logs` sends llama.cpp's log lines (stderr by default) to the Python logger
  ``batchserve.llama`` at debug level, and keeps the last warnings and errors so that a
  failed call can say why (:func:`recent_errors`);
* :class:`Batch` is a ``llama_batch`` whose arrays are numpy arrays this process owns
  (filled with slice assignments, never left uninitialized, freed with the object);
* :class:`Context` is one model's context: ``decode`` raises :class:`LlamaDecodeError`
  (or :class:`KVCacheFullError`) instead of returning a code, ``logits`` copies the
  output rows (the next decode overwrites llama.cpp's buffer), and the memory calls
  (``seq_cp`` / ``seq_rm``) name sequence slots.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading

import numpy as np

try:
    import llama_cpp as lib
except ImportError as error:
    raise ImportError(f"the llama.cpp runtime needs llama-cpp-python (make installs it): {error}") from error

log = logging.getLogger("batchserve.llama")

_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_CONTINUE = 5  # GGML_LOG_LEVEL_CONT: the text goes on the previous line

_recent: collections.deque[str] = collections.deque(maxlen=8)
_state = {"callback": None, "level": logging.DEBUG, "line": ""}
_init_lock = threading.Lock()


#: tokens of one graph run.  From 64 query tokens up llama.cpp's CPU flash attention is tiled,
#: and rounds differently from its per-token kernel: under 64, a prompt's logits do not
#: depend on how it is cut into passes (a prefix-cache hit gives the cold run's logits), for
#: about 17% more prefill CPU time (480 tokens: 3.88 s against 3.31 s on one core)
UBATCH_TOKENS = 63


class LlamaError(RuntimeError):
    """llama.cpp refused or failed a call."""


class LlamaDecodeError(LlamaError):
    """``llama_decode`` failed; the message carries its code and llama.cpp's last error lines."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class KVCacheFullError(LlamaDecodeError):
    """No room in the KV cache for the batch (code 1; llama.cpp left its memory as it was)."""


def _on_log(level: int, text: bytes, user_data) -> None:
    piece = text.decode("utf-8", "replace") if text else ""
    if level != _CONTINUE:
        _state["level"] = _LEVELS.get(level, logging.DEBUG)
    _state["line"] += piece
    if not _state["line"].endswith("\n"):
        return
    line, _state["line"] = _state["line"].rstrip(), ""
    if _state["level"] >= logging.WARNING:
        _recent.append(line)
    log.debug("%s", line)


def route_logs() -> None:
    """Send llama.cpp's logging to the ``batchserve.llama`` logger (debug), once per process,
    and initialise its backends.  Nothing is written to stderr by llama.cpp afterwards."""
    with _init_lock:
        if _state["callback"] is not None:
            return
        callback = lib.llama_log_callback(_on_log)  # kept alive by _state: llama.cpp holds only the pointer
        _state["callback"] = callback
        lib.llama_log_set(callback, ctypes.c_void_p(0))
        lib.llama_backend_init()


def recent_errors() -> str:
    """llama.cpp's last warning and error lines, ``; ``-joined (empty if none)."""
    return "; ".join(_recent)


class Model:
    """A GGUF file loaded by llama.cpp (CPU, memory-mapped)."""

    def __init__(self, path: str):
        route_logs()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_mmap = True
        _recent.clear()
        self.pointer = lib.llama_model_load_from_file(path.encode(), params)
        if not self.pointer:
            raise LlamaError(f"llama.cpp could not load {path}: {recent_errors() or 'no reason given'}")
        self.vocab = lib.llama_model_get_vocab(self.pointer)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.pointer)
        self.eos = lib.llama_vocab_eos(self.vocab)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's own tokenization (special tokens parsed), to check a tokenizer against."""
        data = text.encode()
        buffer = (lib.llama_token * (len(data) + 8))()
        count = lib.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), add_special, True)
        if count < 0:
            raise LlamaError(f"llama_tokenize needs {-count} tokens")
        return list(buffer[:count])

    def description(self) -> str:
        buffer = ctypes.create_string_buffer(256)
        lib.llama_model_desc(self.pointer, buffer, len(buffer))
        return buffer.value.decode("utf-8", "replace")

    def close(self) -> None:
        if self.pointer:
            lib.llama_model_free(self.pointer)
            self.pointer = None


class Batch:
    """Up to ``capacity`` tokens for one ``llama_decode``, each in one sequence."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.positions = np.zeros(capacity, dtype=np.int32)
        self.seq_counts = np.ones(capacity, dtype=np.int32)
        self.seq_ids = np.zeros((capacity, 1), dtype=np.int32)
        self.outputs = np.zeros(capacity, dtype=np.int8)
        row = ctypes.POINTER(lib.llama_seq_id)
        base = self.seq_ids.ctypes.data
        step = self.seq_ids.strides[0]
        self._rows = (row * capacity)(*(ctypes.cast(base + i * step, row) for i in range(capacity)))
        self.struct = lib.llama_batch(
            n_tokens=0,
            token=self.tokens.ctypes.data_as(ctypes.POINTER(lib.llama_token)),
            embd=ctypes.POINTER(ctypes.c_float)(),
            pos=self.positions.ctypes.data_as(ctypes.POINTER(lib.llama_pos)),
            n_seq_id=self.seq_counts.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._rows,
            logits=self.outputs.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def fill(self, tokens, positions, seq_ids, outputs) -> int:
        """Set the batch to these tokens (array-likes of one length); returns how many."""
        count = len(tokens)
        if count > self.capacity:
            raise ValueError(f"{count} tokens exceed the batch's {self.capacity}")
        self.tokens[:count] = tokens
        self.positions[:count] = positions
        self.seq_ids[:count, 0] = seq_ids
        self.outputs[:count] = outputs
        self.struct.n_tokens = count
        return count


class Context:
    """A llama.cpp context over ``model``: one KV cache shared by ``n_seq_max`` sequence slots."""

    def __init__(self, model: Model, n_ctx: int, n_seq_max: int, n_batch: int, threads: int):
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, UBATCH_TOKENS)
        params.n_seq_max = n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads
        # one KV buffer for every sequence: a part of a sequence can be copied into another
        # (the prefix cache); with separate buffers llama.cpp aborts the process on that
        params.kv_unified = True
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        _recent.clear()
        self.pointer = lib.llama_init_from_model(model.pointer, params)
        if not self.pointer:
            raise LlamaError(f"llama.cpp could not create a context of {n_ctx} tokens: {recent_errors() or 'no reason given'}")
        self.model = model
        self.n_ctx = lib.llama_n_ctx(self.pointer)
        self.n_seq_max = lib.llama_n_seq_max(self.pointer)
        self.n_batch = lib.llama_n_batch(self.pointer)
        self.memory = lib.llama_get_memory(self.pointer)
        self.batch = Batch(self.n_batch)

    def decode(self, tokens, positions, seq_ids, outputs) -> int:
        """Run one batch (at most ``n_batch`` tokens); returns the number of output rows."""
        count = self.batch.fill(tokens, positions, seq_ids, outputs)
        if count == 0:
            return 0
        _recent.clear()
        code = lib.llama_decode(self.pointer, self.batch.struct)
        if code == 1:
            raise KVCacheFullError(f"the KV cache ({self.n_ctx} tokens) has no room for {count} more", code)
        if code != 0:
            reason = recent_errors() or "no reason given"
            raise LlamaDecodeError(f"llama_decode failed (code {code}) on {count} tokens: {reason}", code)
        return int(self.batch.outputs[:count].sum())

    def logits(self, rows: int) -> np.ndarray:
        """A copy of the last decode's ``rows`` output rows, ``[rows, vocabulary]`` float32."""
        pointer = lib.llama_get_logits(self.pointer)
        if rows == 0:
            return np.zeros((0, self.model.n_vocab), dtype=np.float32)
        if not pointer:
            raise LlamaError("llama.cpp returned no logits")
        return np.ctypeslib.as_array(pointer, shape=(rows, self.model.n_vocab)).copy()

    def seq_cp(self, source: int, target: int, start: int = -1, end: int = -1) -> None:
        """Positions ``[start, end)`` of ``source`` (-1: open) also belong to ``target`` (no data copied)."""
        lib.llama_memory_seq_cp(self.memory, source, target, start, end)

    def seq_rm(self, seq: int, start: int = -1, end: int = -1) -> None:
        if not lib.llama_memory_seq_rm(self.memory, seq, start, end):
            raise LlamaError(f"llama.cpp refused to remove positions {start}..{end} of sequence {seq}")

    def seq_length(self, seq: int) -> int:
        """Positions held for ``seq`` (its highest position + 1; 0 when it holds none)."""
        return lib.llama_memory_seq_pos_max(self.memory, seq) + 1

    def clear(self) -> None:
        lib.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        if self.pointer:
            lib.llama_free(self.pointer)
            self.pointer = None
