"""In-memory data for ``--offline_smoke``, in the column layout of the Hub datasets the examples default to.

Small, deterministic and learnable (the label follows from the words), so that a few steps show the loss
moving: GLUE-style sentences (``sentence``, ``label``), CoNLL-style words (``tokens``, ``ner_tags``) and
Alpaca-style instructions (``instruction``, ``input``, ``output``).
"""

from __future__ import annotations

import random

from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

_GOOD = ["good", "great", "fine", "lovely", "superb", "pleasant"]
_BAD = ["bad", "awful", "poor", "dull", "boring", "terrible"]
_THINGS = ["movie", "film", "story", "plot", "cast", "ending"]
_NAMES = ["Alice", "Bob", "Carla", "Dmitri", "Eve"]
_PLACES = ["Paris", "Lagos", "Lima", "Oslo", "Kyoto"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _split(rows: dict[str, list], features: Features | None = None) -> DatasetDict:
    full = Dataset.from_dict(rows, features=features)
    cut = int(0.75 * len(full))
    return DatasetDict(train=full.select(range(cut)), validation=full.select(range(cut, len(full))))


def text_classification(n: int = 64, seed: int = 0) -> DatasetDict:
    """``sentence`` / ``label`` (0 negative, 1 positive), like GLUE SST-2."""
    rng = random.Random(seed)
    sentences, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(_THINGS), "was", rng.choice(_GOOD if label else _BAD)]
        sentences.append(" ".join(["the", *words, "and", rng.choice(_THINGS), "too"]))
        labels.append(label)
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    return _split({"sentence": sentences, "label": labels}, features)


def token_classification(n: int = 64, seed: int = 0) -> DatasetDict:
    """``tokens`` / ``ner_tags`` with CoNLL-style ``B-``/``I-`` person and location tags."""
    rng = random.Random(seed)
    rows: dict[str, list] = {"tokens": [], "ner_tags": []}
    for _ in range(n):
        name, place = rng.choice(_NAMES), rng.choice(_PLACES)
        tokens = (
            [name, "Smith", "flew", "to", place, "City"]
            if rng.random() < 0.5
            else [name, "lives", "in", place]
        )
        tags = [1, 2, 0, 0, 3, 4] if len(tokens) == 6 else [1, 0, 0, 3]
        rows["tokens"].append(tokens)
        rows["ner_tags"].append(tags)
    features = Features(
        {"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=NER_LABELS))}
    )
    return _split(rows, features)


def instructions(n: int = 64, seed: int = 0) -> DatasetDict:
    """``instruction`` / ``input`` / ``output``, like Alpaca: answers of different lengths."""
    rng = random.Random(seed)
    rows: dict[str, list] = {"instruction": [], "input": [], "output": []}
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        if rng.random() < 0.5:
            rows["instruction"].append("Add the two numbers.")
            rows["input"].append(f"{a} and {b}")
            rows["output"].append(f"The sum is {a + b} .")
        else:
            rows["instruction"].append("Repeat the word several times.")
            rows["input"].append(rng.choice(_THINGS))
            rows["output"].append(" ".join([rows["input"][-1]] * (1 + a % 5)))
    return _split(rows)
