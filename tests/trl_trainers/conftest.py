"""Fixtures shared by the TRL trainer tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hf_jd.gramian import GramianEngine


@pytest.fixture
def served_by(monkeypatch) -> list[dict[str, str]]:
    """How the Gramian engine served every trainable parameter (``GramianEngine.coverage``), at each JD update."""
    reports: list[dict[str, str]] = []
    accumulate = GramianEngine.accumulate_grad

    def recording(self, *args, **kwargs):
        reports.append(self.coverage())
        return accumulate(self, *args, **kwargs)

    monkeypatch.setattr(GramianEngine, "accumulate_grad", recording)
    return reports


@pytest.fixture
def first_gramian_fails(monkeypatch) -> Callable[[], list[bool]]:
    """Call it to make the Gramian engine's first ``gramian()`` raise, once, so that ``jd_engine="auto"`` re-runs
    the micro-batch on the next engine; returns the list that records the failure."""

    def arm() -> list[bool]:
        original, failures = GramianEngine.gramian, []

        def fails_once(self, *args, **kwargs):
            if not failures:
                failures.append(True)
                raise RuntimeError("the first Gramian engine fails")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(GramianEngine, "gramian", fails_once)
        return failures

    return arm
