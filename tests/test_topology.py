"""One run whatever the topology (issue #25): every random draw of a training step is keyed by (seed, epoch,
the example's global index) and the data has one global order, so

- 2 processes with micro-batches of 2 == 1 process accumulating 2 micro-batches of 2 (shared and per-sample
  memory), through MemDLMTrainer and through ``fit``;
- with per-sample memory also == 1 process with batch 4 (shared memory is adapted on its micro-batch, so it
  legitimately depends on it: checked as a control);
- a run resumed at any step continues with the draws and weights of the uninterrupted run.

Everything runs in float64 (tests/topology.py): what is compared differs only by summation order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler

from bilevel_dlm import MemoryWrapper
from bilevel_dlm.data import EpochOrder, IndexedExamples, pad_collate
from bilevel_dlm.rng import KeyedRandom, uniform
from bilevel_dlm.trainer import MemDLMTrainer
from topology import GLOBAL_BATCH, MICRO_BATCH, STEPS, examples, model, recipe, trainer_arguments
from torchrun import launch_two_processes

WORKER = Path(__file__).with_name("topology_worker.py")
TOLERANCE = dict(atol=1e-9, rtol=1e-9)
MEMORY = {"shared": False, "per_sample": True}


def fit_run(per_sample: bool, batch_size: int, accumulation: int, **options):
    wrapper = MemoryWrapper(model(), recipe(per_sample))
    history = wrapper.fit(examples(), max_steps=STEPS, batch_size=batch_size,
                          gradient_accumulation_steps=accumulation, progress=False, **options)
    return history.outer_loss, {n: p.detach().clone() for n, p in wrapper.model.named_parameters()}


@pytest.fixture(scope="module")
def fit_runs() -> dict:
    """(memory, micro-batch, accumulation) -> (losses, weights) of fit."""
    return {(memory, batch, accumulation): fit_run(per_sample, batch, accumulation)
            for memory, per_sample in MEMORY.items()
            for batch, accumulation in ((GLOBAL_BATCH, 1), (MICRO_BATCH, GLOBAL_BATCH // MICRO_BATCH))}


def assert_same_run(got, expected, tolerance=TOLERANCE) -> None:
    (losses, weights), (expected_losses, expected_weights) = got, expected
    assert len(losses) == len(expected_losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(expected_losses, dtype=torch.float64), **tolerance)
    for name, value in weights.items():
        torch.testing.assert_close(value, expected_weights[name], **tolerance, msg=lambda m: f"{name}: {m}")


def weight_gap(a, b) -> float:
    return max((a[1][n] - b[1][n]).abs().max().item() for n in a[1])


def test_per_sample_memory_accumulation_equals_one_batch(fit_runs):
    assert_same_run(fit_runs["per_sample", MICRO_BATCH, 2], fit_runs["per_sample", GLOBAL_BATCH, 1])


def test_shared_memory_depends_on_the_micro_batch_it_adapts_on(fit_runs):
    """The control: one shared memory for 4 rows is not two memories for 2 rows each."""
    assert weight_gap(fit_runs["shared", MICRO_BATCH, 2], fit_runs["shared", GLOBAL_BATCH, 1]) > 1e-6


@pytest.mark.parametrize("memory", MEMORY)
def test_trainer_accumulating_in_one_process_equals_fit(fit_runs, memory, tmp_path):
    args = trainer_arguments(tmp_path, recipe(MEMORY[memory]), STEPS, per_device_train_batch_size=MICRO_BATCH,
                             gradient_accumulation_steps=GLOBAL_BATCH // MICRO_BATCH)
    trainer = MemDLMTrainer(model(), args, train_dataset=examples())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    weights = {n: p.detach() for n, p in trainer.memdlm.model.named_parameters()}
    # The Trainer logs its loss rounded to 4 significant digits; the weights carry the exact comparison.
    assert_same_run((losses, weights), fit_runs[memory, MICRO_BATCH, 2], dict(atol=1e-9, rtol=1e-3))
    for name, value in weights.items():
        torch.testing.assert_close(value, fit_runs[memory, MICRO_BATCH, 2][1][name], **TOLERANCE)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    return launch_two_processes(WORKER, tmp_path_factory.mktemp("topology"), timeout=300)


@pytest.mark.parametrize("memory", MEMORY)
def test_two_processes_equal_one_process_accumulating(two_processes, fit_runs, memory):
    record = torch.load(two_processes / f"{memory}.pt")
    assert record["world"] == 2
    expected = fit_runs[memory, MICRO_BATCH, 2]
    assert_same_run((record["losses"], record["weights"]), expected, dict(atol=1e-9, rtol=1e-3))
    for name, value in record["weights"].items():
        torch.testing.assert_close(value, expected[1][name], **TOLERANCE)
    if MEMORY[memory]:  # per-sample memory: also the single batch of 4
        for name, value in record["weights"].items():
            torch.testing.assert_close(value, fit_runs[memory, GLOBAL_BATCH, 1][1][name], **TOLERANCE)


def test_two_processes_resumed_within_the_second_epoch_continue_the_uninterrupted_run(two_processes):
    record = torch.load(two_processes / "resume.pt")
    for name, value in record["resumed"].items():
        torch.testing.assert_close(value, record["uninterrupted"][name], atol=1e-12, rtol=0)


def test_fit_resumed_at_any_step_continues_the_uninterrupted_run(fit_runs, tmp_path):
    uninterrupted = fit_run(False, MICRO_BATCH, 2, save_every=1, output_dir=tmp_path)
    assert_same_run(uninterrupted, fit_runs["shared", MICRO_BATCH, 2], dict(atol=0.0, rtol=0.0))
    for step in range(1, STEPS):
        wrapper = MemoryWrapper(model(), recipe(False))
        wrapper.generator.manual_seed(12345)  # keyed draws: the generator's state plays no part
        history = wrapper.fit(examples(), max_steps=STEPS, batch_size=MICRO_BATCH, gradient_accumulation_steps=2,
                              resume_from=tmp_path / f"checkpoint-{step}", progress=False)
        assert history.outer_loss == uninterrupted[0], step
        for name, value in wrapper.model.named_parameters():
            assert torch.equal(value, uninterrupted[1][name]), (step, name)


def test_trainer_resumed_mid_run_continues_the_uninterrupted_run(fit_runs, tmp_path):
    config = recipe(True)
    options = dict(per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=2, save_strategy="steps",
                   save_steps=1)
    MemDLMTrainer(model(), trainer_arguments(tmp_path, config, STEPS, **options), train_dataset=examples()).train()
    resumed = MemDLMTrainer(model(), trainer_arguments(tmp_path, config, STEPS, **options), train_dataset=examples())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.state.global_step == STEPS
    for name, value in resumed.memdlm.model.named_parameters():
        torch.testing.assert_close(value, fit_runs["per_sample", MICRO_BATCH, 2][1][name], **TOLERANCE)


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 23), seed=st.integers(0, 2**31), epoch=st.integers(0, 5), micro=st.integers(1, 4),
       world=st.integers(1, 4))
def test_the_global_order_is_split_over_ranks_and_micro_batches(size, seed, epoch, micro, world):
    """accelerate's own shard of the order (rank r takes global batches r, r + world, ...): every rank's
    micro-batches, read in step order, are the global order for any world size (when it divides evenly)."""
    order = EpochOrder(size, seed)
    order.set_epoch(epoch)
    expected = [index for _, index in order]
    assert sorted(expected) == list(range(size))
    assert {e for e, _ in order} == {epoch}
    shards = [list(BatchSamplerShard(BatchSampler(order, micro, drop_last=False), num_processes=world,
                                     process_index=rank, even_batches=False)) for rank in range(world)]
    merged = [pair for round_ in zip(*shards) for batch in round_ for pair in batch]
    full_rounds = size // (micro * world) * micro * world
    assert [index for _, index in merged[:full_rounds]] == expected[:full_rounds]


@settings(max_examples=20, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 3), st.integers(4, 40), st.integers(0, 3)),
                     min_size=1, max_size=4), seed=st.integers(0, 100), left=st.booleans())
def test_a_rows_draws_do_not_depend_on_its_batch_or_padding(rows, seed, left):
    """Anchor, trajectory and per-sample fast weights of each row are those it gets alone (in any batch,
    at any padded length, padded on the right or on the left)."""
    wrapper = MemoryWrapper(model(), recipe(True))
    generator = torch.Generator().manual_seed(seed)
    data = []
    for index, epoch, length, prompt in rows:
        ids = torch.randint(2, 127, (length,), generator=generator)
        data.append({"input_ids": ids, "labels": ids.masked_fill(torch.arange(length) < prompt, -100),
                     "example_index": index, "epoch": epoch})

    def draws(examples_, extra_padding):
        batch = pad_collate(examples_)
        batch = {k: torch.nn.functional.pad(v, (0, extra_padding), value=-100 if k == "labels" else 0)
                 if v.dim() == 2 else v for k, v in batch.items()}
        if left:  # move each row's padding to its left
            shifts = (batch["attention_mask"] == 0).sum(1)
            batch = {k: torch.stack([row.roll(int(n)) for row, n in zip(v, shifts)]) if v.dim() == 2 else v
                     for k, v in batch.items()}
        prepared = wrapper.prepare(batch)
        source = wrapper.random_source(prepared)
        anchor = wrapper.outer.sample_anchor(prepared.x0, prepared.maskable, source)
        stages = wrapper.inner.simulator(prepared.x0, prepared.maskable, anchor, 2, wrapper.mask_token_id, source)
        wrapper.memory.reset(batch_size=prepared.x0.shape[0], generator=source)
        real = prepared.attention_mask.bool()
        return [(anchor.t[b], anchor.masked[b][real[b]], [s.input_ids[b][real[b]] for s in stages],
                 [v[b] for v in wrapper.memory.values]) for b in range(real.shape[0])]

    together = draws(data, 3)
    for row, example in zip(together, data):
        alone = draws([example], 0)[0]
        assert torch.equal(row[0], alone[0]) and torch.equal(row[1], alone[1])
        assert all(torch.equal(a, b) for a, b in zip(row[2], alone[2]))
        assert all(torch.equal(a, b) for a, b in zip(row[3], alone[3]))


def test_indexed_examples_refuse_what_is_not_an_example():
    with pytest.raises(TypeError, match="training example 0 is a tuple"):
        IndexedExamples([(1, 2)])[0, 0]


def test_the_trainer_warns_once_when_batches_lose_their_example_index(tmp_path):
    def collate_without_keys(rows):
        return {k: v for k, v in pad_collate(rows).items() if k not in ("example_index", "epoch")}

    args = trainer_arguments(tmp_path, recipe(False), 2, per_device_train_batch_size=MICRO_BATCH)
    trainer = MemDLMTrainer(model(), args, train_dataset=examples(), data_collator=collate_without_keys)
    with pytest.warns(UserWarning, match="without 'example_index'") as caught:
        trainer.train()
    assert sum("example_index" in str(w.message) for w in caught) == 1


def test_a_keyed_source_refuses_a_shape_it_cannot_draw():
    source = KeyedRandom(0, torch.tensor([1, 2]), torch.ones(2, 10, dtype=torch.long))
    assert uniform((2, 10), source, "cpu").dtype == torch.float64
    for shape in ((2, 3), (4, 10)):
        with pytest.raises(ValueError, match="cannot draw one number per token"):
            uniform(shape, source, "cpu")


def test_the_trainer_on_an_iterable_dataset_equals_it_on_the_list_in_order(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(examples())

    runs = []
    for data in (examples(), Stream()):
        args = trainer_arguments(tmp_path, recipe(True), STEPS, per_device_train_batch_size=MICRO_BATCH,
                                 gradient_accumulation_steps=2, train_sampling_strategy="sequential")
        trainer = MemDLMTrainer(model(), args, train_dataset=data)
        trainer.train()
        runs.append({n: p.detach().clone() for n, p in trainer.memdlm.model.named_parameters()})
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, atol=1e-12, rtol=0)
    args = trainer_arguments(tmp_path, recipe(True), STEPS, dataloader_num_workers=2)
    with pytest.raises(NotImplementedError, match="iterable train dataset"):
        MemDLMTrainer(model(), args, train_dataset=Stream()).train()


def test_remove_unused_columns_keeps_the_example_keys(tmp_path):
    args = trainer_arguments(tmp_path, recipe(False), 1, per_device_train_batch_size=MICRO_BATCH,
                             remove_unused_columns=True)
    trainer = MemDLMTrainer(model(), args, train_dataset=examples())
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"example_index", "epoch", "input_ids", "labels"} <= set(batch)


def test_batches_of_a_dataloader_or_stream_are_keyed_by_epoch_and_position():
    """Without example indices of their own, the rows of a DataLoader's or an iterable's batches are keyed by
    their position in the epoch's stream, and the epoch counts the passes."""
    from torch.utils.data import DataLoader

    from bilevel_dlm.data import iterate_batches

    rows = examples()[:5]
    expected = [([0, 0], [0, 1]), ([0, 0], [2, 3]), ([0], [4]), ([1, 1], [0, 1]), ([1, 1], [2, 3]), ([1], [4])]
    for data in (DataLoader(rows, batch_size=2, collate_fn=pad_collate),
                 [pad_collate(rows[i:i + 2]) for i in range(0, 5, 2)]):
        stream = iterate_batches(data, 2)
        seen = [(batch["epoch"].tolist(), batch["example_index"].tolist()) for batch, _ in zip(stream, range(6))]
        assert seen == expected
