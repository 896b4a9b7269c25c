"""The README and the docs site say what the code does: every Python block of every page runs (blocks of a
page share one namespace, in order), the examples do what they claim, the configuration reference lists
every field of every config model, relative links resolve, the README stays a landing page, and the API
reference lists every public member of MemoryWrapper."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from bilevel_dlm import MemoryWrapper
from bilevel_dlm import config as config_module
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "<!-- not run:"  # a line right before a block's fence: why the block cannot run here
README_LIMIT = 12 * 1024


def python_blocks(page: Path) -> list[tuple[str, bool]]:
    """(code, runnable) for every ```python block of ``page``."""
    text = page.read_text()
    blocks = []
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        before = text[: match.start()].rstrip().splitlines()
        blocks.append((match.group(1), not (before and before[-1].startswith(NOT_RUN))))
    return blocks


def find_block(needle: str) -> str:
    found = [code for page in PAGES for code, _ in python_blocks(page) if needle in code]
    assert found, f"no Python block of the README or docs contains {needle!r}"
    return found[0]


def prelude() -> dict:
    """What a docs page may assume: a tiny LLaDA ``model``, its ``wrapper`` and two left-padded prompts."""
    torch.manual_seed(0)
    prompt_ids = torch.randint(2, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(prompt_ids)
    attention_mask[1, :2] = 0
    model = LLaDAModelLM(tiny_config())
    return {"model": model, "wrapper": MemoryWrapper(LLaDAModelLM(tiny_config()).eval()), "prompt_ids": prompt_ids,
            "attention_mask": attention_mask}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_of_the_page_runs(page):
    blocks = python_blocks(page)
    namespace = prelude()
    for code, runnable in blocks:
        compiled = compile(code, str(page), "exec")
        if runnable:
            exec(compiled, namespace)


def test_the_usage_example_trains_and_adapts():
    namespace: dict = {}
    exec(compile(find_block("wrapper.fit("), "README.md", "exec"), namespace)
    assert len(namespace["history"].outer_loss) == 20
    assert namespace["memory"].values[0].shape[0] == 2, "one memory per prompt"


def test_the_swapping_example_builds_what_it_says():
    namespace = prelude()
    exec(compile(find_block("inner_optimizer="), "getting-started.md", "exec"), namespace)
    assert namespace["config"].inner.optimizer == "adam" and namespace["config"].trajectory.kind == "progressive"
    metrics = namespace["wrapper"].step({"input_ids": torch.randint(2, 127, (4, 16))})
    assert len([k for k in metrics if k.startswith("inner_loss_")]) == 2


def test_the_plugging_example_trains_phi_0():
    from bilevel_dlm import CARTObjective

    namespace = prelude()
    exec(compile(find_block("meta_init="), "architecture.md", "exec"), namespace)
    wrapper = namespace["wrapper"]
    assert isinstance(wrapper.outer, CARTObjective) and wrapper.inner.initial.method == "fomaml"
    before = [p.detach().clone() for p in wrapper.inner.initial.values]
    wrapper.step({"input_ids": torch.randint(2, 127, (4, 16))})
    assert any(not torch.equal(a, b) for a, b in zip(wrapper.inner.initial.values, before))  # phi_0 trained
    for name in ("reptile", "maml", "cart"):
        MemoryWrapper(LLaDAModelLM(tiny_config()), namespace[name])


def test_the_generation_example_generates_past_each_prompt():
    namespace = prelude()
    exec(compile(find_block("wrapper.generate("), "generation.md", "exec"), namespace)
    assert namespace["out"].shape == (2, 6 + 64)


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_lists_every_field_of_every_model():
    hooks = _hooks()
    assert hooks.MARKER in (ROOT / "docs" / "configuration.md").read_text()
    sections = re.split(r"(?m)^## ", hooks.config_reference())[1:]
    listed = {section.split("\n", 1)[0]: re.findall(r"(?m)^\| `(\w+)` \|", section) for section in sections}
    expected = {name: list(getattr(config_module, name).model_fields) for name in config_module.__all__}
    assert listed == expected
    for name, fields in expected.items():
        for field, info in getattr(config_module, name).model_fields.items():
            assert info.description, f"{name}.{field} has no description for the reference"


def test_relative_links_of_the_readme_and_the_docs_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_is_a_landing_page():
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; move detail into docs/ (limit {README_LIMIT})"


def test_the_api_reference_lists_every_public_member_of_the_wrapper():
    text = (ROOT / "docs" / "api.md").read_text()
    listed = set(re.search(r"members: \[(.*?)\]", text, flags=re.S).group(1).replace("\n", " ").replace(" ", "")
                 .split(","))
    public = {name for name in vars(MemoryWrapper) if not name.startswith("_")}
    assert listed == public
