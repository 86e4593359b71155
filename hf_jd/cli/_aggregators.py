"""``hf-jd aggregators``: the aggregator registry as a table, generated from the aggregators' specs.

Nothing here lists the aggregators: every row comes from :func:`hf_jd.aggregation.aggregator_names`
and the spec each built-in class declares (:class:`hf_jd.aggregation.AggregatorSpec`), so an
aggregator added to the package appears with no change here.

* **gramian**: ``yes`` when the method is Gramian-weighted (``A(J) = Jᵀ W(J Jᵀ)``), which the Gramian
  engine and the distributed path serve without holding ``J``; ``no`` when it needs ``J``.
* **stateful**: ``yes`` when it keeps a state between steps (saved in checkpoints, cleared by ``reset()``).
* **paper**: the spec's main paper: authors, year and arXiv identifier.

A class registered at run time (``register_aggregator``) without a spec is described from the class:
its kind from its bases, and the paper from the first citation in its docstring, the one place such a
class can give it.
"""

from __future__ import annotations

import inspect
import re
import sys

from ..aggregation import (
    AggregatorSpec,
    GramianWeightedAggregator,
    Stateful,
    aggregator_class,
    aggregator_names,
)

_ARXIV = re.compile(r"arXiv:\s?(\d{4}\.\d{4,5})")
_YEAR = re.compile(r"\b(19[5-9]\d|20\d\d)\b")
# "Authors, *Title*" or "(Authors, *Title*": the authors are the text before the first italic title.
_CITATION = re.compile(r"(?:^|\()\s*([^()*\n]*?[A-Z][^()*\n]*?),\s*\*([^*]+)\*([^()]*)", re.MULTILINE)
_SHORT = re.compile(r"\(([A-Z][^()]*?(?:et al\.|&)[^()]*?)\)")


def _docs(cls: type) -> list[str]:
    module = sys.modules.get(cls.__module__)
    return [inspect.getdoc(cls) or "", (module.__doc__ if module else None) or ""]


def paper(cls: type) -> str:
    """For a class without a spec: ``Authors Year, arXiv:ID`` of the first citation in its docstrings, or
    ``-`` when they cite nothing.

    A citation is ``Authors, *Title*, venue year (arXiv:ID)`` up to the end of its paragraph or a ``;``
    (so that an arXiv identifier is never taken from the next reference).
    """
    for doc in _docs(cls):
        match = _CITATION.search(doc)
        if match:
            citation = doc[match.start() :].split("\n\n")[0].split(";")[0]
            names = [name.strip() for name in " ".join(match.group(1).split()).split(",") if name.strip()]
            authors = names[0] + (" et al." if len(names) > 1 and "et al" not in names[0] else "")
            return _with_year_and_arxiv(authors, citation)
    for doc in _docs(cls):
        match = _SHORT.search(doc)
        if match:
            return _with_year_and_arxiv(match.group(1).split(",")[0].strip(), match.group(1))
    return "-"


def _with_year_and_arxiv(authors: str, citation: str) -> str:
    year, arxiv = _YEAR.search(citation), _ARXIV.search(citation)
    text = f"{authors} {year.group(1)}" if year and year.group(1) not in authors else authors
    return f"{text}, arXiv:{arxiv.group(1)}" if arxiv else text


def _from_class(name: str, cls: type) -> dict[str, str]:
    """The row of a class registered without a spec: what its bases and docstring say."""
    try:  # it, or a sub-module, keeps a state: read from an instance built with default arguments
        stateful = any(isinstance(module, Stateful) for module in cls().modules())
    except TypeError:  # required constructor arguments: decide from the class
        stateful = issubclass(cls, Stateful)
    module = sys.modules.get(cls.__module__)
    doc = ((module.__doc__ if module else None) or inspect.getdoc(cls) or "").strip().splitlines()
    line = doc[0] if doc else ""
    return {
        "name": name,
        "class": cls.__name__,
        "gramian": "yes" if issubclass(cls, GramianWeightedAggregator) else "no",
        "stateful": "yes" if stateful else "no",
        "paper": paper(cls),
        "summary": line.split(": ", 1)[-1].rstrip("."),
    }


def _from_spec(name: str, cls: type, spec: AggregatorSpec) -> dict[str, str]:
    return {
        "name": name,
        "class": cls.__name__,
        "gramian": "no" if spec.needs_jacobian else "yes",
        "stateful": "yes" if spec.stateful else "no",
        "paper": spec.papers[0].short() if spec.papers else "-",
        "summary": spec.summary,
    }


def rows() -> list[dict[str, str]]:
    """One row per registered name: name, class, gramian, stateful, paper, summary."""
    table = []
    for name in aggregator_names():
        cls = aggregator_class(name)
        spec = vars(cls).get("spec")
        table.append(
            _from_spec(name, cls, spec) if isinstance(spec, AggregatorSpec) else _from_class(name, cls)
        )
    return table


def render(table: list[dict[str, str]], columns: tuple[str, ...], markdown: bool = False) -> str:
    """Align ``table`` in plain-text columns, or as a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row[column] for column in columns) + " |" for row in table]
        return "\n".join(lines)
    widths = {column: max(len(column), *(len(row[column]) for row in table)) for column in columns}
    lines = ["  ".join(column.ljust(widths[column]) for column in columns).rstrip()]
    lines.append("  ".join("-" * widths[column] for column in columns))
    lines += ["  ".join(row[column].ljust(widths[column]) for column in columns).rstrip() for row in table]
    return "\n".join(lines)


def command(markdown: bool = False, verbose: bool = False) -> int:
    """Print the table; ``verbose`` adds the class and a one-line summary."""
    columns = ("name", "gramian", "stateful", "paper") + (("class", "summary") if verbose else ())
    print(render(rows(), columns, markdown))
    return 0
