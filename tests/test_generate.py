"""MemoryWrapper.generate: per-sample prompt memory, equality with the plain sampler, isolation."""

import torch

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.sampling import LLaDASampler


def wrapper() -> MemoryWrapper:
    torch.manual_seed(0)
    # a large inner lr so that the prompt memory visibly changes what is generated
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.25), inner=InnerConfig(lr=20.0, clip=None))
    return MemoryWrapper(LLaDAModelLM(tiny_config()), config)


def prompts() -> torch.Tensor:
    return torch.randint(2, 120, (3, 10), generator=torch.Generator().manual_seed(1))


def test_batched_generation_with_prompt_memory_equals_each_row_alone():
    w = wrapper()
    ids = prompts()
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    batched = w.generate(ids, max_new_tokens=6, adapt=True, seed=3)
    for row in range(3):
        alone = w.generate(ids[row : row + 1], max_new_tokens=6, adapt=True, seed=3)
        assert torch.equal(batched[row], alone[0])
    assert all(torch.equal(before[k], v) for k, v in w.model.state_dict().items())
    assert not torch.equal(batched, w.generate(ids, max_new_tokens=6, adapt=False, seed=3)), \
        "the adapted memory must take part in sampling"


def test_without_adaptation_it_is_the_plain_sampler():
    w = wrapper()
    ids = prompts()
    ours = w.generate(ids, max_new_tokens=6, adapt=False, seed=0, block_length=3, steps=6)
    plain = LLaDASampler(block_length=3, steps=6).sample(w.view, ids, max_new_tokens=6,
                                                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours, plain.sequences)
    history = w.generate(ids, max_new_tokens=6, adapt=False, return_history=True)
    assert len(history.history) == 6 and torch.equal(history.sequences, w.generate(ids, max_new_tokens=6, adapt=False))


def test_memory_while_decoding_re_adapts_on_the_committed_blocks():
    w = wrapper()
    ids = prompts()
    one_block = dict(max_new_tokens=6, seed=3, block_length=6)
    assert torch.equal(w.generate(ids, adapt="blocks", **one_block), w.generate(ids, adapt="prompt", **one_block)), \
        "with one block there is nothing to refresh"
    two_blocks = dict(max_new_tokens=6, seed=3, block_length=3)
    out = w.generate(ids, adapt="blocks", **two_blocks)
    refreshed = w.prompt_memory.state()
    expected = w.adapt(out[:, :13], seed=3).state()  # the prompt and the first committed block
    assert all(torch.equal(refreshed[k], expected[k]) for k in expected)
    prompt_only = w.adapt(ids, seed=3).state()
    assert any(not torch.equal(refreshed[k], prompt_only[k]) for k in expected)
    for row in range(3):
        assert torch.equal(out[row], w.generate(ids[row:row + 1], adapt="blocks", **two_blocks)[0])


def test_memory_while_decoding_needs_a_block_sampler():
    import pytest

    from bilevel_dlm.sampling import MDLMSampler

    with pytest.raises(ValueError, match="does not decode in blocks"):
        wrapper().generate(prompts(), max_new_tokens=4, adapt="blocks", sampler=MDLMSampler())
    with pytest.raises(ValueError, match="adapt must be"):
        wrapper().generate(prompts(), max_new_tokens=4, adapt="always")
