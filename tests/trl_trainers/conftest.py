"""Fixtures shared by the TRL trainer tests."""

from __future__ import annotations

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
