"""MemoryWrapper on the native tiny LLaDA: isolation, checkpointing, memory growth, errors, data."""

import copy
import gc
import resource

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig
from bilevel_dlm.adaptation import adapt_positions
from bilevel_dlm.data import pad_collate
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config

MASK = 127


def tiny_llada(seed: int = 0, **overrides) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return LLaDAModelLM(tiny_config(**overrides))


def config(**inner) -> MemDLMConfig:
    return MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.25), inner=InnerConfig(**inner),
                        outer=OuterConfig(lr=3e-3, warmup_ratio=0.0, lr_schedule="constant"))


def batch(n=3, length=16, prompt=4, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, MASK, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_step_and_adapt_leave_no_trace_in_the_model():
    model = tiny_llada()
    wrapper = MemoryWrapper(model, config())
    keys = set(model.state_dict())
    wrapper.step(batch())
    assert set(model.state_dict()) == keys
    optimized = {id(p) for group in wrapper.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}, "only theta is in the optimizer"
    assert wrapper.memory._values == (), "memory is dropped after the step (reset for the next batch)"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memory = wrapper.adapt(batch()["input_ids"])
    assert memory.values[0].shape[0] == 3, "per-sample memory for a batch"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "adapt changed base weights"
    assert all(p.grad is None for p in model.parameters())
    assert hook_count(model) == 0


def test_hooks_and_rss_stay_flat_over_100_first_order_steps():
    model = tiny_llada()
    wrapper = MemoryWrapper(model, config())
    batches = [batch(seed=s) for s in range(4)]
    for i in range(10):
        wrapper.step(batches[i % 4])
    gc.collect()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(100):
        wrapper.step(batches[i % 4])
    gc.collect()
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / start - 1
    assert growth < 0.02, f"peak RSS grew by {growth:.1%}"
    assert hook_count(model) == 0


@pytest.mark.parametrize("mode", ["first_order", "unrolled"])
def test_gradient_checkpointing_gives_the_same_gradients_with_memory_bound(mode):
    grads = []
    for checkpointing in (False, True):
        model = tiny_llada()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        wrapper = MemoryWrapper(model, config(mode=mode))
        with wrapper.bilevel_context():
            loss, inner, _ = wrapper.compute_loss(wrapper.prepare(batch()))
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_unrolled_metasgd_trains_its_rates_on_llada():
    model = tiny_llada()
    wrapper = MemoryWrapper(model, config(mode="unrolled", optimizer="metasgd"))
    rates = wrapper.inner.optimizer.log_lr.detach().clone()
    wrapper.step(batch())
    assert not torch.equal(rates, wrapper.inner.optimizer.log_lr.detach())


def test_per_sample_adaptation_equals_adapting_each_row_alone():
    model = tiny_llada()
    wrapper = MemoryWrapper(model, config())
    ids = batch(3, 12)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a right-padded row
    together = wrapper.adapt(ids, mask, seed=5).state()
    for row in range(3):
        length = int(mask[row].sum())
        alone = wrapper.adapt(ids[row : row + 1, :length], seed=5).state()
        for name, value in together.items():
            assert torch.allclose(value[row], alone[name], atol=1e-5), (row, name)
    assert not torch.allclose(together[name][0], together[name][2]), "rows must adapt differently"


def test_prompt_memory_never_sees_the_scored_tokens():
    model = tiny_llada()
    wrapper = MemoryWrapper(model, config())
    data = batch(2, 16, prompt=6)
    other = copy.deepcopy(data)
    other["input_ids"][:, 6:] = (other["input_ids"][:, 6:] + 7) % 120 + 2
    other["labels"] = torch.where(other["labels"] != -100, other["input_ids"], -100)
    states = []
    for d in (data, other):
        prepared = wrapper.prepare(d)
        states.append(adapt_positions(wrapper, prepared.x0, prepared.prompt, prepared.prompt.long(), seed=0).state())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    off, prompt = wrapper.eval_loss([data], memory="off"), wrapper.eval_loss([data], memory="prompt")
    assert off != prompt and abs(off - prompt) / off < 0.5


def test_missing_mask_token_id_is_a_clear_error():
    model = tiny_llada()
    model.config.mask_token_id = None
    with pytest.raises(ValueError, match="mask_token_id"):
        MemoryWrapper(model, config())
    assert MemoryWrapper(model, config(), mask_token_id=MASK).mask_token_id == MASK


def test_batch_without_maskable_tokens_is_skipped_and_counted():
    wrapper = MemoryWrapper(tiny_llada(), config())
    empty = batch()
    empty["labels"][:] = -100
    assert wrapper.step(empty)["skipped"] == 1.0 and wrapper.skipped_batches == 1
    history = wrapper.fit([empty, batch()], max_steps=2, batch_size=3, progress=False)
    assert len(history.outer_loss) == 2 and history.skipped_batches >= 1


@pytest.mark.parametrize("bad", [{"input_ids": torch.zeros(4, dtype=torch.long)},
                                 {"input_ids": torch.zeros(2, 4)},
                                 {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 3, dtype=torch.long)},
                                 {"tokens": torch.zeros(2, 4, dtype=torch.long)}])
def test_malformed_batches_raise(bad):
    with pytest.raises((ValueError, TypeError, KeyError)):
        MemoryWrapper(tiny_llada(), config()).step(bad)


class Examples(Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_fit_accepts_examples_datasets_and_dataloaders_and_lowers_the_loss():
    b = batch(4, 16, seed=3)
    examples = [{k: v[i] for k, v in b.items()} for i in range(4)]
    for data in (examples, Examples(examples), DataLoader(Examples(examples), batch_size=4, collate_fn=pad_collate)):
        wrapper = MemoryWrapper(tiny_llada(), config())
        before = wrapper.eval_loss(examples)
        history = wrapper.fit(data, eval_data=examples, max_steps=30, batch_size=4, eval_every=15, progress=False)
        assert len(history.outer_loss) == 30 and len(history.inner_losses[0]) == 2
        assert history.eval_steps == [15, 30] and len(history.eval_loss_prompt_memory) == 2
        assert history.eval_loss[-1] < before


def test_step_before_fit_uses_the_configured_lr_without_a_horizon():
    wrapper = MemoryWrapper(tiny_llada(), MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.25)))
    wrapper.step(batch())
    assert wrapper.optimizer.param_groups[0]["lr"] == wrapper.config.outer.lr
