"""The suite's markers by node-id prefix: read by ``tests/conftest.py`` and checked by ``tests/test_markers.py``."""

from __future__ import annotations

#: The suite's markers, by node-id prefix (a file, a folder, or ``file::test`` without its parameters).
#: ``make test`` (and CI) runs everything; ``make test-fast`` deselects all three (``-m "not slow and not
#: distributed and not zoo"``), the inner loop. ``tests/test_markers.py`` checks that every prefix still
#: names a test, so that a renamed file cannot silently move a slow test into the fast loop.
#:
#: * ``distributed``: spawns real processes (gloo) — DDP, FSDP2, the launch checks, ``--num_processes``;
#: * ``zoo``: one test per architecture of the model zoos (Hugging Face models, torchvision-like nets);
#: * ``slow``: builds a wheel, runs the example scripts, benchmarks or many full training runs
#:   (resume from a checkpoint per stateful method, subprocess CLI calls), or trains several real models.
MARKS: dict[str, tuple[str, ...]] = {
    "distributed": (
        "tests/distributed/",
        "tests/cli/test_two_processes.py",
        "tests/trainer/test_fsdp_wiring.py",
    ),
    "zoo": (
        "tests/gramian/test_gramian_model_zoo.py",
        "tests/gramian/test_gramian_hf_models.py",
        "tests/gramian/test_gramian_hf_rules.py",
        "tests/trainer/test_auto_on_models_that_broke_it.py",
    ),
    "slow": (
        "tests/cli/test_wheel_install.py",
        "tests/test_examples.py",
        "tests/trl_trainers/test_sft_example.py::test_the_example_trains_offline",
        "tests/trl_trainers/test_dpo.py::test_the_example_runs_offline",
        "tests/trl_trainers/test_reward.py::test_the_example_runs_offline",
        "tests/trl_trainers/test_grpo.py::test_the_example_runs_offline",
        "tests/benchmarks/",
        "tests/cli/test_commands.py",
        "tests/cli/test_one_line_errors.py::test_a_hub_name_offline_is_one_line_and_a_failure",
        "tests/trainer/test_checkpoint_resume.py",
        "tests/trainer/test_scalarizer_trainer.py",
        "tests/trainer/test_stock_behaviour.py",
        "tests/trainer/test_mixed_precision.py",
        "tests/trainer/test_guarantees.py::test_the_advised_non_reentrant_checkpointing_trains_exactly",
        "tests/trainer/test_guarantees.py::test_huge_finite_losses_give_the_float64_step",
        "tests/trainer/test_guarantees.py::test_compiled_model_infers_its_loss_type_and_trains",
        "tests/gramian/test_gramian_engine_api.py::test_compiled_model_is_refused",
    ),
}


def marked(nodeid: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a test (its node id, parameters included) falls under one of the prefixes."""
    test = nodeid.split("[", 1)[0]
    for prefix in prefixes:
        if prefix.endswith("/") and test.startswith(prefix):
            return True
        if test == prefix or test.startswith(prefix + "::"):
            return True
    return False
