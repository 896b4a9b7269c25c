"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    usage = next(b for b in blocks if "wrapper.fit(" in b)
    namespace: dict = {}
    exec(compile(usage, "README.md", "exec"), namespace)
    assert len(namespace["history"].outer_loss) == 20


def test_readme_swapping_example_runs():
    import torch

    from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    swap = next(b for b in blocks if "inner_optimizer=" in b)
    namespace: dict = {"model": LLaDAModelLM(tiny_config())}
    exec(compile(swap, "README.md", "exec"), namespace)
    assert namespace["config"].inner.optimizer == "adam" and namespace["config"].trajectory.kind == "progressive"
    metrics = namespace["wrapper"].step({"input_ids": torch.randint(2, 127, (4, 16))})
    assert len([k for k in metrics if k.startswith("inner_loss_")]) == 2


def test_readme_plugging_example_runs():
    import torch

    from bilevel_dlm import CARTObjective
    from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    plug = next(b for b in blocks if "meta_init=" in b)
    namespace: dict = {"model": LLaDAModelLM(tiny_config())}
    exec(compile(plug, "README.md", "exec"), namespace)
    wrapper = namespace["wrapper"]
    assert isinstance(wrapper.outer, CARTObjective) and wrapper.inner.initial.method == "fomaml"
    before = [p.detach().clone() for p in wrapper.inner.initial.values]
    wrapper.step({"input_ids": torch.randint(2, 127, (4, 16))})
    assert any(not torch.equal(a, b) for a, b in zip(wrapper.inner.initial.values, before))  # phi_0 trained
    for name in ("reptile", "maml", "cart"):
        MemoryWrapper = namespace["MemoryWrapper"]
        MemoryWrapper(LLaDAModelLM(tiny_config()), namespace[name])


def test_readme_generation_example_runs():
    import torch

    from bilevel_dlm import MemoryWrapper
    from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "wrapper.generate(" in b and "cache=" in b)
    prompt_ids = torch.randint(2, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(prompt_ids)
    attention_mask[1, :2] = 0
    namespace = {"wrapper": MemoryWrapper(LLaDAModelLM(tiny_config()).eval()), "prompt_ids": prompt_ids,
                 "attention_mask": attention_mask}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["out"].shape == (2, 6 + 64)
