"""Fixtures of the Trainer tests (helpers live in ``_trainer_fixtures``: a plain ``conftest`` import
is ambiguous when several test folders each have a ``conftest.py``)."""

import pytest
from _trainer_fixtures import classification_dataset
from datasets import Dataset


@pytest.fixture
def dataset() -> Dataset:
    return classification_dataset()
