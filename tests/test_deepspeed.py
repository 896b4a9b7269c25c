"""MemDLMTrainer under DeepSpeed ZeRO-2 (2 processes, gloo, DeepSpeed's CPU accelerator): theta's update
is the gradient of the global batch's loss (each rank's rows with that rank's memory), as under DDP."""

from pathlib import Path

import pytest
import torch

from ddp_worker import tiny_model
from test_ddp import reference

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'bilevel_dlm[deepspeed]')")
from torchrun import launch_two_processes

WORKER = Path(__file__).with_name("deepspeed_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    return launch_two_processes(WORKER, tmp_path_factory.mktemp("deepspeed"), timeout=300)


def test_zero2_update_is_the_global_batch_gradient_and_memory_stays_per_rank(ranks) -> None:
    records = [torch.load(ranks / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["wrapped_in"] == "DeepSpeedEngine" for r in records)
    exact, memories, naive = reference(records)
    before = dict(tiny_model().named_parameters())
    for record in records:
        for name, after in record["parameters"].items():
            gradient = before[name].detach() - after  # SGD at learning rate 1
            torch.testing.assert_close(gradient, exact[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for rank, record in enumerate(records):
        for key, value in record["memory"].items():
            torch.testing.assert_close(value, memories[rank][key], rtol=0, atol=1e-6)
    gap = max(float((before[n].detach() - records[0]["parameters"][n] - naive[n]).abs().max()) for n in exact)
    assert gap > 1e-3, "control: averaging per-rank normalised losses would give another update"
