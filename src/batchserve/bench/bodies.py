"""Request bodies for each app: the path they go to and a pool of encoded JSON bodies.

Texts mix short and long sentences (the cost of a transformer batch depends on its
longest member), drawn from a fixed seed so every run sends the same bodies.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import orjson

SUBJECTS = (
    "the dog", "a careful engineer", "my neighbour", "the city council", "our small team",
    "the old lighthouse keeper", "a curious child", "the orchestra", "this model", "the river",
)
VERBS = (
    "walks", "explains", "builds", "watches", "remembers", "measures", "paints", "ignores",
    "questions", "celebrates",
)
OBJECTS = (
    "the morning light", "a long report", "public speaking", "the quiet harbour", "every deadline",
    "a cup of tea", "the budget", "an unexpected visitor", "the stars above", "a broken bicycle",
)
CLAUSES = (
    "because nobody else would", "while the rain kept falling on the roof", "before the meeting began",
    "after a very long and tiring week of work", "with more patience than anyone expected",
    "although the instructions were written in a hurry", "as the last train left the station",
    "so that the children could finally sleep", "without saying a single word to anyone",
    "when the numbers did not add up at the end of the quarter",
)

LONG_FRACTION = 0.25  # one text in four is long
POOL_SIZE = 256


def sentence(rng: random.Random, long: bool) -> str:
    """A short sentence (4-9 words) or a long one (about 40-80 words)."""
    words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if long:
        clauses = [rng.choice(CLAUSES) for _ in range(rng.randint(5, 7))]
        words += " " + ", ".join(clauses) + f", and then {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    return words[0].upper() + words[1:] + "."


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` sentences, a quarter of them long, the same for the same seed."""
    rng = random.Random(seed)
    return [sentence(rng, rng.random() < LONG_FRACTION) for _ in range(count)]


@dataclass(frozen=True)
class Template:
    """Where an app's requests go and how one body is built from ``items`` texts."""

    path: str
    build: Callable[[list[str]], dict]
    description: str


def _masked(text: str) -> str:
    words = text.rstrip(".").split()
    words[len(words) // 2] = "[MASK]"
    return " ".join(words) + "."


TEMPLATES: dict[str, Template] = {
    "embeddings": Template(
        "/v1/embeddings", lambda texts: {"input": texts, "model": "all-MiniLM-L6-v2"}, "OpenAI embeddings"
    ),
    "cluster": Template("/cluster", lambda texts: {"sentences": texts}, "sentence clustering"),
    "completions": Template(
        "/v1/completions",
        lambda texts: {"prompt": texts[0], "max_tokens": 16, "temperature": 0.7, "n": 1},
        "OpenAI completions (first text is the prompt)",
    ),
    "autocomplete": Template(
        "/autocomplete", lambda texts: {"context": texts[0], "n": 3, "max_tokens": 8}, "n suggestions"
    ),
    "infill": Template("/infill", lambda texts: {"text": _masked(texts[0])}, "fill the [MASK]"),
    "custom": Template("/models/{model}/predict", lambda texts: {"inputs": texts}, "a --model served model"),
}


def request_bodies(app: str, items: int = 1, pool: int = POOL_SIZE, seed: int = 0) -> list[bytes]:
    """``pool`` encoded bodies for ``app``, each with ``items`` texts."""
    template = TEMPLATES[app]
    texts = sentences(pool * items, seed)
    return [orjson.dumps(template.build(texts[i * items : (i + 1) * items])) for i in range(pool)]


def request_path(app: str, model: str | None = None) -> str:
    path = TEMPLATES[app].path
    if "{model}" in path:
        if not model:
            raise ValueError(f"the {app!r} template needs a model name (--model NAME)")
        path = path.format(model=model)
    return path
