"""The launcher behind pretrain_scripts/finetune_llama.sh: check everything once, then start the
ranks with torchrun's own launcher, in this process (the interpreter running this file).

    finetune_llama.sh [--nproc-per-node N] [--nnodes M --node-rank I --master-addr A
                      [--master-port P]] TRAINER FLAGS
    (or NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT in the environment)

One node and no port given: a free port, so two jobs on one host do not collide. A bad flag or
file is one line, status 2, before any rank starts; an error inside a rank is that rank's one
line (status 2), without torchrun's failure report; Ctrl-C is one line (step, last checkpoint:
rank 0 prints it, the agent passes SIGINT on).

Preemption: SIGTERM and SIGUSR1 (Slurm's time limit, scancel, --signal=USR1@T) are passed on
to the ranks, every time they come, while this launcher keeps waiting; with
--exit-signal-handler (the default) the ranks finish their step, save it and exit 75, and so
does this launcher: status 75 (errors.EXIT_RESUME) means "saved, rerun the same command to
resume" -- also after --exit-duration-in-mins / --exit-interval. Without the handler a signal
kills the ranks: one line (step, last checkpoint) and status 128 + signal.
"""

import contextlib
import logging
import os
import signal
import sys

from megatron_bdlora.errors import EXIT_DIVERGED, EXIT_INPUT, EXIT_RESUME, InputError
from megatron_bdlora.launch.preflight import preflight
from megatron_bdlora.launch.rank import interrupted_line
from megatron_bdlora.parallel.distributed import free_port
from megatron_bdlora.training.arguments import (
    NONNEG, OneLineParser, POSITIVE, build_parser, parse_args,
)
from megatron_bdlora.training.flags import megatron_differences

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY = os.path.join(ROOT, "pretrain_scripts", "finetune_llama.py")
DEFAULT_PORT = "29500"  # several nodes must agree on the port: Megatron-LM's default
# The ranks save and stop on these (training/exit_conditions.py); this launcher passes them on
# itself, as often as they come, and keeps waiting for the ranks: torchrun's agent would stop
# waiting at a second signal (or after 30 s) and the ranks would die mid-save.
RANK_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _child_pids() -> list:
    """This process's children: the ranks torchrun's agent (running in this process) started."""
    me, out = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == me:
                out.append(int(name))
    return out


def _pass_signals_on(received: list) -> None:
    def forward(signum, frame):
        received.append(signum)
        for pid in _child_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for s in RANK_SIGNALS:
        signal.signal(s, forward)


def _launcher_parser():
    p = OneLineParser(prog="finetune_llama.sh", add_help=False, allow_abbrev=False)
    env = os.environ.get
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=POSITIVE, default=env("NPROC", "1"))
    p.add_argument("--nnodes", type=POSITIVE, default=env("NNODES", "1"))
    p.add_argument("--node-rank", "--node_rank", type=NONNEG, default=env("NODE_RANK", "0"))
    p.add_argument("--master-addr", "--master_addr", default=env("MASTER_ADDR", "127.0.0.1"))
    p.add_argument("--master-port", "--master_port", type=POSITIVE, default=env("MASTER_PORT"))
    return p


def _torchrun(launch, trainer_argv, save) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    port = launch.master_port or (free_port() if launch.nnodes == 1 else DEFAULT_PORT)
    parser = get_args_parser()
    agent_signals = []  # the agent handles the rest (SIGINT: the ranks' Ctrl-C line)
    received = None  # the signals passed on, when this launcher passes them on
    if any("--signals-to-handle" in a.option_strings for a in parser._actions):
        agent_signals = ["--signals-to-handle", "SIGINT,SIGHUP,SIGQUIT"]
        received = []
        _pass_signals_on(received)  # else (torch < 2.9) the agent passes SIGTERM on, waits 30 s
    ns = parser.parse_args([
        "--nproc-per-node", str(launch.nproc_per_node), "--nnodes", str(launch.nnodes),
        "--node-rank", str(launch.node_rank), "--master-addr", launch.master_addr,
        "--master-port", str(port), *agent_signals, ENTRY, *trainer_argv])
    # The ranks print their own errors; torchrun's agent logs and failure report repeat them.
    for name in ["torch.distributed", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(ns)
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        for status in (EXIT_INPUT, EXIT_DIVERGED, EXIT_RESUME):
            if any(f.exitcode == status for _, f in failures):
                return status  # that rank printed the one line
        rank, f = failures[0]
        if received:  # the ranks died of a signal passed on (--no-exit-signal-handler)
            print(interrupted_line(save), file=sys.stderr, flush=True)
            return 128 + received[0]
        how = f"signal {f.signal_name()}" if f.exitcode < 0 else f"status {f.exitcode}"
        print(f"error: rank {rank} exited with {how}; its output is above", file=sys.stderr)
        return 1
    except SignalException as e:
        if e.sigval != signal.SIGINT:  # the agent passes SIGINT on: rank 0 prints the line then
            print(interrupted_line(save), file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    finally:
        if received is not None:  # a late signal must not turn the status into 128 + N as
            for s in RANK_SIGNALS:  # Python restores the default handlers at exit
                signal.signal(s, signal.SIG_IGN)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        launch, trainer_argv = _launcher_parser().parse_known_args(argv)
        if "-h" in trainer_argv or "--help" in trainer_argv:
            build_parser().print_help()
            return 0
        if launch.node_rank >= launch.nnodes:
            raise InputError(f"--node-rank {launch.node_rank} must be below --nnodes {launch.nnodes}")
        args = parse_args(trainer_argv, world_size=launch.nproc_per_node * launch.nnodes)
        preflight(args, check_lock=launch.node_rank == 0)
        differ = megatron_differences(args.given)
        if differ and launch.node_rank == 0:
            print("note: defaults that differ from Megatron-LM's (give the flag to change one): "
                  + ", ".join(differ), flush=True)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    return _torchrun(launch, trainer_argv, args.save)


if __name__ == "__main__":
    sys.exit(main())
