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
