"""The bilevel machinery on every built-in backbone: training, hook placement, adaptation, Dream's shift.

Each backbone is a tiny random model with 4 blocks, so ``layer_fraction`` selects a known set of blocks
(0.25 -> block 3, 0.5 -> blocks 2 and 3). Expected fast-weight targets are written out here from each
family's published module layout (shared/BACKBONES.md) and its config, not taken from the adapters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryParams, MemoryWrapper, OuterConfig
from bilevel_dlm.backbone import detect_backbone
from bilevel_dlm.integrations import dream, llada, llada2, llada_moe, mdlm
from bilevel_dlm.noise import Anchor, LinearSchedule, keyed_anchor

MASK = 127  # every tiny config uses the last id of a 128-token vocabulary as the mask
DREAM_BOS = 126
N_BLOCKS = 4
SELECTED_BLOCKS = {0.25: (3,), 0.5: (2, 3)}
GLU = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """A tiny model of one family and its module layout, written out independently of the adapter."""

    build: Callable[[int], nn.Module]
    blocks_path: str
    ffn: Callable[[nn.Module], tuple[str, ...]]
    attention: tuple[str, ...]
    bos: int | None = None


def _moe_ffn(model: nn.Module) -> tuple[str, ...]:
    config = model.config
    experts = tuple(f"mlp.experts.{e}.{name}" for e in range(config.num_experts) for name in GLU)
    shared = tuple(f"shared_expert.{name}" for name in GLU) if config.shared_expert_intermediate_size else ()
    return experts + shared


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return factory()
    return build


# real routing (top-2 of 4): some experts may get no token in a stage (also tested on its own below).
_MOE_SIZES = dict(num_hidden_layers=N_BLOCKS, num_experts=4, num_experts_per_tok=2)

FAMILIES = {
    "llada": Family(
        build=_seeded(lambda: llada.LLaDAModelLM(llada.tiny_config(n_layers=N_BLOCKS))),
        blocks_path="model.transformer.blocks",
        ffn=lambda model: ("ff_proj", "up_proj", "ff_out"),
        attention=("q_proj", "k_proj", "v_proj", "attn_out"),
    ),
    "llada_moe": Family(
        build=_seeded(lambda: llada_moe.LLaDAMoEModelLM(llada_moe.tiny_config(**_MOE_SIZES))),
        blocks_path="model.layers",
        ffn=_moe_ffn,
        attention=tuple(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    ),
    "llada_moe_shared": Family(
        build=_seeded(lambda: llada_moe.LLaDAMoEModelLM(llada_moe.tiny_config(shared_expert=True, **_MOE_SIZES))),
        blocks_path="model.layers",
        ffn=_moe_ffn,
        attention=tuple(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    ),
    "dream": Family(
        build=_seeded(lambda: dream.DreamModel(dream.tiny_config(num_hidden_layers=N_BLOCKS))),
        blocks_path="model.layers",
        ffn=lambda model: tuple(f"mlp.{name}" for name in GLU),
        attention=tuple(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
        bos=DREAM_BOS,
    ),
    "llada2": Family(
        build=_seeded(lambda: llada2.LLaDA2MoeModelLM(llada2.tiny_config(num_hidden_layers=N_BLOCKS))),
        blocks_path="model.layers",
        ffn=lambda model: tuple(f"mlp.experts.{e}.{name}" for e in range(model.config.num_experts) for name in GLU)
        + tuple(f"mlp.shared_experts.{name}" for name in GLU),
        attention=("attention.query_key_value", "attention.dense"),
    ),
    "mdlm": Family(
        build=lambda seed: mdlm.build_tiny_model(seed=seed, n_blocks=N_BLOCKS),
        blocks_path="backbone.blocks",
        ffn=lambda model: ("mlp.0", "mlp.2"),
        attention=("attn_qkv", "attn_out"),
    ),
}


def confident(model: nn.Module, scale: float = 60.0) -> nn.Module:
    """``model`` with its output head scaled by ``scale``: a random tiny model's token probabilities (about
    1 / vocab) then spread over (0, 1), so threshold and factor decoding have confidences to act on."""
    with torch.no_grad():
        detect_backbone(model).output_head(model).weight.mul_(scale)
    return model


def recipe(layer_fraction: float = 0.25, targets="ffn", seed: int = 0) -> MemDLMConfig:
    """Small fast weights, constant outer lr. t_eps = 0.2 keeps the 1/t weight (and the per-step
    loss variance) bounded so that 20 steps on 8 sequences show a clear trend."""
    return MemDLMConfig(
        memory=MemoryConfig(layer_fraction=layer_fraction, rank=4, targets=targets),
        outer=OuterConfig(lr=3e-3, warmup_ratio=0.0, lr_schedule="constant", t_eps=0.2),
        seed=seed,
    )


def make_batch(bos: int | None, n: int = 8, length: int = 16, prompt: int = 4, seed: int = 0) -> dict:
    """Random tokens (never the mask), the first ``prompt`` positions labelled -100; BOS first if given."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (n, length), generator=generator)
    if bos is not None:
        ids[:, 0] = bos
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def hooked_modules(model: nn.Module) -> dict[str, int]:
    """Module path -> number of forward hooks, for every module that has any."""
    return {name: len(m._forward_hooks) for name, m in model.named_modules() if m._forward_hooks}


def hook_total(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not), copied."""
    tensors = dict(model.named_parameters())
    tensors.update({f"buffer:{name}": b for name, b in model.named_buffers()})
    return {name: t.detach().clone() for name, t in tensors.items()}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they made these tests
    ~50x slower (threads waiting on each other), so run single-threaded and restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- training ---------------------------------------------------------------------------------------
FIT_STEPS = {"llada2": 40}  # its q/k-normed attention starts flatter and needs more steps for the same drop


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fit_lowers_the_outer_loss(name: str) -> None:
    family = FAMILIES[name]
    wrapper = MemoryWrapper(family.build(0), recipe())
    data = [make_batch(family.bos)]
    before = wrapper.eval_loss(data, memory="off")
    steps = FIT_STEPS.get(name, 20)
    history = wrapper.fit(data, max_steps=steps, progress=False)
    after = wrapper.eval_loss(data, memory="off")
    losses = history.outer_loss
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, f"{name}: outer loss {first:.3f} -> {last:.3f}"
    # Same anchors before and after (eval_loss draws them from a fixed seed): a noise-free comparison.
    assert after < 0.9 * before, f"{name}: eval loss {before:.3f} -> {after:.3f}"


# ----- hook placement ---------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", ["ffn", "ffn+attention"])
@pytest.mark.parametrize("fraction", sorted(SELECTED_BLOCKS))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bound_memory_hooks_exactly_the_expected_modules(name: str, fraction: float, targets: str) -> None:
    family = FAMILIES[name]
    model = family.build(0)
    wrapper = MemoryWrapper(model, recipe(layer_fraction=fraction, targets=targets))
    names = family.ffn(model) + (family.attention if targets == "ffn+attention" else ())
    expected = {f"{family.blocks_path}.{i}.{n}" for i in SELECTED_BLOCKS[fraction] for n in names}
    assert hooked_modules(model) == {}
    with wrapper.memory.bind():
        hooked = hooked_modules(model)
        assert len(hooked) == len(expected)
        assert set(hooked) == expected
        assert set(hooked.values()) == {1}
    assert hooked_modules(model) == {}


def test_moe_target_count_follows_the_expert_and_shared_expert_config() -> None:
    """Experts x 3 per selected block, + 3 for the shared expert: counted from the config alone."""
    for shared in (False, True):
        config = llada_moe.tiny_config(shared_expert=shared, num_hidden_layers=N_BLOCKS, num_experts=5)
        memory = MemoryParams(llada_moe.LLaDAMoEModelLM(config), MemoryConfig(layer_fraction=0.5, rank=2))
        per_block = config.num_experts * 3 + (3 if shared else 0)
        assert len(memory.targets) == len(SELECTED_BLOCKS[0.5]) * per_block
        assert len(memory.names) == 2 * len(memory.targets)  # lora_A and lora_B


# ----- inference-time adaptation ----------------------------------------------------------------------
SHARED_EXPERT_ONLY = tuple(f"shared_expert.{name}" for name in GLU)
ADAPT_CASES = {
    "llada": "ffn",
    "dream": "ffn",
    "mdlm": "ffn",
    # Routed experts refuse per-sample memory (see below); the shared expert runs on [B, L, d].
    "llada_moe_shared": SHARED_EXPERT_ONLY,
}


@pytest.mark.parametrize("name", sorted(ADAPT_CASES))
def test_adapt_leaves_the_base_model_bitwise_unchanged(name: str) -> None:
    family = FAMILIES[name]
    model = family.build(0).train()
    wrapper = MemoryWrapper(model, recipe(targets=ADAPT_CASES[name]))
    prompt = make_batch(family.bos, n=2, seed=3)["input_ids"]
    probe = prompt.clone()
    probe[:, 1::2] = MASK  # masked inputs, so MDLM's SUBS logits are not just carried-over tokens
    before, hooks_before = snapshot(model), hook_total(model)
    with torch.no_grad():
        logits_before = wrapper.view.logits(probe)

    memory = wrapper.adapt(prompt)

    after = snapshot(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not bitwise_equal(before[k], after[k])]
    assert not changed, f"adapt modified {changed[:5]}"
    assert all(p.grad is None for p in model.parameters())
    assert hook_total(model) == hooks_before == 0
    assert model.training, "adapt must restore the model's mode"
    lora_b = [v for n, v in zip(memory.names, memory.values) if n.endswith("lora_B")]
    assert all(v.shape[0] == 2 for v in memory.values), "one memory per prompt"
    assert any(bool(v.abs().sum() > 0) for v in lora_b), "adaptation did not move the fast weights"
    with torch.no_grad():
        with memory.bind():
            adapted = wrapper.view.logits(probe)
        unbound = wrapper.view.logits(probe)
    assert not torch.allclose(adapted, logits_before)
    assert torch.equal(unbound, logits_before), "unbinding must restore the model exactly"


# ----- LLaDA-MoE: token-mixing experts -----------------------------------------------------------------
class UndeclaredRoutingBlock(nn.Module):
    """An MoE block of another class that routes like the native one but declares no routed tokens
    (as the release's remote code does not)."""

    def __init__(self, native: nn.Module) -> None:
        super().__init__()
        self.gate, self.experts, self.top_k = native.gate, native.experts, native.top_k

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.reshape(-1, hidden.shape[-1])
        weights, chosen = F.softmax(self.gate(tokens), dim=-1, dtype=torch.float32).topk(self.top_k, dim=-1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if len(rows):
                out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slot, None].to(tokens.dtype))
        return out.view_as(hidden)


def test_moe_per_sample_memory_on_experts_needs_declared_routing() -> None:
    model = FAMILIES["llada_moe"].build(0)
    assert len(MemoryParams(model, MemoryConfig(layer_fraction=0.25, rank=4), per_sample=True).targets) == 12
    for layer in model.model.layers:
        layer.mlp = UndeclaredRoutingBlock(layer.mlp)
    with pytest.raises(ValueError, match=r"per-sample(?s:.*)experts(?s:.*)native model class"):
        MemoryParams(model, MemoryConfig(layer_fraction=0.25, rank=4), per_sample=True)
    wrapper = MemoryWrapper(model, recipe())
    with pytest.raises(ValueError, match=r"per-sample(?s:.*)experts"):
        wrapper.adapt(make_batch(None, n=2)["input_ids"])


def test_moe_per_sample_memory_off_the_experts_is_allowed() -> None:
    model = FAMILIES["llada_moe_shared"].build(0)
    attention = FAMILIES["llada_moe_shared"].attention
    for targets in (SHARED_EXPERT_ONLY, attention):
        memory = MemoryParams(model, MemoryConfig(layer_fraction=0.25, rank=4, targets=targets), per_sample=True)
        assert len(memory.targets) == len(targets)


def test_moe_adapt_on_a_single_prompt_works() -> None:
    model = FAMILIES["llada_moe"].build(0)
    wrapper = MemoryWrapper(model, recipe())
    before = snapshot(model)
    memory = wrapper.adapt(make_batch(None, n=1)["input_ids"])
    assert all(bitwise_equal(before[k], v) for k, v in snapshot(model).items())
    assert any(bool(v.abs().sum() > 0) for n, v in zip(memory.names, memory.values) if n.endswith("lora_B"))


def test_moe_step_with_experts_that_receive_no_token() -> None:
    # 8 experts, top-1, 4 tokens per forward: at least 4 experts get no token (pigeonhole).
    torch.manual_seed(0)
    config = llada_moe.tiny_config(num_hidden_layers=N_BLOCKS, num_experts=8, num_experts_per_tok=1)
    wrapper = MemoryWrapper(llada_moe.LLaDAMoEModelLM(config), recipe())
    batch = make_batch(None, n=1, length=4, prompt=1)
    metrics = wrapper.step(batch)
    assert math.isfinite(metrics["outer_loss"])


# ----- Dream: realigned logits and the protected BOS ---------------------------------------------------
def _mdlm_loss(logits: torch.Tensor, x0: torch.Tensor, maskable: torch.Tensor, anchor: Anchor) -> torch.Tensor:
    """sum over masked positions of CE / t, divided by the number of maskable tokens (linear schedule)."""
    rows = torch.arange(x0.shape[0])[:, None].expand_as(x0)[anchor.masked]
    ce = F.cross_entropy(logits[anchor.masked], x0[anchor.masked], reduction="none")
    return (ce / anchor.t[rows]).sum() / maskable.sum()


def _realign(raw: torch.Tensor) -> torch.Tensor:
    return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)


def test_dream_outer_loss_uses_realigned_logits() -> None:
    model = FAMILIES["dream"].build(0).eval()
    wrapper = MemoryWrapper(model, recipe())
    batch = wrapper.prepare(make_batch(DREAM_BOS, n=3))
    x0, maskable = batch.x0, batch.maskable
    masked = maskable & (torch.arange(x0.shape[1]) % 3 == 1)
    anchor = Anchor(t=masked.sum(1) / maskable.sum(1), masked=masked, input_ids=torch.where(masked, MASK, x0))
    with torch.no_grad():
        library = wrapper.outer.loss(x0, maskable, anchor, batch.attention_mask)
        raw = model(anchor.input_ids).logits
    torch.testing.assert_close(library, _mdlm_loss(_realign(raw), x0, maskable, anchor))
    # A random model's logits are near uniform, so the gap is small, but far above float32 noise.
    assert abs(float(library - _mdlm_loss(raw, x0, maskable, anchor))) > 1e-3


def test_dream_eval_loss_uses_realigned_logits() -> None:
    model = FAMILIES["dream"].build(0)
    config = recipe()
    wrapper = MemoryWrapper(model, config)
    data = make_batch(DREAM_BOS, n=3)
    library = wrapper.eval_loss([data], memory="off", seed=7)
    # eval_loss draws each example's anchor from its own tokens and `seed`.
    prepared = wrapper.prepare(data)
    x0, maskable = prepared.x0, prepared.maskable
    anchor = keyed_anchor(x0, maskable, prepared.attention_mask, LinearSchedule(), MASK, config.outer.t_eps, 7)
    assert bool(anchor.masked.any())
    with torch.no_grad():
        raw = model.eval()(anchor.input_ids).logits
    assert library == pytest.approx(float(_mdlm_loss(_realign(raw), x0, maskable, anchor)), rel=1e-5)
    assert abs(library - float(_mdlm_loss(raw, x0, maskable, anchor))) > 1e-3


def test_dream_never_masks_the_bos_even_when_labels_supervise_it() -> None:
    model = FAMILIES["dream"].build(0)
    wrapper = MemoryWrapper(model, recipe())
    data = make_batch(DREAM_BOS, n=4, prompt=0)  # labels == input_ids everywhere, BOS included
    assert bool((data["labels"][:, 0] == DREAM_BOS).all())
    prepared = wrapper.prepare(data)
    assert not bool(prepared.maskable[:, 0].any())
    assert bool(prepared.maskable[:, 1:].all())

    seen: list[torch.Tensor] = []
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        for _ in range(5):  # inner stages and outer pass of several training steps
            wrapper.step(data)
        wrapper.eval_loss([make_batch(DREAM_BOS, n=4)], memory="prompt")
        wrapper.adapt(data["input_ids"])
    finally:
        handle.remove()
    inputs = torch.cat(seen)
    assert len(seen) >= 5 * 3
    assert bool((inputs[:, 0] == DREAM_BOS).all()), "position 0 (BOS) was masked"
    assert bool((inputs[:, 1:] == MASK).any()), "nothing was masked at all: the check above is vacuous"
