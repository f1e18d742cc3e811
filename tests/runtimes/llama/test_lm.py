"""The llama.cpp causal-LM runtime on the bundled SmolLM2 GGUF (run as shipped), and its prefix cache.

Whatever joins, forks or leaves the KV cache, and whatever the prefix cache lends a prompt,
each sequence's logits are those of running it alone, to llama.cpp's numerical noise: its
CPU kernels differ with the batch (flash attention is tiled from 64 query tokens up) and
with where a sequence's cells lie, and the quantized matmuls magnify the rounding
(measured: logits up to 1.2 apart, probabilities up to 0.013, log-probabilities up to 0.2;
the fp32 torch model differs from either by as much).  So logits are compared as
probabilities, greedy tokens up to a near tie, and where the computation is the same (a
cached prefix against the same chunks run without the cache) exactly.
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make installs it): no llama.cpp runtime to test")

from batchserve.errors import DeadlineExceededError  # noqa: E402
from batchserve.runtimes import LANGUAGE_MODELS, CausalLM, language_model_class  # noqa: E402
from batchserve.runtimes.llama import lm as llama_lm  # noqa: E402
from batchserve.runtimes.llama.lm import LlamaCausalLM, context_tokens  # noqa: E402
from batchserve.runtimes.llama.native import Context, KVCacheFullError, LlamaDecodeError  # noqa: E402
from batchserve.runtimes.llama.prefix import PrefixCache  # noqa: E402
from tests.runtimes.causal_lm_contract import PROMPTS, prefill_fork_decode_each_alone, rows_join_and_leave  # noqa: E402

DOCUMENT = (
    "The lighthouse stood at the edge of the northern cliffs, where the sea was grey for most of the year. "
    "Its keeper, an old man named Tobias, had lived there alone for thirty years. Every evening he climbed "
    "the hundred and twelve steps to the lamp room, trimmed the wick, polished the great lens and watched "
    "the ships pass far out on the horizon. He kept a logbook of every vessel he saw: its name if he could "
    "read it, the direction it sailed, the weather and the state of the sea. One autumn morning, after a "
    "night of storms, he walked down to the small beach below the cliffs to gather driftwood for his stove. "
    "Among the seaweed and broken shells he found a green glass bottle, sealed with wax, and inside it a "
    "rolled sheet of paper tied with a faded red ribbon. He carried it home, set it on the kitchen table"
)


@pytest.fixture(scope="module")
def lm():
    """No prefix cache: the plain path, and the reference for "alone"."""
    runtime = LlamaCausalLM.load(max_sequences=8, threads=1, prefix_cache_tokens=0)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def cached():
    runtime = LlamaCausalLM.load(max_sequences=8, threads=1, prefix_cache_tokens=2048)
    yield runtime
    runtime.close()


@pytest.fixture(autouse=True)
def fresh(request):
    runtimes = [request.getfixturevalue(name) for name in ("lm", "cached") if name in request.fixturenames]
    for runtime in runtimes:
        runtime.clear()
    yield
    for runtime in runtimes:
        runtime.clear()


def alone(lm: LlamaCausalLM, ids: list[int]) -> torch.Tensor:
    return lm.next_logits(ids)


#: most any probability may move with the batch and the cells (measured 0.013); a wrong
#: cell or position moves them far more
PROBABILITY_TOLERANCE = 0.03
#: logits: top two closer than this are a tie the noise may break either way (shifts measured up to 0.2)
MARGIN = 1.0


def margin(row: torch.Tensor) -> float:
    top = row.topk(2).values
    return float(top[0] - top[1])


def check(lm, logits: torch.Tensor, sequences: list[list[int]]) -> None:
    assert logits.shape == (len(sequences), lm.n_vocab) and logits.dtype == torch.float32
    for row, ids in zip(logits, sequences):
        expected = alone(lm, ids)
        assert int(row.argmax()) == int(expected.argmax()) or margin(expected) < MARGIN
        gap = float((row.softmax(-1) - expected.softmax(-1)).abs().max())
        assert gap < PROBABILITY_TOLERANCE, gap


def greedy(lm, seq: int, prompt: list[int], count: int, margins: list[float] | None = None) -> list[int]:
    """``count`` greedy tokens after ``prompt`` (``margins``: each choice's top-two gap is appended)."""
    logits = lm.prefill([seq], [prompt])
    tokens = []
    for _ in range(count):
        tokens.append(int(logits[0].argmax()))
        if margins is not None:
            margins.append(margin(logits[0]))
        logits = lm.decode([seq], [tokens[-1]])
    lm.release([seq])
    return tokens


def assert_same_greedy(got: list[int], expected: list[int], margins: list[float]) -> int:
    """``got`` is ``expected`` up to a near tie of the reference (after it the texts may part);
    returns how many tokens were compared."""
    for index, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            assert margins[index] < MARGIN, f"token {index}: {a} != {b}, the reference's top two {margins[index]:.2f} apart"
            return index
    assert len(got) == len(expected)
    return len(got)


def whole_logprob(lm: LlamaCausalLM, ids: list[int]) -> float:
    """Sum of log p over a sequence from one pass with every position's logits (on a scratch slot)."""
    slot = lm.max_sequences
    rows = lm.context.decode(ids, list(range(len(ids))), [slot] * len(ids), [1] * len(ids))
    logits = torch.from_numpy(lm.context.logits(rows)).double()
    lm.context.seq_rm(slot)
    return float(logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).sum())


# ------------------------------------------------------------------------ the runtime


def test_registry_and_model_facts(lm):
    assert language_model_class("llama.cpp") is LlamaCausalLM and issubclass(LlamaCausalLM, CausalLM)
    assert set(LANGUAGE_MODELS) >= {"torch", "llama.cpp"}
    assert lm.name == "llama.cpp" and lm.model_name == "SmolLM2-135M-Instruct"
    assert lm.max_positions == 8192 and lm.stop_tokens == {lm.tokenizer.eos_token_id}
    facts = lm.describe()
    assert facts["runtime"] == "llama.cpp" and facts["precision"] == "Q4_1" and facts["threads"] == 1
    assert lm.load_info["path"].endswith(".gguf") and lm.load_info["context_tokens"] >= context_tokens(8, 8192, 0)[0]
    assert lm.prefix_cache_stats()["budget_tokens"] == 0
    assert lm.max_kv_tokens == 8192  # the cells the running sequences may take (the engine admits no more)


def test_the_tokenizer_gives_llama_cpps_ids(lm):
    texts = PROMPTS + [DOCUMENT, "Émile naïve café 日本語 🙂\t\ttabs\n\n\n  spaces", "<|im_start|>user\nHi<|im_end|>\n"]
    for text in texts:
        assert lm.encode(text) == lm.model.tokenize(text, add_special=True), text
    assert lm.detokenize(lm.encode("Hello world", add_special_tokens=False)) == "Hello world"


def test_prefill_fork_decode_equal_each_sequence_alone(lm):
    prefill_fork_decode_each_alone(lm, [lm.encode(p) for p in PROMPTS], check)


def test_forks_give_n_greedy_alternatives_equal_to_alone_runs(lm):
    prompt = lm.encode(PROMPTS[2])
    logits = lm.prefill([0], [prompt])
    firsts = logits[0].topk(3).indices.tolist()  # each alternative starts with another likely token
    lm.fork(0, [5, 6])
    seqs, generated = [0, 5, 6], {0: [firsts[0]], 5: [firsts[1]], 6: [firsts[2]]}
    for _ in range(5):
        logits = lm.decode(seqs, [generated[seq][-1] for seq in seqs])
        for seq, row in zip(seqs, logits):
            generated[seq].append(int(row.argmax()))
    lm.release(seqs)
    for seq, first in zip(seqs, firsts):
        margins: list[float] = []
        expected = greedy(lm, 1, prompt + [first], 5, margins)
        assert generated[seq][0] == first
        assert_same_greedy(generated[seq][1:], expected, margins)
    assert len({tuple(tokens) for tokens in generated.values()}) == 3


def test_rows_join_and_leave_between_steps_and_keep_their_logits(lm):
    rows_join_and_leave(lm, check)
    assert lm.context.seq_length(0) == 0  # the released sequence's cells are free


def test_refusals_leave_the_live_sequences_as_they_were(lm):
    prompts = [lm.encode(p) for p in PROMPTS]
    lm.prefill([0, 2], [prompts[0], prompts[2]])
    with pytest.raises(ValueError, match="every live sequence"):
        lm.decode([0], [5])
    with pytest.raises(ValueError, match="live already"):
        lm.prefill([2], [prompts[1]])
    with pytest.raises(KeyError):
        lm.fork(1, [7])
    with pytest.raises(ValueError, match="from 0 to 7"):
        lm.prefill([8], [prompts[1]])  # the slots above are the runtime's own
    with pytest.raises(ValueError, match="not in the vocabulary"):
        lm.prefill([1], [[lm.n_vocab + 10]])
    with pytest.raises(ValueError, match=r"8193 tokens exceed the context of 8192"):
        lm.prefill([1], [[5] * 8193])
    assert sorted(lm.live) == [0, 2] and lm.context.seq_length(1) == 0
    check(lm, lm.decode([2, 0], [5, 6]), [prompts[2] + [5], prompts[0] + [6]])
    lm.release([0, 2])
    assert lm.live == []
    lm.prefill([0], [prompts[1]])  # an id can be used again once released
    assert lm.live == [0]


def test_a_failing_llama_decode_raises_a_clear_error(lm):
    with pytest.raises(LlamaDecodeError, match=r"code -1.*invalid seq_id"):
        lm.context.decode([5], [0], [lm.context.n_seq_max], [1])
    lm.prefill([0], [lm.encode(PROMPTS[0])])
    with pytest.raises(LlamaDecodeError, match="consecutive"):
        lm.context.decode([5], [40], [0], [1])  # a gap in the positions of sequence 0
    check(lm, lm.decode([0], [9]), [lm.encode(PROMPTS[0]) + [9]])


def test_a_full_kv_cache_drops_the_prefix_cache_then_fails_clearly(lm):
    """On a context of 512 cells: a prompt that needs the cached cells gets them; one that
    cannot fit gets KVCacheFullError and the running sequence goes on."""
    context = Context(lm.model, n_ctx=512, n_seq_max=lm.max_sequences + 1 + llama_lm.SCORE_SLOTS + 1, n_batch=512, threads=1)
    small = LlamaCausalLM(
        lm.model, context, lm.tokenizer, lm.max_sequences, 8192, PrefixCache([context.n_seq_max - 1], 400), threads=1
    )
    try:
        first, second = lm.encode(DOCUMENT * 2)[:200], lm.encode(DOCUMENT[::-1] * 2)[:200]
        small.prefill([0], [first])
        small.release([0])
        assert small.prefix_cache_stats()["tokens"] == 200
        small.prefill([0], [second + first[:150]])  # 350 cells: only with the cached 200 freed
        assert small.prefix_cache_stats()["entries"] == 0 and small.prefix_cache_stats()["evictions"] == 1
        with pytest.raises(KVCacheFullError, match=r"KV cache \(512 tokens\) has no room"):
            small.prefill([1], [first])
        assert small.live == [0] and context.seq_length(1) == 0
        logits = small.decode([0], [7])
        assert int(logits[0].argmax()) == int(alone(lm, second + first[:150] + [7]).argmax())
    finally:
        context.close()


def close_scores(got: list[float], expected: list[float], sequences: list[list[int]]) -> bool:
    """Within the noise of passes of another size: 0.05 per scored token (measured up to 0.044);
    a token scored against the wrong position, or not scored, is off by far more."""
    return all(abs(a - b) <= 0.1 + 0.05 * (len(ids) - 1) for a, b, ids in zip(got, expected, sequences))


def test_scoring_matches_each_sequence_scored_whole(lm, monkeypatch):
    prefix = "Up above the world so high, like a diamond in the sky. " * 3 + "Twinkle twinkle"
    texts = [prefix + fill for fill in (" little star.", " big star, how I wonder.", " star.", "")]
    texts += ["A text with nothing in common.", "twinkle"]
    sequences = [lm.encode(text) for text in texts]
    expected = [whole_logprob(lm, ids) for ids in sequences]  # each a pass of under 64 tokens
    # passes under 64 tokens run the same kernels: the same scores
    assert lm.score(sequences[:4]) == pytest.approx(expected[:4], abs=1e-6)  # a shared prefix, then four rests
    monkeypatch.setattr(llama_lm, "SCORE_SLOTS", 2)  # two sequences side by side, three output rows a pass
    monkeypatch.setattr(llama_lm, "SCORE_OUTPUTS", 3)
    assert lm.score(sequences) == pytest.approx(expected, abs=1e-6)
    monkeypatch.undo()
    assert close_scores(lm.score(sequences), expected, sequences)  # one pass of 205 tokens
    with pytest.raises(DeadlineExceededError):
        lm.score(sequences, deadline=time.monotonic())
    assert all(lm.context.seq_length(slot) == 0 for slot in range(lm.max_sequences, lm.context.n_seq_max))


def test_scoring_several_texts_candidates_in_one_call_matches_each_scored_whole(lm, monkeypatch):
    """Infill's merged calls: the candidates of three texts, interleaved, with a text repeated;
    each group's prefix on a prefix slot of its own, rests of different groups side by side."""
    texts = []
    for fill in (" little", " big", " bright"):
        texts += [f"Twinkle twinkle{fill} star, how I wonder what you are.", f"Happy birthday to{fill} you.",
                  f"The answer to life, the{fill} universe, and everything."]
    texts.append(texts[0])
    sequences = [lm.encode(text) for text in texts]
    expected = [whole_logprob(lm, ids) for ids in sequences]
    assert lm.score(sequences) == pytest.approx(expected, abs=1e-6)
    monkeypatch.setattr(llama_lm, "PREFIX_SLOTS", 2)  # two prefixes held at a time: two rounds
    monkeypatch.setattr(llama_lm, "SCORE_SLOTS", 2)
    assert lm.score(sequences) == pytest.approx(expected, abs=1e-6)
    assert all(lm.context.seq_length(slot) == 0 for slot in range(lm.max_sequences, lm.context.n_seq_max))


def test_a_scoring_job_paused_between_passes_is_untouched_by_the_calls_between(lm, monkeypatch):
    """The engine runs other work between two passes of a scoring job: a prefill, a decode
    step, next_logits (a slot of its own).  The job's scores are those of scoring alone."""
    texts = [f"Happy birthday to{fill} you, happy birthday to you." for fill in (" little", " big", " dear")]
    sequences = [lm.encode(text) for text in texts]
    monkeypatch.setattr(llama_lm, "SCORE_OUTPUTS", 5)  # many passes
    expected = lm.score(sequences)
    job = lm.score_passes(sequences)
    next(job)
    prompt = lm.encode(PROMPTS[0])
    lm.prefill([0], [prompt])
    lm.next_logits(lm.encode("The capital of France is"))
    next(job)
    lm.decode([0], lm.encode(" Paris", add_special_tokens=False))
    with pytest.raises(StopIteration) as done:
        while True:
            next(job)
    assert done.value.value == expected
    job = lm.score_passes(sequences)
    next(job)
    job.close()  # closed between passes: its slots are free
    lm.release([0])
    assert all(lm.context.seq_length(slot) == 0 for slot in range(lm.max_sequences, lm.max_sequences + llama_lm.SCRATCH_SLOTS))


def test_scoring_leaves_the_running_sequences_alone(lm):
    prompt = lm.encode(PROMPTS[0])
    lm.prefill([0], [prompt])
    lm.score([lm.encode("Twinkle twinkle little star."), lm.encode("Twinkle twinkle big star.")])
    assert lm.live == [0]
    paris = lm.encode(" Paris", add_special_tokens=False)
    check(lm, lm.decode([0], paris), [prompt + paris])


# ------------------------------------------------------------------------ the prefix cache


def test_the_editor_pattern_reuses_the_document_and_gives_the_same_tokens(lm, cached):
    """The document, then the same plus three typed words: the second prefill runs only the
    new tokens, with the logits of running the same two chunks without the cache (exactly)
    and the greedy tokens of running the prompt whole (up to a near tie)."""
    document = lm.encode(DOCUMENT)
    typed = lm.encode(DOCUMENT + " and untied the ribbon")
    before = cached.prefix_cache_stats()
    margins: list[float] = []
    first = greedy(cached, 0, document, 6)
    assert_same_greedy(first, greedy(lm, 0, document, 6, margins), margins)
    after_first = cached.prefix_cache_stats()
    assert after_first["hits"] == before["hits"] and after_first["entries"] >= 1

    logits = cached.prefill([3], [typed])
    stats = cached.prefix_cache_stats()
    assert stats["hits"] == before["hits"] + 1
    reused = stats["reused_tokens"] - before["reused_tokens"]
    assert len(document) - 2 <= reused < len(typed)  # all of the document's tokens but where the words join
    context = lm.context  # the same two chunks, without the cache
    context.decode(typed[:reused], range(reused), [0] * reused, [0] * reused)
    rest = typed[reused:]
    rows = context.decode(rest, range(reused, len(typed)), [0] * len(rest), [0] * (len(rest) - 1) + [1])
    assert torch.equal(logits[0], torch.from_numpy(context.logits(rows))[0])
    context.seq_rm(0)
    cached.release([3])

    margins = []
    second = greedy(cached, 3, typed, 6)
    assert assert_same_greedy(second, greedy(lm, 0, typed, 6, margins), margins) >= 1
    kept = {tuple(tokens) for _, tokens in cached.prefix_cache.entries()}
    assert tuple(typed + second) in kept  # every token fed back is kept
    assert cached.prefix_cache.tokens <= 2048


def test_n_alternatives_and_chat_turns_find_their_prefix(lm, cached):
    prompt = cached.encode(PROMPTS[2])
    logits = cached.prefill([0], [prompt])
    cached.fork(0, [1, 2])
    tokens = logits[0].topk(3).indices.tolist()
    logits = cached.decode([0, 1, 2], tokens)
    cached.release([0, 1, 2])  # three entries: the prompt and each alternative's first token
    assert {tuple(t) for _, t in cached.prefix_cache.entries()} >= {tuple(prompt + [token]) for token in tokens}
    before = cached.prefix_cache_stats()
    # the next chat turn: the conversation so far (the second alternative's reply) and more
    follow = prompt + [tokens[1], int(logits[1].argmax())] + cached.encode(" And then", add_special_tokens=False)
    logits = cached.prefill([4], [follow])
    stats = cached.prefix_cache_stats()
    assert stats["hits"] == before["hits"] + 1 and stats["reused_tokens"] - before["reused_tokens"] == len(prompt) + 1
    check(lm, logits, [follow])
    cached.release([4])  # the entry it reused is a prefix of its tokens: superseded, not kept twice
    kept = {tuple(t) for _, t in cached.prefix_cache.entries()}
    assert tuple(follow) in kept and tuple(prompt + [tokens[1]]) not in kept
    assert tuple(prompt + [tokens[0]]) in kept


def test_the_lru_budget_bounds_the_cache_and_evicts_the_oldest(lm):
    small = LlamaCausalLM.load(max_sequences=2, threads=1, prefix_cache_tokens=40)
    try:
        words = ["apple", "river", "stone", "cloud", "maple"]
        prompts = [small.encode(" ".join([word] * 20))[:15] for word in words]
        assert all(len(ids) == 15 for ids in prompts)
        for ids in prompts[:3]:
            small.prefill([0], [ids])
            small.release([0])
            assert small.prefix_cache.tokens <= 40
            assert_cells_match_the_entries(small)
        kept = [tokens for _, tokens in small.prefix_cache.entries()]
        assert kept == [prompts[1], prompts[2]]  # the oldest went
        assert small.prefix_cache_stats()["evictions"] == 1
        mixed = prompts[1][:10] + prompts[3][:3]
        check(lm, small.prefill([1], [mixed]), [mixed])
        small.release([1])  # its lookup made prompts[1] more recent than prompts[2]: that one went
        assert [tokens for _, tokens in small.prefix_cache.entries()] == [prompts[1], mixed]
        assert small.prefix_cache_stats()["evictions"] == 2
        assert_cells_match_the_entries(small)
        long = small.encode(" ".join(words * 12))
        small.prefill([0], [long])
        small.release([0])  # longer than the budget: its first 40 tokens are kept, alone
        ((slot, tokens),) = small.prefix_cache.entries()
        assert tokens == long[:40] and small.prefix_cache.tokens == 40
        assert_cells_match_the_entries(small)
    finally:
        small.close()


def assert_cells_match_the_entries(runtime: LlamaCausalLM) -> None:
    """Each cache slot holds exactly its entry's tokens in the KV cache; the others hold none."""
    held = {slot: len(tokens) for slot, tokens in runtime.prefix_cache.entries()}
    for slot in runtime.prefix_cache.slots:
        assert runtime.context.seq_length(slot) == held.get(slot, 0), slot


def test_prefix_cache_bookkeeping():
    cache = PrefixCache([10, 11], budget=10, min_tokens=3)
    assert cache.match([1, 2, 3, 4]) is None and cache.misses == 1
    assert cache.admit([1, 2]) is None  # too short to be worth a slot
    first = cache.admit([1, 2, 3, 4, 5])
    assert (first.slot, first.keep, first.evict) == (10, 5, [])
    assert cache.match([1, 2, 3, 4, 5]) == (10, 4)  # the last token always runs
    assert cache.match([1, 2, 9]) is None  # two shared tokens: under min_tokens
    assert cache.admit([1, 2, 3]) is None  # already held within an entry
    longer = cache.admit([1, 2, 3, 4, 5, 6])  # supersedes the first entry
    assert longer.evict == [10] and cache.entries() == [(longer.slot, [1, 2, 3, 4, 5, 6])]
    other = cache.admit([7, 8, 9, 10, 11])  # 6 + 5 > 10: the oldest goes
    assert other.evict == [longer.slot] and cache.tokens == 5 and cache.evictions == 1
    assert cache.stats() == {
        "hits": 1, "misses": 2, "reused_tokens": 4, "evictions": 1, "entries": 1, "tokens": 5, "budget_tokens": 10,
    }
    assert PrefixCache([], budget=100).admit([1, 2, 3, 4, 5]) is None  # no slot: disabled
