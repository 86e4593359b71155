"""``hf-jd aggregators``: the aggregator registry as a table, generated from the classes themselves.

Nothing here lists the aggregators: every row comes from :func:`hf_jd.aggregation.aggregator_names`
and the registered class, so an aggregator added to the registry (or with ``register_aggregator``)
appears with no change here.

* **gramian**: ``yes`` when the class is a ``GramianWeightedAggregator`` (``A(J) = Jᵀ W(J Jᵀ)``), which
  the Gramian engine and the distributed path serve without holding ``J``; ``no`` when it needs ``J``.
* **stateful**: ``yes`` when the aggregator or one of its sub-modules has ``reset()`` (state carried
  from step to step, saved in checkpoints), read from an instance built with default arguments (or,
  when the constructor needs arguments, from the class).
* **paper**: the first citation found in the class's docstring, then its module's: authors, year and
  arXiv identifier when they are there.
"""

from __future__ import annotations

import inspect
import re
import sys

from ..aggregation import GramianWeightedAggregator, aggregator_class, aggregator_names

_ARXIV = re.compile(r"arXiv:\s?(\d{4}\.\d{4,5})")
_YEAR = re.compile(r"\b(19[5-9]\d|20\d\d)\b")
# "Authors, *Title*" or "(Authors, *Title*": the authors are the text before the first italic title.
_CITATION = re.compile(r"(?:^|\()\s*([^()*\n]*?[A-Z][^()*\n]*?),\s*\*([^*]+)\*([^()]*)", re.MULTILINE)
_SHORT = re.compile(r"\(([A-Z][^()]*?(?:et al\.|&)[^()]*?)\)")


def _docs(cls: type) -> list[str]:
    module = sys.modules.get(cls.__module__)
    return [inspect.getdoc(cls) or "", (module.__doc__ if module else None) or ""]


def paper(cls: type) -> str:
    """``Authors Year, arXiv:ID`` of the first citation in the docstrings, or ``-`` when they cite nothing.

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


def is_stateful(cls: type) -> bool:
    """Whether the aggregator keeps state between steps (it, or a sub-module, has ``reset()``)."""
    try:
        instance = cls()
    except TypeError:  # required constructor arguments: decide from the class
        return callable(getattr(cls, "reset", None))
    return any(callable(getattr(module, "reset", None)) for module in instance.modules())


def summary(cls: type) -> str:
    """The first sentence of the module docstring's first line (``UPGrad: Unconflicting ...``), without the name."""
    module = sys.modules.get(cls.__module__)
    first = ((module.__doc__ if module else None) or inspect.getdoc(cls) or "").strip().splitlines()
    line = first[0] if first else ""
    return line.split(": ", 1)[-1].rstrip(".") if ": " in line else line.rstrip(".")


def rows() -> list[dict[str, str]]:
    """One row per registered name: name, class, gramian, stateful, paper."""
    table = []
    for name in aggregator_names():
        cls = aggregator_class(name)
        table.append(
            {
                "name": name,
                "class": cls.__name__,
                "gramian": "yes" if issubclass(cls, GramianWeightedAggregator) else "no",
                "stateful": "yes" if is_stateful(cls) else "no",
                "paper": paper(cls),
                "summary": summary(cls),
            }
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
