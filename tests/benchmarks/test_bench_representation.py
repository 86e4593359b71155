"""``benchmarks/bench_representation.py --quick``: the representation Gramian's step against the exact JD step."""

from __future__ import annotations

import re

from _load import load_script


def test_quick_run_compares_the_two_steps_and_the_exact_step_never_conflicts():
    rows = load_script("bench_representation").main(["--quick", "--datasets", "cancer_mtl"])
    body = rows[2:]
    assert [row.split(" | ")[:2] for row in body] == [["| cancer_mtl", "upgrad"], ["| cancer_mtl", "mgda"]]
    for row in body:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        cosine = float(re.match(r"[-\d.]+", cells[3]).group())
        assert -1.0 <= cosine <= 1.0
        assert float(re.match(r"[\d.]+", cells[4]).group()) > 0
        # UPGrad's and MGDA's exact steps are non-conflicting by construction: the control of the check
        assert cells[6] == "100.0 %"
