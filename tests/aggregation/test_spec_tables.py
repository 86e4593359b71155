"""The README's aggregator tables are the ones generated from the specs.

When this fails, regenerate them: ``python -m hf_jd.aggregation --write README.md``.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from hf_jd.aggregation import Paper, aggregator_specs, markdown_table
from hf_jd.aggregation._spec import AggregatorSpec
from hf_jd.aggregation._tables import REGENERATE, main, names_markdown, updated

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def test_readme_aggregator_tables_are_the_generated_ones():
    text = README.read_text(encoding="utf-8")
    assert updated(text) == text, f"README.md's aggregator tables are out of date: run `{REGENERATE}`."


def test_the_table_has_one_row_per_spec_with_its_papers():
    lines = markdown_table().splitlines()
    specs = aggregator_specs()
    assert len(lines) == 2 + len(specs)
    for line, spec in zip(lines[2:], specs):
        assert line.startswith(f"| `{spec.name}` | {spec.summary}")
        assert all(paper.reference() in line for paper in spec.papers)
        assert ("needs `J`" if spec.needs_jacobian else "| Gramian |") in line


def test_rows_say_the_kind_the_state_and_the_losses():
    spec = AggregatorSpec(
        "demo",
        "a demo",
        (Paper("Doe & Roe", "A Title", "ICML", 2030, "3001.00002"), Paper("Poe", "B", "", 2031)),
        needs_jacobian=True,
        state="weights",
        loss_aware=True,
    )
    (row,) = markdown_table([spec]).splitlines()[2:]
    assert row == (
        "| `demo` | a demo (Doe & Roe, ICML 2030, arXiv:3001.00002; Poe 2031) | needs `J` | weights; uses the loss "
        "values, which `JDTrainer` passes (`set_losses`) |"
    )
    assert names_markdown([spec, AggregatorSpec("upgrad", "x")]) == "`demo`, `upgrad` (default)"


def test_updated_rewrites_between_the_markers_only():
    text = (
        "before\n<!-- aggregators:start -->\nold table\n<!-- aggregators:end -->\nmiddle "
        "<!-- aggregator-names:start -->old names<!-- aggregator-names:end --> after\n"
    )
    new = updated(text)
    assert new.startswith("before\n<!-- aggregators:start -->\n| `--aggregator` |")
    assert f"\n{markdown_table()}\n<!-- aggregators:end -->\nmiddle " in new
    assert new.endswith(
        f"<!-- aggregator-names:start -->{names_markdown()}<!-- aggregator-names:end --> after\n"
    )
    assert updated(new) == new
    with pytest.raises(ValueError, match="aggregator-names:start"):
        updated("<!-- aggregators:start --><!-- aggregators:end -->")


def test_the_command_checks_and_writes_a_readme(tmp_path, capsys, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- aggregators:start -->\n<!-- aggregators:end -->\n<!-- aggregator-names:start --><!-- aggregator-names:end -->\n"
    )
    monkeypatch.setattr(sys, "argv", ["python -m hf_jd.aggregation", "--check", str(readme)])
    with pytest.raises(SystemExit) as stale:  # what `python -m hf_jd.aggregation --check` runs
        runpy.run_module("hf_jd.aggregation", run_name="__main__")
    assert stale.value.code == 1 and REGENERATE in capsys.readouterr().err
    assert main(["--write", str(readme)]) == 0 and main(["--check", str(readme)]) == 0
    assert markdown_table() in readme.read_text()
    assert main([]) == 0 and capsys.readouterr().out == markdown_table() + "\n"
