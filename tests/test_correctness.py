"""Regression tests for options that once gave wrong numbers without an error (issue #8).

Each test names the defect it guards against; tests/test_option_matrix.py checks the same properties
over the whole cross product of options.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper, TrajectoryConfig
from bilevel_dlm.integrations import llada, mdlm
from bilevel_dlm.losses import token_loss
from bilevel_dlm.sampling import LLaDASampler
from bilevel_dlm.diagnostics import HostSyncCounter, LiveTensorBytes
from test_backbones_bilevel import FAMILIES, make_batch, recipe
from test_option_matrix import PAD, one_step

ALL = sorted(FAMILIES)


def _config(**inner) -> MemDLMConfig:
    return recipe(layer_fraction=0.5).model_copy(update={"inner": InnerConfig(**inner)})


# ----- 1. teacher losses and the shared prefix ------------------------------------------------------
@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "hidden_mse", "hidden_cosine"])
def test_teacher_forward_does_not_overwrite_the_recorded_prefix(loss: str) -> None:
    """The teacher's forward on the clean x0 once replaced the recorded early-block outputs: the outer
    loss then saw x0 (answer leak) and the embeddings got no gradient."""
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5, dtype="float64"), inner=InnerConfig(loss=loss))
    batch = make_batch(None, n=3, length=12, seed=1)
    _, shared, _, grads = one_step("llada", config, batch, "off", share=True)
    _, plain, _, plain_grads = one_step("llada", config, batch, "off", share=False)
    torch.testing.assert_close(shared, plain, rtol=1e-12, atol=0)
    embedding = "model.transformer.wte.weight"
    assert float(grads[embedding].norm()) > 0
    torch.testing.assert_close(grads[embedding], plain_grads[embedding], rtol=1e-10, atol=1e-14)


# ----- 2. reentrant activation checkpointing --------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_reentrant_checkpointing_raises_instead_of_silently_not_adapting(name: str) -> None:
    model = FAMILIES[name].build(0).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    wrapper = MemoryWrapper(model, _config())
    with pytest.raises(RuntimeError, match="use_reentrant"):
        wrapper.step(make_batch(FAMILIES[name].bos))


@pytest.mark.parametrize("name", ALL)
def test_non_reentrant_checkpointing_adapts_the_same_fast_weights(name: str) -> None:
    states = []
    for checkpointing in (False, True):
        model = FAMILIES[name].build(0).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        wrapper = MemoryWrapper(model, _config())
        batch = wrapper.prepare(make_batch(FAMILIES[name].bos))
        anchor = wrapper.outer.sample_anchor(batch.x0, batch.maskable, wrapper.generator)
        result = wrapper.inner.run(batch.x0, batch.maskable, anchor, None, generator=wrapper.generator)
        assert (result.grad_norms > 0).all()
        states.append(wrapper.memory.state())
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=1e-5, atol=1e-7)


# ----- 3. reverse_kl against SUBS's one-hot teacher -------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "hidden_mse", "hidden_cosine"])
def test_teacher_losses_keep_the_model_finite(name: str, loss: str) -> None:
    model = FAMILIES[name].build(0)
    wrapper = MemoryWrapper(model, _config(loss=loss))
    for seed in range(3):
        metrics = wrapper.step(make_batch(FAMILIES[name].bos, seed=seed))
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert metrics["inner_grad_norm_0"] > 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_reverse_kl_is_finite_and_positive_against_a_one_hot_teacher() -> None:
    student = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    one_hot = torch.full((5, 11), float("-inf"), dtype=torch.float64).scatter(1, torch.arange(5)[:, None], 0.0)
    loss = token_loss("reverse_kl", student, None, teacher_logits=one_hot)
    assert torch.isfinite(loss).all() and (loss > 0).all()
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()
    # Against a teacher with full support the smoothing changes KL(p || q) by a negligible amount.
    teacher = torch.randn(5, 11, dtype=torch.float64)
    p, q = student.detach().log_softmax(-1), teacher.log_softmax(-1)
    exact = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(token_loss("reverse_kl", student.detach(), None, teacher_logits=teacher), exact,
                               rtol=1e-4, atol=0)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
def test_a_nan_in_the_logits_stays_nan_in_the_loss(kind: str) -> None:
    """A `p > 0` test once turned NaN probabilities into a reported zero loss."""
    logits = torch.randn(3, 7)
    logits[1, 2] = float("nan")
    loss = token_loss(kind, logits, None, teacher_logits=torch.randn(3, 7))
    assert bool(torch.isnan(loss[1])) and torch.isfinite(loss[[0, 2]]).all()


# ----- 4. padding layouts and per-sample prompt memory ----------------------------------------------
def _layout(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, place], mask[i, place] = row, 1
    return ids, mask


def _prompts(name: str, lengths=(9, 6, 11, 7)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(2, 100, (n,), generator=generator) for n in lengths]
    bos = FAMILIES[name].bos
    return [torch.cat([torch.tensor([bos]), row[1:]]) if bos is not None else row for row in rows]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ALL)
def test_batch_prompt_memory_equals_each_prompt_alone(name: str, side: str) -> None:
    """Row-shared draws were indexed by absolute column, so a left-padded row got another memory."""
    wrapper = MemoryWrapper(FAMILIES[name].build(0), recipe())
    rows = _prompts(name)
    ids, mask = _layout(rows, side)
    together = wrapper.adapt(ids, mask, seed=3).state()
    for i, row in enumerate(rows):
        alone = wrapper.adapt(row[None], seed=3).state()
        for key, value in alone.items():
            torch.testing.assert_close(together[key][i], value[0] if value.dim() == together[key].dim() else value,
                                       rtol=0, atol=1e-6, msg=lambda m: f"row {i} {key}: {m}")


@pytest.mark.parametrize("name", ALL)
def test_left_padded_generation_equals_each_prompt_alone(name: str) -> None:
    wrapper = MemoryWrapper(FAMILIES[name].build(0), recipe())
    rows = _prompts(name)
    ids, mask = _layout(rows, "left")
    # MDLM's ancestral sampler draws independent noise per row; the greedy LLaDA sampler is deterministic.
    sampler = LLaDASampler() if name == "mdlm" else None
    together = wrapper.generate(ids, mask, max_new_tokens=4, adapt=True, seed=2, sampler=sampler)
    for i, row in enumerate(rows):
        alone = wrapper.generate(row[None], max_new_tokens=4, adapt=True, seed=2, sampler=sampler)
        assert torch.equal(together[i, -4:], alone[0, -4:]), f"row {i}"


def test_dream_protects_the_first_real_token_of_a_left_padded_row() -> None:
    wrapper = MemoryWrapper(FAMILIES["dream"].build(0), recipe())
    ids, mask = _layout(_prompts("dream"), "left")
    prepared = wrapper.prepare({"input_ids": ids, "attention_mask": mask})
    first_real = mask.argmax(1)
    assert bool((ids[torch.arange(len(ids)), first_real] == FAMILIES["dream"].bos).all())
    assert not bool(prepared.maskable[torch.arange(len(ids)), first_real].any()), "the BOS became maskable"
    assert int(prepared.maskable.sum()) == int(mask.sum()) - len(ids)


# ----- 5. per-prompt memory on MoE batches -----------------------------------------------------------
@pytest.mark.parametrize("name", ["llada_moe", "llada_moe_shared"])
def test_moe_batch_prompt_memory_and_tokens_equal_each_prompt_alone(name: str) -> None:
    wrapper = MemoryWrapper(FAMILIES[name].build(0), recipe())
    rows = _prompts(name, lengths=(9, 9, 9, 9))
    ids = torch.stack(rows)
    together = wrapper.adapt(ids, seed=1).state()
    tokens = wrapper.generate(ids, max_new_tokens=4, seed=1)
    for i, row in enumerate(rows):
        alone = wrapper.adapt(row[None], seed=1).state()
        for key, value in alone.items():
            torch.testing.assert_close(together[key][i], value, rtol=0, atol=1e-6)
        assert torch.equal(tokens[i], wrapper.generate(row[None], max_new_tokens=4, seed=1)[0])
    assert not torch.allclose(together[key][0], together[key][1]), "rows must adapt differently"


def test_moe_prompt_memory_evaluation_and_fit_with_eval_data_run_on_batches() -> None:
    wrapper = MemoryWrapper(FAMILIES["llada_moe_shared"].build(0), recipe())
    data = [make_batch(None, n=4, seed=s) for s in range(2)]
    history = wrapper.fit(data, eval_data=data, max_steps=2, progress=False)
    assert len(history.eval_loss_prompt_memory) == 1 and math.isfinite(history.eval_loss_prompt_memory[0])


# ----- 6. dropout below the first fast weight ----------------------------------------------------------
DROPOUT = {
    "llada": dict(embedding_dropout=0.1, residual_dropout=0.1, attention_dropout=0.1),
    "dream": dict(attention_dropout=0.1),
    "llada_moe": dict(attention_dropout=0.1),
    "llada_moe_shared": dict(attention_dropout=0.1),
    "mdlm": dict(dropout=0.1),
    "llada2": dict(attention_dropout=0.1),
}


@pytest.mark.parametrize("name", ALL)
def test_prefix_sharing_falls_back_to_recomputation_under_dropout(name: str) -> None:
    """The outer pass once reused the inner pass's dropout masks for the early blocks."""
    results = []
    for share in (True, False):
        model = FAMILIES[name].build(0)
        for key, value in DROPOUT[name].items():
            setattr(model.config, key, value)
        model = type(model)(model.config)  # rebuilt with dropout, same seed below for every arm
        torch.manual_seed(0)
        model.load_state_dict(FAMILIES[name].build(0).state_dict())
        model.train()
        wrapper = MemoryWrapper(model, _config())
        wrapper.share_prefix = share
        torch.manual_seed(1)
        with wrapper.bilevel_context():
            loss, _, _ = wrapper.compute_loss(wrapper.prepare(make_batch(FAMILIES[name].bos)))
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (shared, shared_grads), (plain, plain_grads) = results
    torch.testing.assert_close(shared, plain, rtol=0, atol=0)
    for a, b in zip(shared_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----- 7. the releases' own forward signatures -------------------------------------------------------
class ReleaseSignatureMDLM(mdlm.MDLM):
    """The MDLM release's forward signature: ``forward(input_ids, timesteps, output_hidden_states,
    return_dict)``, no attention mask."""

    def forward(self, input_ids=None, timesteps=None, output_hidden_states=None, return_dict=None):
        return super().forward(input_ids, timesteps, output_hidden_states=output_hidden_states)


def test_the_mdlm_adapter_drives_a_model_without_an_attention_mask_parameter() -> None:
    native = FAMILIES["mdlm"].build(0)
    release = ReleaseSignatureMDLM(native.config)
    release.load_state_dict(native.state_dict())
    wrapper = MemoryWrapper(release, recipe())
    batch = make_batch(None)
    assert math.isfinite(wrapper.step(batch)["outer_loss"])
    padded = copy.deepcopy(batch)
    padded["attention_mask"][0, -3:] = 0
    with pytest.raises(ValueError, match="cannot hide padding"):
        wrapper.step(padded)


# ----- 8. eval_loss aggregates over the data set ---------------------------------------------------------
def _eval_examples() -> list[dict]:
    """Examples of very different response lengths, so batch means and the token mean differ."""
    generator = torch.Generator().manual_seed(5)
    examples = []
    for prompt, length in ((2, 16), (12, 16), (3, 10), (9, 10), (1, 14), (13, 14), (4, 8)):
        ids = torch.randint(2, 100, (length,), generator=generator)
        labels = ids.clone()
        labels[:prompt] = -100
        examples.append({"input_ids": ids, "labels": labels})
    return examples


@pytest.mark.parametrize("memory", ["off", "prompt"])
def test_eval_loss_does_not_depend_on_the_batch_size(memory: str) -> None:
    wrapper = MemoryWrapper(FAMILIES["llada"].build(0), recipe())
    examples = _eval_examples()
    values = [wrapper.eval_loss(examples, memory=memory, batch_size=size) for size in (1, 2, 3, 7)]
    for value in values[1:]:
        assert value == pytest.approx(values[0], rel=1e-5)
    reordered = wrapper.eval_loss(examples[::-1], memory=memory, batch_size=2)
    assert reordered == pytest.approx(values[0], rel=1e-5)


def test_eval_loss_is_the_token_weighted_loss_of_the_whole_data_set() -> None:
    wrapper = MemoryWrapper(FAMILIES["llada"].build(0), recipe())
    examples = _eval_examples()
    numerator = denominator = 0.0
    for example in examples:  # scored one at a time, with the anchor eval_loss draws for it
        batch = wrapper.prepare({k: v[None] for k, v in example.items()})
        anchor = wrapper.outer.keyed_anchor(batch.x0, batch.maskable, batch.attention_mask, 1234)
        with torch.no_grad():
            logits = wrapper.view.logits(anchor.input_ids)[0]
        masked = anchor.masked[0]
        ce = torch.nn.functional.cross_entropy(logits[masked], batch.x0[0, masked], reduction="sum")
        numerator += float(ce / anchor.t[0])
        denominator += float(batch.maskable.sum())
    assert wrapper.eval_loss(examples, batch_size=3) == pytest.approx(numerator / denominator, rel=1e-5)


def test_keyed_anchors_ignore_padding_and_batch_position() -> None:
    wrapper = MemoryWrapper(FAMILIES["llada"].build(0), recipe())
    examples = _eval_examples()
    alone = [wrapper.outer.keyed_anchor(e["input_ids"][None], (e["labels"] != -100)[None],
                                        torch.ones_like(e["input_ids"])[None], 9) for e in examples]
    rows = [e["input_ids"] for e in examples]
    for side in ("left", "right"):
        ids, mask = _layout(rows, side)
        maskable = torch.zeros_like(mask, dtype=torch.bool)
        for i, e in enumerate(examples):
            real = mask[i].bool()
            maskable[i, real] = e["labels"] != -100
        together = wrapper.outer.keyed_anchor(ids, maskable, mask, 9)
        for i, single in enumerate(alone):
            assert float(together.t[i]) == float(single.t[0])
            assert torch.equal(together.masked[i, mask[i].bool()], single.masked[0])


# ----- 9. teachers of trajectories whose stages repeat ---------------------------------------------------
@pytest.mark.parametrize("trajectory", ["pre_only", "anchor_only"])
@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "hidden_mse", "hidden_cosine"])
def test_repeated_stages_get_the_clean_input_as_teacher(trajectory: str, loss: str) -> None:
    """With the next stage as teacher, a repeated stage was its own teacher: loss 0, gradient 1e-17."""
    config = recipe().model_copy(update={"inner": InnerConfig(loss=loss), "trajectory": TrajectoryConfig(kind=trajectory)})
    wrapper = MemoryWrapper(FAMILIES["llada"].build(0), config)
    metrics = wrapper.step(make_batch(None))
    assert metrics["inner_loss_0"] > 1e-6 and metrics["inner_grad_norm_0"] > 1e-6


# ----- 10. graph kept by the recorded anchor stage -------------------------------------------------------
def _parameters_in_graph(tensor: torch.Tensor) -> set[int]:
    seen, found, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            found.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


@pytest.mark.parametrize("name", ALL)
def test_the_recorded_anchor_stage_keeps_the_graph_of_the_prefix_only(name: str) -> None:
    model = FAMILIES[name].build(0).train()
    wrapper = MemoryWrapper(model, _config())
    hidden_states: list[torch.Tensor] = []
    head = wrapper.backbone.output_head(model)
    # The head runs twice per pass (stopped inside the model, then on the selected rows): keep [B, L, d].
    handle = head.register_forward_pre_hook(lambda _m, args: hidden_states.append(args[0]) if args[0].dim() == 3 else None)
    try:
        with wrapper.bilevel_context():
            wrapper.compute_loss(wrapper.prepare(make_batch(FAMILIES[name].bos)))
    finally:
        handle.remove()
    blocks = wrapper.backbone.blocks(model)
    first = wrapper.memory.first_block
    upper = {id(p) for block in blocks[first:] for p in block.parameters()}
    prefix = {id(p) for block in blocks[:first] for p in block.parameters()}
    assert len(hidden_states) == 3  # pre-anchor stage, anchor stage, outer pass
    # The prefix's graph is kept in the recorded block outputs; the rest of the anchor stage records none.
    assert not _parameters_in_graph(hidden_states[1]) & (upper | prefix), "the anchor stage recorded theta's graph"
    routed = {id(p) for name, p in model.named_parameters() if ".experts." in name}  # may get no token
    assert (prefix | upper) - routed <= _parameters_in_graph(hidden_states[2]), "the outer pass must reach theta"


# ----- 11. host syncs ------------------------------------------------------------------------------------
def test_the_counter_sees_every_kind_of_host_sync() -> None:
    x = torch.randn(3, 4)
    mask = x > 0
    for operation in (lambda: x[mask], lambda: x.sum(1).tolist(), lambda: bool(mask.any()), lambda: mask.nonzero(),
                      lambda: x.sum().item(), lambda: torch.bincount(torch.tensor([1, 2])), lambda: x.masked_select(mask),
                      lambda: float(x.sum()), lambda: torch.unique(x)):
        with HostSyncCounter() as counter:
            operation()
        assert counter.count == 1
    with HostSyncCounter() as counter:
        x[torch.tensor([0, 2])] * 2
    assert counter.count == 0


@pytest.mark.parametrize("name", ALL)
def test_host_syncs_per_step_stay_within_the_budget(name: str) -> None:
    """Budget: one per batch to validate it, one per inner stage and one for the outer loss (their
    supervised positions), one per MoE layer and forward (the expert group sizes), one for the metrics."""
    model = FAMILIES[name].build(0)
    wrapper = MemoryWrapper(model, _config())
    raw = make_batch(FAMILIES[name].bos)
    with HostSyncCounter() as preparing:
        batch = wrapper.prepare(raw)
    forwards = []
    handle = wrapper.backbone.output_head(model).register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with HostSyncCounter() as stepping, wrapper.bilevel_context():
            loss, inner, _ = wrapper.compute_loss(batch)
            loss.backward()
    finally:
        handle.remove()
    moe_layers = sum(1 for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock"))
    replayed = wrapper.memory.first_block if moe_layers else 0  # the outer pass replays the prefix layers
    budget = wrapper.config.inner.steps + 1 + moe_layers * len(forwards) - replayed
    assert preparing.count == 1
    assert stepping.count <= budget, dict(stepping.events)
    with HostSyncCounter() as reporting:
        wrapper.step(raw)
    assert reporting.count <= 1 + budget + 1 + _optimizer_reads(wrapper), dict(reporting.events)


def _optimizer_reads(wrapper: MemoryWrapper) -> int:
    """AdamW reads its (host-side) step counter once per parameter on CPU; no device sync on a GPU."""
    return len(wrapper.trainable_parameters())


# ----- mixed precision -------------------------------------------------------------------------------------
BF16_TOLERANCE = 0.1  # norm-relative; bf16 keeps ~3 significant digits and MoE routing can flip an expert


@pytest.mark.parametrize("name", ALL)
def test_a_bf16_base_adapts_float32_fast_weights_close_to_a_float32_run(name: str) -> None:
    prompts = make_batch(FAMILIES[name].bos, n=2)["input_ids"]
    states = {}
    for dtype in (torch.float32, torch.bfloat16):
        wrapper = MemoryWrapper(FAMILIES[name].build(0).to(dtype), recipe())
        states[dtype] = wrapper.adapt(prompts, seed=1).state()
    wrapper.memory.reset(generator=torch.Generator().manual_seed(0))
    batch = wrapper.prepare(make_batch(FAMILIES[name].bos))
    anchor = wrapper.outer.sample_anchor(batch.x0, batch.maskable, wrapper.generator)
    result = wrapper.inner.run(batch.x0, batch.maskable, anchor, None, generator=wrapper.generator)
    assert torch.isfinite(result.losses).all() and (result.grad_norms > 0).all()
    assert all(v.dtype == torch.float32 for v in wrapper.memory.values), "fast weights stay float32 on bf16"
    assert math.isfinite(wrapper.step(make_batch(FAMILIES[name].bos))["outer_loss"])
    for key, value in states[torch.float32].items():
        bf16 = states[torch.bfloat16][key]
        assert bf16.dtype == torch.float32
        error = float((bf16 - value).norm() / value.norm().clamp_min(1e-12))
        assert error <= BF16_TOLERANCE, f"{key}: {error:.3f}"


# ----- long sequences --------------------------------------------------------------------------------------
LONG_STEP_PEAK_MIB = 64  # measured 40.4 MiB (benchmarks/long_sequence.py, 4096 tokens, d_model 64, 4 blocks)


def test_one_step_at_4096_tokens_with_checkpointing_stays_within_its_memory_figure() -> None:
    torch.manual_seed(0)
    model = llada.LLaDAModelLM(llada.tiny_config(max_sequence_length=4096))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapper = MemoryWrapper(model, MemDLMConfig())
    ids = torch.randint(2, 127, (1, 4096), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :1024] = -100
    with LiveTensorBytes() as tracker:
        metrics = wrapper.step({"input_ids": ids, "labels": labels})
    assert math.isfinite(metrics["outer_loss"]) and metrics["inner_grad_norm_1"] > 0
    assert tracker.peak / 2**20 < LONG_STEP_PEAK_MIB, f"peak {tracker.peak / 2**20:.1f} MiB"
