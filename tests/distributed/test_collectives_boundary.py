"""``hf_jd/distributed/_collectives.py`` is the one module that moves data with ``torch.distributed``.

Every module of ``hf_jd/`` is parsed with :mod:`ast` (never imported); a call of a data-moving
``torch.distributed`` operation (all-reduce, all-gather, all-to-all, reduce-scatter, broadcast, scatter,
gather, send/receive), through any alias of ``torch.distributed`` or imported by name, outside
``_collectives.py`` fails the test. Queries (``get_rank``, ``get_world_size``, ``is_initialized``, groups)
and the process-group lifecycle (``barrier``, ``destroy_process_group``) are not data.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "hf_jd"
COLLECTIVES = PACKAGE_ROOT / "distributed" / "_collectives.py"

DATA_OPERATIONS = {
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "broadcast",
    "broadcast_object_list",
    "scatter",
    "scatter_object_list",
    "gather",
    "gather_object",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
}


def data_calls(source: str) -> list[str]:
    """The data-moving ``torch.distributed`` operations that ``source`` calls (``alias.op(...)`` or ``op(...)``)."""
    tree = ast.parse(source)
    aliases = set()  # names bound to torch.distributed
    imported = {}  # local name -> operation imported from torch.distributed
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname for a in node.names if a.name == "torch.distributed" and a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            imported.update({a.asname or a.name: a.name for a in node.names if a.name in DATA_OPERATIONS})
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases.update(a.asname or a.name for a in node.names if a.name == "distributed")
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in DATA_OPERATIONS:
            owner = ast.unparse(func.value)
            if owner in aliases or owner == "torch.distributed":
                found.append(f"{owner}.{func.attr}")
        elif isinstance(func, ast.Name) and func.id in imported:
            found.append(imported[func.id])
    return found


def test_only_the_collectives_module_moves_data_over_torch_distributed():
    offenders = {
        str(path.relative_to(PACKAGE_ROOT.parent)): calls
        for path in sorted(PACKAGE_ROOT.rglob("*.py"))
        if path != COLLECTIVES and (calls := data_calls(path.read_text(encoding="utf-8")))
    }
    assert not offenders, (
        f"Move these torch.distributed data calls behind hf_jd/distributed/_collectives.py: {offenders}"
    )


def test_the_collectives_module_is_where_the_data_calls_are():
    # The scan sees the calls it is meant to see (else the test above would pass on anything).
    calls = data_calls(COLLECTIVES.read_text(encoding="utf-8"))
    assert {"dist.all_reduce", "dist.all_to_all_single", "dist.reduce_scatter_tensor"} <= set(calls)


def test_the_scan_sees_every_spelling_of_a_data_call():
    source = (
        "import torch\nimport torch.distributed as d\nfrom torch import distributed\n"
        "from torch.distributed import all_gather as gather_all\n"
        "d.all_reduce(x)\ndistributed.broadcast(x, 0)\ntorch.distributed.send(x, 1)\ngather_all(parts, x)\n"
        "d.get_rank()\nd.barrier()\n"
    )
    assert sorted(data_calls(source)) == sorted(
        ["d.all_reduce", "distributed.broadcast", "torch.distributed.send", "all_gather"]
    )
