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


def leave_process_group() -> None:
    """End a worker cleanly: every rank waits for the others, then the process group is destroyed.

    A rank that exits while gloo (or DeepSpeed's shared-memory communicator) still holds its threads can abort
    at interpreter exit ("terminate called without an active exception") after its results were written."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
