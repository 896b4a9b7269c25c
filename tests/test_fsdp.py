"""MemoryWrapper on an FSDP2-sharded model (2 processes, gloo, CPU): the gathered theta gradient equals a
single process's gradient of the global batch's loss (each rank's rows with that rank's memory), with
prefix sharing on and off, and the fast weights stay per rank (plain tensors, never sharded)."""

from pathlib import Path

import pytest
import torch

from bilevel_dlm import MemoryWrapper
from bilevel_dlm.data import pad_collate
from ddp_worker import global_examples, recipe, tiny_model
from torchrun import launch_two_processes

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return launch_two_processes(WORKER, tmp_path_factory.mktemp("fsdp"), timeout=240)


def reference() -> tuple[dict[str, torch.Tensor], list[dict]]:
    model = tiny_model()
    config = recipe()
    examples = global_examples()
    batches, memories = [], []
    for rank in range(2):
        wrapper = MemoryWrapper(model, config.model_copy(update={"seed": config.seed + rank}))
        batches.append((wrapper, wrapper.prepare(pad_collate(examples[2 * rank:2 * rank + 2], wrapper.pad_token_id()))))
    total = sum(float(w.outer.denominator(b.maskable)) for w, b in batches)
    for wrapper, batch in batches:
        with wrapper.bilevel_context():
            loss, _, _ = wrapper.compute_loss(batch)
            (loss * float(wrapper.outer.denominator(batch.maskable)) / total).backward()
        memories.append(wrapper.memory.state())
    return {name: p.grad for name, p in model.named_parameters()}, memories


@pytest.mark.parametrize("share_prefix", [False, True])
def test_fsdp2_gradient_equals_the_single_process_global_batch_gradient(sharded, share_prefix) -> None:
    expected, memories = reference()
    gradients = torch.load(sharded / f"gradients_share_{share_prefix}.pt")
    assert gradients.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(gradients[name], value, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for rank in (0, 1):
        memory = torch.load(sharded / f"memory_share_{share_prefix}_rank{rank}.pt")
        for key, value in memories[rank].items():
            torch.testing.assert_close(memory[key], value, rtol=0, atol=1e-6)
