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
