"""Launch a test worker on 2 CPU processes (gloo) with torchrun, one torch thread each."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(worker: Path, out: Path, timeout: int = 300) -> Path:
    """Run ``worker OUT`` on 2 processes; fails the test with the workers' output when they fail."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(worker), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out


def end_worker() -> None:
    """End a worker, its results written: every rank waits for the others, the process group is destroyed,
    and the process exits at once (``os._exit(0)``) without the interpreter's teardown.

    A rank that tears down while gloo (or DeepSpeed's shared-memory communicator) still holds native threads
    can abort at exit ("terminate called without an active exception", SIGABRT) after its results were
    written; the barrier and the destroy alone made it rarer, not impossible (seen once in a fresh-clone run)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
