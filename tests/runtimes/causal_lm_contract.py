"""What every CausalLM runtime's tests drive the same way (runtimes/base.py's step protocol)."""

from __future__ import annotations

#: three lengths (left padding for torch, several passes' worth of rows for llama.cpp)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little girl who"]


def prefill_fork_decode_each_alone(lm, prompts: list[list[int]], check) -> None:
    """Prefill three sequences, fork the second twice, decode three steps with the rows in a
    scrambled order; ``check(lm, logits, sequences)`` compares each row with its sequence
    run alone (how exactly is the runtime's test's business)."""
    logits = lm.prefill([0, 1, 2], prompts)
    check(lm, logits, prompts)
    lm.fork(1, [3, 4])  # two more alternatives of prompt 1, sharing its prefill
    assert sorted(lm.live) == [0, 1, 2, 3, 4]
    sequences = {seq: list(prompts[1] if seq >= 3 else prompts[seq]) for seq in range(5)}
    order = [4, 0, 3, 2, 1]  # any order: the logits follow it
    for step in range(3):
        tokens = [100 + 7 * seq + step for seq in order]  # distinct tokens: the forks diverge
        logits = lm.decode(order, tokens)
        for seq, token in zip(order, tokens):
            sequences[seq].append(token)
        check(lm, logits, [sequences[seq] for seq in order])


def rows_join_and_leave(lm, check) -> dict[int, list[int]]:
    """A long sequence decodes two steps, a short one joins, both decode, the long one leaves
    and the short one decodes alone; ``check`` after every pass.  Returns the sequences
    (0 released, 1 live) for the runtime's own checks of what the release freed."""
    long, short = lm.encode(PROMPTS[2]), lm.encode(PROMPTS[0])
    lm.prefill([0], [long])
    sequences = {0: list(long)}
    for token in (11, 12):
        lm.decode([0], [token])
        sequences[0].append(token)
    check(lm, lm.prefill([1], [short]), [short])  # joins the running sequence
    sequences[1] = list(short)
    logits = lm.decode([0, 1], [13, 21])
    sequences[0].append(13)
    sequences[1].append(21)
    check(lm, logits, [sequences[0], sequences[1]])
    lm.release([0])  # the longer one leaves
    assert lm.live == [1]
    logits = lm.decode([1], [22])
    sequences[1].append(22)
    check(lm, logits, [sequences[1]])
    return sequences
