"""The continuous-batching engine on the bundled SmolLM2 (the torch runtime), in-process.

Greedy equivalence: requests that join the running batch at different decode steps each get
exactly the tokens ``generate()`` gives for their prompt alone.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from batchserve.errors import DeadlineExceededError, InputError, OverloadedError
from batchserve.generation import EngineLimits, GenerationEngine, SamplingParams
from batchserve.generation.detokenize import IncrementalDecoder, StopMatcher
from batchserve.priority import offline
from tests.generation.engine_helpers import MAX_TOKENS, PROMPTS, greedy_results_joining_at_distinct_steps, wait_for_step


@pytest.fixture(scope="module")
def engine(lm):
    engine = GenerationEngine(lm, EngineLimits(max_rows=16, max_waiting_rows=24))
    engine.start()
    yield engine
    engine.stop()


def generate_alone(lm, prompt: str, max_tokens: int) -> list[int]:
    encoded = lm.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = lm.model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False)
    return output[0, encoded["input_ids"].shape[1] :].tolist()


async def test_greedy_rows_joining_at_different_steps_match_generate_alone(lm, engine):
    results = await greedy_results_joining_at_distinct_steps(engine)
    for prompt, result in zip(PROMPTS, results):
        expected = generate_alone(lm, prompt, MAX_TOKENS)
        got = result.choices[0].token_ids
        stop = [i for i, token in enumerate(expected) if token in engine.stop_tokens]
        expected = expected[: stop[0] + 1] if stop else expected
        assert got == expected, f"{prompt!r}: {lm.tokenizer.decode(got)!r} != {lm.tokenizer.decode(expected)!r}"
        assert result.choices[0].text == lm.tokenizer.decode(expected, skip_special_tokens=True)
    assert engine.active_rows == 0
    assert lm.live == []  # every finished row's sequence was released


async def test_n_alternatives_share_one_prefill_and_seeds_repeat(engine):
    prompt = engine.encode("My favourite animal is the")
    params = SamplingParams(max_tokens=6, temperature=1.0, top_k=50, seed=1234)
    steps_before = engine.steps
    first = await engine.submit(prompt, params, n=3, timeout=120).result()
    # one prefill step plus at most max_tokens - 1 decode steps for all three rows together
    assert engine.steps - steps_before <= params.max_tokens
    second = await engine.submit(prompt, params, n=3, timeout=120).result()
    texts = [choice.text for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert len(set(texts)) > 1, texts
    assert texts == [choice.text for choice in second.choices]
    assert first.prompt_tokens == len(prompt)


async def test_a_request_not_streamed_gets_one_event_per_choice_with_the_streamed_text(engine):
    prompt = engine.encode("The three primary colours are")
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, stop=("blue",))
    streamed = engine.submit(prompt, params, n=2, timeout=120)
    deltas = [delta async for delta in streamed.stream()]
    quiet = engine.submit(prompt, params, n=2, timeout=120, streamed=False)
    events = [delta async for delta in quiet.stream()]
    assert len(deltas) > 2 and len(events) == 2 and all(event.finish_reason for event in events)
    for choice in (0, 1):
        expected = [delta for delta in deltas if delta.index == choice]
        (event,) = [event for event in events if event.index == choice]
        assert event.text == "".join(delta.text for delta in expected)
        assert event.token_ids == [token for delta in expected for token in delta.token_ids]
        assert (event.finish_reason, event.tokens) == (expected[-1].finish_reason, expected[-1].tokens)


async def test_a_job_runs_a_step_at_a_time_while_the_batch_goes_on(engine):
    """A call returning a generator (infill's scoring) gets one next() between two decode
    steps: a running request keeps generating while it runs; its return value is the result."""
    running = engine.submit(engine.encode("Count slowly:"), SamplingParams(max_tokens=48, temperature=0, ignore_eos=True), timeout=120)
    await wait_for_step(engine, engine.steps + 2)
    seen: list[int] = []

    def job(lm, count):
        for _ in range(count):
            seen.append(engine.tokens_generated)
            yield
        return "done"

    assert await engine.call(job, 5) == "done"
    assert len(seen) == 5 and seen == sorted(set(seen)), seen  # a token decoded between every two
    assert (await running.result()).choices[0].tokens == 48


async def test_many_queued_calls_take_turns_with_decode_steps(engine):
    """A burst of calls (each longer than the engine's calls budget) does not hold the
    running batch up: a decode step runs between them."""
    running = engine.submit(engine.encode("Count slowly:"), SamplingParams(max_tokens=48, temperature=0, ignore_eos=True), timeout=120)
    await wait_for_step(engine, engine.steps + 2)
    seen: list[int] = []

    def slow(lm):
        time.sleep(0.06)
        seen.append(engine.tokens_generated)

    await asyncio.gather(*(engine.call(slow) for _ in range(4)))
    assert seen == sorted(set(seen)), seen
    await running.result()


async def test_rows_past_their_deadline_do_not_count_against_the_token_bound(own_lm):
    """A request whose deadline has passed is going (its rows are dropped before the next
    admission): a request sent right after its 504 is not refused as overloaded meanwhile."""
    engine = GenerationEngine(own_lm, EngineLimits(max_rows=4, max_kv_tokens=400))
    engine.start()
    try:
        prompt = engine.encode("Count slowly:")
        params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
        first = engine.submit(prompt, params, timeout=0.5)
        await wait_for_step(engine, 2)
        held = asyncio.ensure_future(engine.call(lambda lm: time.sleep(1.0)))  # no step (no drop) for a second
        with pytest.raises(DeadlineExceededError):
            await first.result()
        second = engine.submit(prompt, params, timeout=60)  # accepted: the expired rows are going
        with pytest.raises(OverloadedError):  # a live request's rows do count
            engine.submit(prompt, params, timeout=60)
        second.cancel()
        await held
    finally:
        engine.stop()


async def test_a_failing_job_fails_its_call_only(engine):
    def job(lm):
        yield
        raise DeadlineExceededError("scoring did not finish before the request's deadline")

    with pytest.raises(DeadlineExceededError):
        await engine.call(job)
    assert (await engine.submit(engine.encode("Hi"), SamplingParams(max_tokens=2), timeout=120).result()).choices


async def test_per_row_parameters_in_one_batch(engine):
    prompt = engine.encode("The capital of France is")
    greedy = engine.submit(prompt, SamplingParams(max_tokens=6, temperature=0), timeout=120)
    sampled = engine.submit(prompt, SamplingParams(max_tokens=3, temperature=1.5, seed=7), n=2, timeout=120)
    greedy_result, sampled_result = await asyncio.gather(greedy.result(), sampled.result())
    assert greedy_result.choices[0].text.startswith(" Paris")
    assert [c.tokens for c in sampled_result.choices] == [3, 3]
    assert all(c.finish_reason == "length" for c in sampled_result.choices)


async def test_cancelled_request_leaves_the_batch(engine):
    request = engine.submit(engine.encode("Count to one hundred: 1, 2, 3,"), SamplingParams(max_tokens=200, temperature=0), timeout=300)
    async with asyncio.timeout(60):
        async for _ in request.stream():
            break  # the first delta: the request is running
    assert engine.active_rows == 1
    request.cancel()
    async with asyncio.timeout(30):
        while engine.active_rows:
            await asyncio.sleep(0.01)
    result = await engine.submit(engine.encode("Hello"), SamplingParams(max_tokens=2, temperature=0), timeout=60).result()
    assert result.choices[0].tokens >= 1


async def test_deadline_ends_a_running_request_and_frees_its_rows(engine):
    request = engine.submit(engine.encode("Count to one hundred: 1, 2,"), SamplingParams(max_tokens=300, temperature=0), timeout=1.0)
    with pytest.raises(DeadlineExceededError):
        await request.result()
    async with asyncio.timeout(30):
        while engine.active_rows:
            await asyncio.sleep(0.01)


async def test_bounds(engine):
    prompt = engine.encode("Hello")
    with pytest.raises(InputError):
        engine.submit(prompt, SamplingParams(max_tokens=2), n=17)
    with pytest.raises(InputError):
        engine.submit([], SamplingParams(max_tokens=2))
    with pytest.raises(InputError):
        engine.submit(prompt, SamplingParams(max_tokens=engine.max_positions))
    # 16 rows run, 24 may wait: the next submit past that is refused at once
    requests = []
    with pytest.raises(OverloadedError):
        for _ in range(10):
            requests.append(engine.submit(prompt, SamplingParams(max_tokens=40, temperature=0), n=8, timeout=120))
    assert 3 <= len(requests) <= 5
    for request in requests:
        request.cancel()
    async with asyncio.timeout(30):
        while engine.active_rows or engine.waiting_requests:
            await asyncio.sleep(0.01)


def test_incremental_decoder_holds_back_split_characters(lm):
    text = "naïve café — 東京 🙂 done"
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(lm.tokenizer)
    pieces = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stop_matcher_across_pieces():
    matcher = StopMatcher(("END", "\n\n"))
    released = []
    for piece in ["Hello E", "N", "ough. E", "ND and more"]:
        text, stopped = matcher.push(piece)
        released.append(text)
        if stopped:
            break
    assert "".join(released) == "Hello ENough. "
    assert stopped
    assert released[0] == "Hello "  # "E" could start "END": held back


async def test_idle_engine_gives_freed_memory_back_once(engine, monkeypatch):
    from batchserve.generation import engine as engine_module

    releases = []
    monkeypatch.setattr(engine_module, "release_free_heap", lambda: releases.append(time.monotonic()))
    await asyncio.sleep(engine_module.RELEASE_EVERY + 0.5)  # a release the earlier tests left due
    releases.clear()
    await engine.submit(engine.encode("The quick brown fox"), SamplingParams(max_tokens=4, temperature=0)).result()
    done = time.monotonic()
    async with asyncio.timeout(10):
        while not releases:
            await asyncio.sleep(0.01)
    assert releases[0] - done <= engine_module.RELEASE_EVERY + 1.0
    await asyncio.sleep(engine_module.RELEASE_EVERY + 0.5)
    assert len(releases) == 1, "an idle engine releases once, then sleeps"


async def test_a_failed_call_releases_its_tensors_at_once(engine):
    """The error's traceback must not keep the call's tensors until a full gc (a soak found this)."""
    import gc
    import weakref

    held = []

    def failing(lm):
        logits = torch.zeros(1024)
        held.append(weakref.ref(logits))
        raise DeadlineExceededError("scoring did not finish before the request's deadline")

    gc.disable()
    try:
        with pytest.raises(DeadlineExceededError):
            await engine.call(failing)
        assert held[0]() is None
    finally:
        gc.enable()


async def test_a_failed_prefill_fails_only_the_newcomer(lm, engine):
    """The runtime refuses a prompt (a token the model does not have): that request fails, the
    running one goes on with its own tokens, and every sequence is released at the end."""
    from batchserve.errors import ModelError

    prompt = "The capital of France is"
    running = engine.submit(engine.encode(prompt), SamplingParams(max_tokens=MAX_TOKENS, temperature=0), timeout=300)
    async with asyncio.timeout(60):
        while running.admitted_step is None:
            await asyncio.sleep(0.005)
    await wait_for_step(engine, running.admitted_step + 1)  # running
    bad = engine.submit([lm.model.config.vocab_size + 10], SamplingParams(max_tokens=4, temperature=0), n=2, timeout=60)
    with pytest.raises(ModelError):
        await bad.result()
    result = await running.result()
    expected = generate_alone(lm, prompt, MAX_TOKENS)
    stop = [i for i, token in enumerate(expected) if token in engine.stop_tokens]
    assert result.choices[0].token_ids == (expected[: stop[0] + 1] if stop else expected)
    async with asyncio.timeout(30):
        while engine.active_rows:
            await asyncio.sleep(0.01)
    assert lm.live == []


async def test_logprobs_follow_the_tokens_and_leave_out_the_stop_token(lm, engine):
    prompt = engine.encode("The capital of France is")
    greedy = SamplingParams(max_tokens=6, temperature=0, logprobs=3)
    sampled = SamplingParams(max_tokens=6, temperature=1.5, top_k=5, seed=7, logprobs=3)
    plain = SamplingParams(max_tokens=6, temperature=0)
    first, second, third = await asyncio.gather(
        *(engine.submit(prompt, params, timeout=120, streamed=False).result() for params in (greedy, sampled, plain))
    )
    (choice,) = first.choices
    assert [entry.token for entry in choice.logprobs] == choice.token_ids
    for entry in choice.logprobs:  # greedy: each token is the likeliest
        assert entry.top[0][0] == entry.token and entry.top[0][1] == entry.logprob and len(entry.top) == 3
    with torch.inference_mode():  # the model's own distribution, not the sampled one (temperature 1.5, top-k 5)
        expected = lm.model(input_ids=torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)
    top = second.choices[0].logprobs[0].top
    assert [token for token, _ in top] == expected.topk(3).indices.tolist()
    assert all(abs(value - float(expected[token])) < 1e-3 for token, value in top)
    assert third.choices[0].logprobs == []
    streamed = engine.submit(engine.encode("Say hi."), SamplingParams(max_tokens=40, temperature=0, logprobs=0), timeout=120)
    deltas = [delta async for delta in streamed.stream()]
    tokens = [token for delta in deltas for token in delta.token_ids]
    entries = [entry for delta in deltas for entry in delta.logprobs]
    ended_by_stop_token = deltas[-1].finish_reason == "stop" and tokens[-1] in engine.stop_tokens
    assert [entry.token for entry in entries] == (tokens[:-1] if ended_by_stop_token else tokens)
    assert all(entry.top == () for entry in entries)
    with pytest.raises(InputError, match="logprobs takes 0 to 20"):
        engine.submit(prompt, SamplingParams(max_tokens=2, logprobs=21), timeout=10)


PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tea": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "tea", "colour"],
    "additionalProperties": False,
}


async def test_constrained_and_free_rows_share_steps_and_each_get_what_they_asked(engine):
    import json

    from batchserve.generation.constraint import Constraint

    compiled = engine.constraints.compile(Constraint("json_schema", json.dumps(PERSON_SCHEMA)))
    free_prompt = engine.encode("The capital of France is")
    greedy = SamplingParams(max_tokens=8, temperature=0)
    alone = await engine.submit(free_prompt, greedy, timeout=120, streamed=False).result()
    prompt = engine.encode("A person as JSON:")
    hot = SamplingParams(max_tokens=60, temperature=0.9, seed=5, logprobs=2)
    requests = [
        engine.submit(prompt, hot, n=3, timeout=120, streamed=False, constraint=compiled),
        engine.submit(free_prompt, greedy, timeout=120, streamed=False),
    ]
    constrained, free = await asyncio.gather(*(request.result() for request in requests))
    # admitted together, or the free one a step later (the engine may wake between the two submits): either way
    # it decodes in the constrained rows' steps, which take more than one (a JSON object is many tokens)
    assert 0 <= requests[1].admitted_step - requests[0].admitted_step <= 1
    assert free.choices[0].token_ids == alone.choices[0].token_ids
    for choice in constrained.choices:
        value = json.loads(choice.text)
        assert choice.finish_reason == "stop" and set(value) == {"name", "age", "tea", "colour"}, choice.text
        assert 1 <= len(value["name"]) <= 12 and 0 <= value["age"] <= 120 and value["colour"] in ("red", "green", "blue")
        assert isinstance(value["tea"], bool)
        assert all(entry.top[0][1] >= entry.logprob for entry in choice.logprobs)
    cut = await engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0), timeout=120, constraint=compiled).result()
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].text.startswith("{")
    with pytest.raises(InputError, match='Unimplemented keys: \\["uniqueItems"\\]'):
        engine.constraints.compile(Constraint("json_schema", json.dumps({"type": "array", "uniqueItems": True})))
    with pytest.raises(InputError, match="look-around"):
        engine.constraints.compile(Constraint("regex", "(?=a)b"))


async def test_an_online_request_takes_the_next_free_row_before_waiting_offline_ones(own_lm):
    """Rows go to waiting online requests first (batchserve.priority.offline marks a job's);
    offline work still runs when no online request waits."""
    engine = GenerationEngine(own_lm, EngineLimits(max_rows=1))
    engine.start()
    try:
        prompt = engine.encode("Count slowly:")
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        with offline():
            running = engine.submit(prompt, params, timeout=120)
            async with asyncio.timeout(60):
                while running.admitted_step is None:
                    await asyncio.sleep(0.002)
            waiting = [engine.submit(prompt, params, timeout=120) for _ in range(2)]
        online = engine.submit(prompt, params, timeout=120)
        assert (engine.waiting_requests, engine.waiting_offline_requests) == (3, 2)
        results = await asyncio.gather(*(request.result() for request in (running, *waiting, online)))
        assert all(result.choices[0].tokens == 4 for result in results)
        assert running.admitted_step < online.admitted_step < waiting[0].admitted_step < waiting[1].admitted_step
        assert running.offline and all(request.offline for request in waiting) and not online.offline
    finally:
        engine.stop()


async def test_offline_requests_never_make_an_online_one_find_the_engine_full(own_lm):
    """Online requests count the online rows waiting; offline ones count both lanes."""
    engine = GenerationEngine(own_lm, EngineLimits(max_rows=1, max_waiting_rows=2))
    engine.start()
    holding = threading.Event()

    def hold(lm):
        holding.set()
        time.sleep(0.5)  # no admission meanwhile: everything submitted now waits

    held = asyncio.ensure_future(engine.call(hold))
    await asyncio.to_thread(holding.wait, 30)
    try:
        prompt = engine.encode("Hello")
        params = SamplingParams(max_tokens=2, temperature=0)
        with offline():
            waiting = [engine.submit(prompt, params, timeout=60) for _ in range(2)]
            with pytest.raises(OverloadedError, match="2 generation rows already waiting"):
                engine.submit(prompt, params, timeout=60)
        waiting += [engine.submit(prompt, params, timeout=60) for _ in range(2)]  # online: room of its own
        with pytest.raises(OverloadedError, match="2 generation rows already waiting"):
            engine.submit(prompt, params, timeout=60)
        with offline(), pytest.raises(OverloadedError, match="4 generation rows already waiting"):
            engine.submit(prompt, params, timeout=60)
        await held
        results = await asyncio.gather(*(request.result() for request in waiting))
        assert all(result.choices for result in results)
        steps = [request.admitted_step for request in waiting]
        assert max(steps[2:]) < min(steps[:2]), steps  # the online ones first
    finally:
        engine.stop()
