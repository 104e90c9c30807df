"""Several processes on this machine: NPROC > 1 (or auto with several CUDA GPUs) re-runs the same command under
torchrun: `python -m finetune.launch --standalone --nproc-per-node N -m finetune -- <args>`, which is
torch.distributed.run's own argument parser and agent (see main() below).

Why torchrun and not `accelerate launch`: it ships with torch (no extra package or accelerate config file), and it
is all the run needs from a launcher: each process gets RANK / WORLD_SIZE / MASTER_ADDR, and when one dies the
others are stopped (SIGTERM). The processes find each other through finetune.world; the loop stays ours.
Every input check runs here first, in one process, so bad input is one line and not N tracebacks.
"""
from __future__ import annotations

import os
import sys

from finetune.errors import UserError
from finetune.loop import STOP_GRACE_S
from finetune.world import torchrun_env


def processes(nproc: str, hw, backend_name: str) -> int:
    """NPROC: a number, or auto = one per visible CUDA GPU with the torch backend (a CPU or a Mac trains in one
    process: its cores are already all in use by one; Unsloth trains on one GPU)."""
    if nproc != "auto":
        return int(nproc)
    return max(1, len(hw.cuda_devices)) if backend_name == "torch" else 1


def join(backend, hw):
    """This process's place among the run's processes (the backend's collectives: torch.distributed, mlx)."""
    if not hasattr(backend, "join"):
        raise UserError(f"this process was started as one of several (by torchrun or mlx.launch), but the "
                        f"{backend.name} backend trains in one process; use BACKEND=torch (torchrun) or mlx (mlx.launch)")
    return backend.join(hw)


def check_backend(backend, hw, world_size: int, launched: bool) -> None:
    """NPROC starts torchrun, which only the torch backend joins (MLX across Macs is started with mlx.launch), on CUDA
    GPUs (one process each) or the CPU (gloo cannot carry MPS tensors)."""
    if world_size == 1 or backend.name == "mlx" and launched:
        return
    device, backend_name = backend.device(hw), backend.name
    if device == "mps":
        raise UserError(f"NPROC={world_size}: several processes need CUDA GPUs or the CPU, not MPS; on Macs use "
                        "BACKEND=mlx with mlx.launch (README, \"More than one device\"), or NPROC=1")
    here = torchrun_env()[2] if launched else world_size  # processes on this machine (torchrun may span several)
    if device == "cuda" and here > len(hw.cuda_devices):
        raise UserError(f"NPROC={here}: this machine has {len(hw.cuda_devices)} CUDA GPU(s), one per process; "
                        "lower NPROC (auto: all of them)")
    if not launched and backend_name != "torch":
        hint = ("across Macs, start it with mlx.launch (README, \"More than one device\")" if backend_name == "mlx"
                else "use BACKEND=torch")
        raise UserError(f"NPROC={world_size}: several processes are started by torchrun for the torch backend; "
                        f"this run uses {backend_name} ({hint}), or set NPROC=1")


def torchrun_command(world_size: int, argv: list[str]) -> list[str]:
    """torchrun's own command line, run through main() below (torchrun's code, its failure report cut short)."""
    # "--": our flags are not torchrun's (its parser would take --nproc as an abbreviation of --nproc-per-node)
    return [sys.executable, "-m", "finetune.launch", "--standalone", f"--nproc-per-node={world_size}",
            "-m", "finetune", "--", *argv]


def start(world_size: int, argv: list[str]) -> int:
    """Replace this process with torchrun running the same command (signals then reach torchrun, which passes
    them on to every process)."""
    cmd = torchrun_command(world_size, argv)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))  # torchrun's warning otherwise
    # after Ctrl-C / SIGTERM torchrun gives the processes this long before SIGKILL (its default, 30 s, can cut the
    # step a stop waits for, FINETUNE_STOP_GRACE_S): they save a checkpoint and the adapter first
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(STOP_GRACE_S) + 30))
    print(f"Starting {world_size} processes: {' '.join(cmd[1:])}", flush=True)
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


def main(argv: list[str]) -> int:
    """torchrun (torch.distributed.run: its arguments, its agent), except that a failed process is one line each
    instead of torchrun's traceback and report: rank 0 has already said what happened and how to resume."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except SignalException as err:  # Ctrl-C / SIGTERM: torchrun passed it on and waited for the processes to stop
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        for rank, failure in sorted(err.failures.items()):
            code = failure.exitcode
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            print(f"error: process {rank} ended with {how}", file=sys.stderr)
        rank0 = err.failures.get(0)
        return rank0.exitcode if rank0 is not None and rank0.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
