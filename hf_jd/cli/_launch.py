"""``hf-jd train ... --num_processes N`` / ``--accelerate_config NAME``: re-launch through ``accelerate launch``.

The command re-runs itself as ``python -m accelerate.commands.launch [options] -m hf_jd train ...`` with
the launch options taken out. Two traps are avoided: ``--num_processes N`` without a config starts
*one* process unless ``--multi_gpu`` is given (added here), and on a machine without CUDA each process
must train with ``--use_cpu True`` (gloo), which is added too.

The rendezvous port: ``--main_process_port`` when given, else the config's ``main_process_port`` (every
machine of a multi-node run must use the same one: it is never replaced), else a free local port.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from ._errors import RecipeError
from ._paths import accelerate_config

# Set in the environment of the re-launched processes: they train instead of launching again.
LAUNCHED_ENV = "HF_JD_LAUNCHED"
FSDP_NEEDS_GPU = (
    "--accelerate_config fsdp: FSDP2 needs GPUs (on CPU transformers replaces FSDP by DDP). Use "
    "--accelerate_config multi_gpu, or --num_processes N (DDP over gloo), on CPU."
)


def launch_parser() -> argparse.ArgumentParser:
    """The ``accelerate launch`` options ``hf-jd train`` understands (the rest goes to the example)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("accelerate launch (re-runs this command in N processes)")
    group.add_argument("--num_processes", type=int, default=None, help="Processes in all (e.g. GPUs).")
    group.add_argument(
        "--accelerate_config",
        default=None,
        help="A shipped config (single_gpu, multi_gpu, multi_node, fsdp: hf-jd recipes) or a config file.",
    )
    group.add_argument("--num_machines", type=int, default=None, help="Machines (multi-node).")
    group.add_argument("--machine_rank", type=int, default=None, help="This machine's rank (multi-node).")
    group.add_argument("--main_process_ip", default=None, help="Address of the rank-0 machine (multi-node).")
    group.add_argument(
        "--main_process_port",
        type=int,
        default=None,
        help="Its port (default: the config's, else a free one).",
    )
    return parser


def split_launch_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Separate the launch options from the example's arguments."""
    return launch_parser().parse_known_args(argv)


def wants_launch(options: argparse.Namespace) -> bool:
    """Whether to re-launch: launch options were given and this process was not launched by us."""
    asked = options.accelerate_config is not None or (options.num_processes or 1) > 1
    return asked and os.environ.get(LAUNCHED_ENV) != "1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config_port(path: Path) -> int | None:
    """The ``main_process_port`` an accelerate config fixes, if any."""
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    port = values.get("main_process_port") if isinstance(values, dict) else None
    return int(port) if port is not None else None


def launch_command(options: argparse.Namespace, train_argv: list[str], cuda: bool) -> list[str]:
    """The ``accelerate launch`` command line that runs ``hf_jd train train_argv`` in every process."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    config_port = None
    if options.accelerate_config is not None:
        if options.accelerate_config == "fsdp" and not cuda:
            raise RecipeError(FSDP_NEEDS_GPU)
        config_file = accelerate_config(options.accelerate_config)
        command += ["--config_file", str(config_file)]
        config_port = _config_port(config_file)
    elif (options.num_processes or 1) > 1:
        command += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command += ["--num_machines", str(options.num_machines or 1)]
    for flag in ("num_processes", "num_machines", "machine_rank", "main_process_ip"):
        value = getattr(options, flag)
        if value is not None and f"--{flag}" not in command:
            command += [f"--{flag}", str(value)]
    if options.main_process_port is not None:
        command += ["--main_process_port", str(options.main_process_port)]
    elif config_port is None:  # a config that fixes the port keeps it: the machines must meet there
        command += ["--main_process_port", str(_free_port())]
    command += ["-m", "hf_jd", "train", *train_argv]
    if not cuda and "--use_cpu" not in train_argv:
        command += ["--use_cpu", "True"]  # gloo: accelerate's --cpu would start a single process
    return command


def relaunch(options: argparse.Namespace, train_argv: list[str]) -> int:
    """Run the command of :func:`launch_command`; return its exit status."""
    import torch

    command = launch_command(options, train_argv, torch.cuda.is_available())
    print("hf-jd: " + " ".join(command[1:]), file=sys.stderr, flush=True)
    environment = {**os.environ, LAUNCHED_ENV: "1"}
    return subprocess.run(command, env=environment, check=False).returncode
