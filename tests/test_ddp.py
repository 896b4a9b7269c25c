"""MemDLMTrainer under DDP (2 processes, gloo, CPU): theta's outer gradient is all-reduced, fast weights stay
per rank, and the result is the gradient of the global batch's loss.

What "the same gradient as one process on the global batch" means here: each rank adapts its own memory
on its own micro-batch (inner loss normalised per rank), so the single-process reference runs the inner
loop on each rank's slice with its examples' keyed draws, then computes ONE outer loss on the
concatenated batch, normalised by the global maskable-token count, with each row's memory bound per
sample. DDP's all-reduced gradient must equal that reference's gradient.
"""

from pathlib import Path

import pytest
import torch

from bilevel_dlm import Anchor, MemoryParams, MemoryWrapper
from ddp_worker import recipe, tiny_model
from torchrun import launch_two_processes

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    return launch_two_processes(WORKER, tmp_path_factory.mktemp("ddp"), timeout=240)


def reference(records: list[dict]) -> tuple[dict, list[dict], dict]:
    """Per-rank adapted memories, and theta's gradient of the global-batch loss (plus, as a control, of the
    mean of the per-rank losses, which DDP without global normalisation would give)."""
    config = recipe()
    model = tiny_model()
    wrapper = MemoryWrapper(model, config)
    slices, memories = [], []
    for record in records:
        batch = wrapper.prepare({name: record[name] for name in ("input_ids", "labels", "example_index", "epoch")})
        generator = wrapper.random_source(batch)  # keyed by (seed, epoch, example index)
        anchor = wrapper.outer.sample_anchor(batch.x0, batch.maskable, generator)
        wrapper.inner.run(batch.x0, batch.maskable, anchor, batch.attention_mask, generator=generator)
        slices.append((batch, anchor))
        memories.append(wrapper.memory.state())
    theta = [p for p in model.parameters()]

    per_rank_losses = []
    for (batch, anchor), memory in zip(slices, memories):
        wrapper.memory.load_state(memory)
        with wrapper.memory.bind():
            per_rank_losses.append(wrapper.outer.loss(batch.x0, batch.maskable, anchor, batch.attention_mask))
    naive = torch.autograd.grad(torch.stack(per_rank_losses).mean(), theta)

    def cat(get):
        return torch.cat([get(batch, anchor) for batch, anchor in slices])

    x0, maskable, attention = cat(lambda b, a: b.x0), cat(lambda b, a: b.maskable), cat(lambda b, a: b.attention_mask)
    anchor = Anchor(t=cat(lambda b, a: a.t), masked=cat(lambda b, a: a.masked), input_ids=cat(lambda b, a: a.input_ids))
    per_row = MemoryParams(model, config.memory, per_sample=True)
    rows = [batch.x0.shape[0] for batch, _ in slices]
    per_row.load_state({name: torch.cat([m[name].expand(n, *m[name].shape) for m, n in zip(memories, rows)])
                        for name in memories[0]})
    with per_row.bind():
        loss = wrapper.outer.loss(x0, maskable, anchor, attention)
    names = [name for name, _ in model.named_parameters()]
    exact = dict(zip(names, torch.autograd.grad(loss, theta)))
    return exact, memories, dict(zip(names, naive))


@pytest.mark.parametrize("find_unused", [True, False])
def test_ddp_gradient_equals_the_global_batch_gradient_and_memory_stays_per_rank(ranks, find_unused):
    records = [torch.load(ranks / f"find_unused_{find_unused}_rank{r}.pt") for r in (0, 1)]
    names = [name for name, _ in tiny_model().named_parameters()]
    maskable = [int((r["labels"] != -100).sum()) for r in records]
    assert maskable[0] != maskable[1], "the ranks must differ in maskable tokens for normalisation to matter"

    for record in records:
        assert record["wrapped_in"] == "DistributedDataParallel"
        assert record["reduced"] == [f"module.{name}" for name in names], "DDP reduces theta and nothing else"
    exact, memories, naive = reference(records)

    for rank, record in enumerate(records):
        assert record["memory"].keys() == memories[rank].keys()
        for name, value in record["memory"].items():
            torch.testing.assert_close(value, memories[rank][name], atol=1e-6, rtol=0)
    assert any(not torch.allclose(records[0]["memory"][k], records[1]["memory"][k]) for k in memories[0]), \
        "fast weights must stay local to their rank (they were synchronised)"

    for name in names:
        g0, g1 = records[0]["gradients"][name], records[1]["gradients"][name]
        assert torch.equal(g0, g1), f"{name}: ranks hold different gradients after the all-reduce"
        torch.testing.assert_close(g0, exact[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    gap = max((records[0]["gradients"][n] - naive[n]).abs().max().item() for n in names)
    assert gap > 1e-3, "control: averaging per-rank normalised losses should give a different gradient"


def test_ddp_evaluation_equals_one_process_on_the_whole_eval_set(ranks):
    """Each rank sums the loss terms of its own examples; the all-reduced ratio is the loss of the whole set,
    also for 3, 5 and 7 examples on 2 ranks with eval batch 2 (no example repeated to even out batches)."""
    from ddp_worker import EVAL_SIZES, evaluation_sets

    wrapper = MemoryWrapper(tiny_model(), recipe())
    names = {"loss": "off", "loss_prompt_memory": "prompt"}
    sets = evaluation_sets()
    assert set(sets) == {"global", *(f"n{count}" for count in EVAL_SIZES)}
    for rank in (0, 1):
        evaluation = torch.load(ranks / f"find_unused_True_rank{rank}.pt")["evaluation"]
        for set_name, examples in sets.items():
            for name, memory in names.items():
                key = f"eval_{set_name}_{name}"
                expected = wrapper.eval_loss(examples, memory=memory, batch_size=1)
                assert evaluation[key] == pytest.approx(expected, rel=0, abs=1e-6), (rank, key)
