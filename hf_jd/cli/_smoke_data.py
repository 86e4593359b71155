"""In-memory data for ``--offline_smoke``, in the column layout the command asks for.

Small, deterministic and learnable (the label follows from the words), so that a few steps show the loss
moving: GLUE-style sentences (``sentence``, ``label``; with two text columns, MRPC-style pairs such as
``sentence1``, ``sentence2``), CoNLL-style words (``tokens``, ``ner_tags``) and Alpaca-style
instructions (``instruction``, ``input``, ``output``). The column and split names are parameters, so that
``--text_column_names sentence1,sentence2 --offline_smoke`` runs on columns of those names.
"""

from __future__ import annotations

import random
from collections.abc import Sequence as Sequence_

from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

_GOOD = ["good", "great", "fine", "lovely", "superb", "pleasant"]
_BAD = ["bad", "awful", "poor", "dull", "boring", "terrible"]
_THINGS = ["movie", "film", "story", "plot", "cast", "ending"]
_NAMES = ["Alice", "Bob", "Carla", "Dmitri", "Eve"]
_PLACES = ["Paris", "Lagos", "Lima", "Oslo", "Kyoto"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _split(
    rows: dict[str, list], features: Features | None = None, eval_split: str = "validation"
) -> DatasetDict:
    full = Dataset.from_dict(rows, features=features)
    cut = int(0.75 * len(full))
    return DatasetDict({"train": full.select(range(cut)), eval_split: full.select(range(cut, len(full)))})


def _sentence(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(_THINGS), "was", rng.choice(_GOOD if positive else _BAD)]
    return " ".join(["the", *words, "and", rng.choice(_THINGS), "too"])


def text_classification(
    n: int = 64,
    seed: int = 0,
    text_columns: Sequence_[str] = ("sentence",),
    label_column: str = "label",
    eval_split: str = "validation",
) -> DatasetDict:
    """Sentences and a ``ClassLabel``, like GLUE.

    One text column: SST-2 style, the label is the sentiment (``negative`` / ``positive``). Two or more:
    MRPC style pairs, the label says whether the first two sentences agree in sentiment
    (``not_equivalent`` / ``equivalent``); further columns hold more sentences.
    """
    text_columns = list(text_columns)
    if not text_columns:
        raise ValueError("text_columns must name at least one column.")
    rng = random.Random(seed)
    rows: dict[str, list] = {column: [] for column in [*text_columns, label_column]}
    for _ in range(n):
        label = rng.randrange(2)
        first = rng.randrange(2) if len(text_columns) > 1 else label
        polarities = [first, first if label else 1 - first]
        for index, column in enumerate(text_columns):
            positive = polarities[index] if index < 2 else rng.randrange(2)
            rows[column].append(_sentence(rng, bool(positive)))
        rows[label_column].append(label)
    names = ["negative", "positive"] if len(text_columns) == 1 else ["not_equivalent", "equivalent"]
    features = Features(
        {**{column: Value("string") for column in text_columns}, label_column: ClassLabel(names=names)}
    )
    return _split(rows, features, eval_split)


def token_classification(
    n: int = 64, seed: int = 0, text_column: str = "tokens", label_column: str = "ner_tags"
) -> DatasetDict:
    """Pre-split words and their ``B-``/``I-`` person and location tags, like CoNLL-2003."""
    rng = random.Random(seed)
    rows: dict[str, list] = {text_column: [], label_column: []}
    for _ in range(n):
        name, place = rng.choice(_NAMES), rng.choice(_PLACES)
        tokens = (
            [name, "Smith", "flew", "to", place, "City"]
            if rng.random() < 0.5
            else [name, "lives", "in", place]
        )
        tags = [1, 2, 0, 0, 3, 4] if len(tokens) == 6 else [1, 0, 0, 3]
        rows[text_column].append(tokens)
        rows[label_column].append(tags)
    features = Features(
        {text_column: Sequence(Value("string")), label_column: Sequence(ClassLabel(names=NER_LABELS))}
    )
    return _split(rows, features)


def instructions(
    n: int = 64,
    seed: int = 0,
    instruction_column: str = "instruction",
    input_column: str = "input",
    output_column: str = "output",
) -> DatasetDict:
    """Instructions, optional inputs and responses of different lengths, like Alpaca (no input column
    when ``input_column`` is empty)."""
    rng = random.Random(seed)
    rows: dict[str, list] = {instruction_column: [], "input": [], output_column: []}
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        if rng.random() < 0.5:
            rows[instruction_column].append("Add the two numbers.")
            rows["input"].append(f"{a} and {b}")
            rows[output_column].append(f"The sum is {a + b} .")
        else:
            rows[instruction_column].append("Repeat the word several times.")
            rows["input"].append(rng.choice(_THINGS))
            rows[output_column].append(" ".join([rows["input"][-1]] * (1 + a % 5)))
    inputs = rows.pop("input")
    if input_column:
        rows[input_column] = inputs
    else:  # no context column: the word to repeat goes into the instruction
        rows[instruction_column] = [
            f"{text} {context}" for text, context in zip(rows[instruction_column], inputs)
        ]
    return _split(rows)
