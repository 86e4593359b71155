"""The README's aggregator tables, generated from the specs; ``python -m hf_jd.aggregation``.

``README.md`` holds two generated parts, each between markers:

* ``<!-- aggregators:start -->`` … ``<!-- aggregators:end -->``: the *Aggregators* table
  (:func:`markdown_table`);
* ``<!-- aggregator-names:start -->`` … ``<!-- aggregator-names:end -->``: the names in the
  ``--aggregator`` row of the flags table (:func:`names_markdown`).

``python -m hf_jd.aggregation --write README.md`` rewrites them, ``--check README.md`` exits
with 1 when they are out of date; ``tests/aggregation/test_spec_tables.py`` runs the check.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from ._registry import _DEFAULT, aggregator_specs
from ._spec import AggregatorSpec

REGENERATE = "python -m hf_jd.aggregation --write README.md"


def _row(spec: AggregatorSpec) -> str:
    references = "; ".join(paper.reference() for paper in spec.papers)
    method = f"{spec.summary} ({references})" if references else spec.summary
    state = spec.state or "no"
    if spec.loss_aware:
        state += "; uses the loss values, which `JDTrainer` passes (`set_losses`)"
    kind = "needs `J`" if spec.needs_jacobian else "Gramian"
    return f"| `{spec.name}` | {method} | {kind} | {state} |"


def markdown_table(specs: Sequence[AggregatorSpec] | None = None) -> str:
    """The README's *Aggregators* table: name, method and papers, input (Gramian or ``J``), state."""
    rows = [_row(spec) for spec in (aggregator_specs() if specs is None else specs)]
    return "\n".join(["| `--aggregator` | method | input | stateful |", "|---|---|---|---|", *rows])


def names_markdown(specs: Sequence[AggregatorSpec] | None = None) -> str:
    """The names for the ``--aggregator`` flag: ```upgrad`` (default), ``aligned_mtl``, …``."""
    names = [spec.name for spec in (aggregator_specs() if specs is None else specs)]
    return ", ".join(f"`{name}` (default)" if name == _DEFAULT else f"`{name}`" for name in names)


def _sections() -> dict[str, str]:
    """Marker key → generated text (a block on its own lines, or inline)."""
    return {"aggregators": f"\n{markdown_table()}\n", "aggregator-names": names_markdown()}


def _replace(content: str, match: re.Match[str]) -> str:
    return match.group(1) + content + match.group(3)


def updated(text: str) -> str:
    """``text`` (a README) with every generated part rewritten; a missing marker raises ``ValueError``."""
    for key, content in _sections().items():
        pattern = re.compile(rf"(<!-- {key}:start -->)(.*?)(<!-- {key}:end -->)", re.DOTALL)
        if pattern.search(text) is None:
            raise ValueError(f"No '<!-- {key}:start -->' … '<!-- {key}:end -->' markers.")
        text = pattern.sub(partial(_replace, content), text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table, or ``--write`` / ``--check`` the generated parts of a README."""
    parser = argparse.ArgumentParser(prog="python -m hf_jd.aggregation", description=__doc__)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", metavar="README", help="rewrite the generated parts of this file")
    action.add_argument(
        "--check", metavar="README", help="exit with 1 when its generated parts are out of date"
    )
    args = parser.parse_args(argv)
    if args.write is None and args.check is None:
        print(markdown_table())
        return 0
    path = Path(args.write or args.check)
    text = path.read_text(encoding="utf-8")
    new = updated(text)
    if args.write is not None:
        if new != text:
            path.write_text(new, encoding="utf-8")
        return 0
    if new != text:
        print(f"{path}: the aggregator tables are out of date; run: {REGENERATE}", file=sys.stderr)
        return 1
    return 0
