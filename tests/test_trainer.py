"""MemDLMTrainer / MemDLMTrainingArguments on the native tiny LLaDA, and outer LoRA through PEFT."""

import json
import math
import pickle

import pytest
import torch
from torch.utils.data import DataLoader
from pydantic import ValidationError
from torch import nn
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from bilevel_dlm.data import pad_collate
from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig, OuterLoRAConfig
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.peft_utils import apply_outer_lora, base_model_of, is_peft_model
from bilevel_dlm.trainer import MemDLMTrainer, MemDLMTrainingArguments, eval_shard

MASK = 127


def tiny_llada(seed: int = 0) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return LLaDAModelLM(tiny_config())


def recipe(warmup_ratio: float = 0.25, lr_schedule: str = "cosine", **memory) -> MemDLMConfig:
    return MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.25, **memory),
                        outer=OuterConfig(lr=3e-3, warmup_ratio=warmup_ratio, lr_schedule=lr_schedule))


def examples(n: int = 8, length: int = 12, prompt: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, MASK, (length,), generator=generator)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def arguments(tmp_path, config: MemDLMConfig, max_steps: int, **overrides) -> MemDLMTrainingArguments:
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                    train_sampling_strategy="sequential", use_cpu=True, report_to=[], logging_steps=1,
                    save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    return MemDLMTrainingArguments.from_memdlm(config, max_steps=max_steps, **{**settings, **overrides})


def train_logs(trainer: MemDLMTrainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


class GradientProbe(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = [p.grad.clone() for p in model.parameters() if p.requires_grad]


# ----- arguments -------------------------------------------------------------------------------
def test_arguments_validate_and_serialise_the_recipe(tmp_path):
    assert MemDLMTrainingArguments(output_dir=str(tmp_path)).memdlm == MemDLMConfig()
    config = MemDLMConfig(inner=InnerConfig(steps=3, lr=0.05))
    from_dict = MemDLMTrainingArguments(output_dir=str(tmp_path), memdlm={"inner": {"steps": 3, "lr": 0.05}})
    assert from_dict.memdlm == config
    config.to_yaml(tmp_path / "recipe.yaml")
    args = MemDLMTrainingArguments(output_dir=str(tmp_path), memdlm=str(tmp_path / "recipe.yaml"))
    assert args.memdlm == config
    (parsed,) = HfArgumentParser(MemDLMTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--memdlm", str(tmp_path / "recipe.yaml")])
    assert parsed.memdlm == config
    with pytest.raises(ValidationError, match="stepz"):
        MemDLMTrainingArguments(output_dir=str(tmp_path), memdlm={"inner": {"stepz": 3}})
    with pytest.raises(TypeError, match="memdlm must be"):
        MemDLMTrainingArguments(output_dir=str(tmp_path), memdlm=3)

    assert args.to_dict()["memdlm"] == config.model_dump(mode="json")
    assert MemDLMConfig.model_validate(json.loads(args.to_json_string())["memdlm"]) == config
    assert pickle.loads(pickle.dumps(args)).memdlm == config  # the Trainer saves training_args.bin by pickling


def test_from_memdlm_copies_the_outer_optimizer_settings(tmp_path):
    config = MemDLMConfig(outer=OuterConfig(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1, lr_schedule="constant",
                                            warmup_ratio=0.3, max_grad_norm=None))
    args = MemDLMTrainingArguments.from_memdlm(config, max_steps=10, output_dir=str(tmp_path), adam_epsilon=1e-6)
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.weight_decay) == (1e-3, 0.8, 0.95, 0.1)
    assert args.lr_scheduler_type.value == "constant_with_warmup" and args.get_warmup_steps(10) == 3
    assert args.max_grad_norm == 0.0 and args.adam_epsilon == 1e-6 and args.max_steps == 10


def test_trainer_refuses_what_it_cannot_train(tmp_path):
    with pytest.raises(TypeError, match="MemDLMTrainingArguments"):
        MemDLMTrainer(tiny_llada(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    metasgd = MemDLMConfig(inner=InnerConfig(mode="unrolled", optimizer="metasgd"))
    with pytest.raises(NotImplementedError, match="MetaSGD"):
        MemDLMTrainer(tiny_llada(), arguments(tmp_path, metasgd, max_steps=1), train_dataset=examples())


# ----- training --------------------------------------------------------------------------------
def test_trainer_follows_fit_step_for_step(tmp_path):
    """Same model, data order, anchors, AdamW, schedule and clipping: the same losses and weights."""
    config, data, steps = recipe(), examples(), 4
    fit_model = tiny_llada()
    in_order = DataLoader(data, batch_size=2, collate_fn=pad_collate)  # the Trainer samples sequentially here
    history = MemoryWrapper(fit_model, config).fit(in_order, max_steps=steps, batch_size=2, progress=False)

    model = tiny_llada()
    trainer = MemDLMTrainer(model, arguments(tmp_path, config, steps), train_dataset=data)
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == steps
    for step, entry in enumerate(logs):
        assert entry["loss"] == pytest.approx(history.outer_loss[step], rel=1e-6)
        assert entry["outer_loss"] == pytest.approx(history.outer_loss[step], rel=1e-6)
        for i, (loss, norm) in enumerate(zip(history.inner_losses[step], history.inner_grad_norms[step])):
            assert entry[f"inner_loss_{i}"] == pytest.approx(loss, rel=1e-6)
            assert entry[f"inner_grad_norm_{i}"] == pytest.approx(norm, rel=1e-6)
    for a, b in zip(model.parameters(), fit_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}, "only theta is optimised"
    assert trainer.memdlm.memory._values == (), "memory is dropped after each step"
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0, "hooks left bound"


def test_gradient_checkpointing_sees_the_same_memory_in_its_backward(tmp_path):
    """training_step keeps the memory bound across the backward: recomputed forwards add the same
    fast-weight deltas, so checkpointing changes nothing."""
    config, data = recipe(), examples(4)
    params = []
    for checkpointing in (False, True):
        model = tiny_llada()
        args = arguments(tmp_path, config, 2, activation_checkpointing=checkpointing)
        trainer = MemDLMTrainer(model, args, train_dataset=data)
        trainer.train()
        assert model.is_activation_checkpointing == checkpointing
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_gradient_accumulation_averages_the_micro_batch_losses(tmp_path):
    config, data = recipe(), examples(2)
    probe = GradientProbe()
    args = arguments(tmp_path, config, 1, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                     max_grad_norm=0.0)
    MemDLMTrainer(tiny_llada(), args, train_dataset=data, callbacks=[probe]).train()

    model = tiny_llada()
    wrapper = MemoryWrapper(model, config)
    for index, example in enumerate(data):  # one memory per micro-batch, draws keyed by example (epoch 0)
        batch = wrapper.prepare({**{k: v[None] for k, v in example.items()}, "example_index": torch.tensor([index])})
        with wrapper.bilevel_context():
            loss, _, _ = wrapper.compute_loss(batch)
            (loss / 2).backward()
    for got, expected in zip(probe.gradients, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_batch_without_maskable_tokens_gives_zero_gradient_and_is_counted(tmp_path):
    data = examples(2)
    data[1]["labels"][:] = -100
    probe = GradientProbe()
    args = arguments(tmp_path, recipe(), 2, per_device_train_batch_size=1)
    trainer = MemDLMTrainer(tiny_llada(), args, train_dataset=data, callbacks=[probe])
    trainer.train()
    logs = train_logs(trainer)
    assert "skipped_batches" not in logs[0] and logs[1]["skipped_batches"] == 1
    assert logs[1]["loss"] == 0.0 and "outer_loss" not in logs[1]
    assert all(not g.any() for g in probe.gradients)


def test_evaluate_reports_memory_off_and_prompt_memory_losses(tmp_path):
    data, held_out = examples(4), examples(5, seed=1)
    model = tiny_llada()
    trainer = MemDLMTrainer(model, arguments(tmp_path, recipe(), 2, eval_strategy="steps", eval_steps=2),
                            train_dataset=data, eval_dataset=held_out)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(logged) == 1 and "eval_loss_prompt_memory" in logged[0]

    metrics = trainer.evaluate()
    independent = MemoryWrapper(model, recipe())
    assert metrics["eval_loss"] == pytest.approx(independent.eval_loss(held_out, "off", batch_size=2), rel=1e-6)
    assert metrics["eval_loss_prompt_memory"] == pytest.approx(
        independent.eval_loss(held_out, "prompt", batch_size=2), rel=1e-6)
    assert metrics["eval_loss"] == pytest.approx(logged[0]["eval_loss"], rel=1e-6), "eval must not train"
    assert metrics["eval_loss"] != metrics["eval_loss_prompt_memory"]
    by_name = trainer.evaluate({"a": held_out[:2], "b": held_out[2:]})
    assert set(by_name) >= {"eval_a_loss", "eval_b_loss", "eval_a_loss_prompt_memory"}
    trainer.eval_dataset = {"a": held_out[:2], "b": held_out[2:]}
    named = trainer.evaluate("b", metric_key_prefix="eval_b")  # a set named as the Trainer names them
    assert named["eval_b_loss"] == by_name["eval_b_loss"]


class Stream(torch.utils.data.IterableDataset):
    """An iterable dataset without a length: the examples of a list, read in order."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)


@pytest.mark.parametrize("size", [1, 3, 4, 5, 7])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_hold_every_example_once(size, world):
    """Rank r holds indices r, r + world, ... (none repeated, as accelerate's even batches would), for
    lists, map-style datasets and iterable datasets alike."""
    items = list(range(size))
    expected = [items[rank::world] for rank in range(world)]
    assert [list(eval_shard(items, rank, world)) for rank in range(world)] == expected
    assert [list(eval_shard(Stream(items), rank, world)) for rank in range(world)] == expected
    tensors = torch.utils.data.TensorDataset(torch.tensor(items))
    assert [[int(x) for (x,) in eval_shard(tensors, rank, world)] for rank in range(world)] == expected


def test_evaluate_on_an_iterable_dataset_equals_the_list(tmp_path):
    held_out = examples(5, seed=1)
    model = tiny_llada()
    trainer = MemDLMTrainer(model, arguments(tmp_path, recipe(), 1))
    from_list, from_stream = trainer.evaluate(held_out), trainer.evaluate(Stream(held_out))
    independent = MemoryWrapper(model, recipe())
    assert from_stream["eval_loss"] == pytest.approx(independent.eval_loss(held_out, "off", batch_size=1), abs=1e-6)
    assert from_stream == pytest.approx(from_list, abs=1e-6)


# ----- outer LoRA through PEFT -----------------------------------------------------------------
def lora_model() -> nn.Module:
    """The tiny LLaDA with a PEFT LoRA on every attention and FFN linear (not the LM head)."""
    return apply_outer_lora(tiny_llada(), OuterLoRAConfig(rank=4, alpha=8.0, dropout=0.0))


def lora_recipe() -> MemDLMConfig:
    """Fast weights on attention and FFN; a constant outer learning rate from the first step."""
    return recipe(warmup_ratio=0.0, lr_schedule="constant", targets="ffn+attention")


def check_one_step_trains_lora_only(peft_model: nn.Module, wrapper: MemoryWrapper) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = base_model_of(peft_model)
    assert len(wrapper.memory.targets) == 7, "q, k, v, attn_out, ff_proj, up_proj, ff_out of the last block"
    for path, module in wrapper.memory.targets.items():
        lora_layer = base.get_submodule(path)
        assert isinstance(lora_layer, BaseTunerLayer) and module is lora_layer.base_layer, path
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    wrapper.step({"input_ids": torch.stack([e["input_ids"] for e in examples(3)]),
                  "labels": torch.stack([e["labels"] for e in examples(3)])})
    optimized = {id(p) for group in wrapper.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for name, p in peft_model.named_parameters() if "lora_" in name}
    for name, p in peft_model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, before[name]), f"base weight {name} changed"
        elif "lora_B" in name:  # lora_A gets no gradient while B = 0 (first step)
            assert not torch.equal(p, before[name]), f"LoRA weight {name} did not train"


def test_outer_lora_trains_only_lora_weights_with_fast_weights_under_it():
    peft_model = lora_model()
    check_one_step_trains_lora_only(peft_model, MemoryWrapper(base_model_of(peft_model), lora_recipe()))


def test_memory_wrapper_accepts_a_peft_model_directly():
    peft_model = lora_model()
    check_one_step_trains_lora_only(peft_model, MemoryWrapper(peft_model, lora_recipe()))


def test_trainer_applies_outer_lora_from_the_recipe_and_trains_it(tmp_path):
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.25, targets="ffn+attention"),
                          outer=OuterConfig(lr=3e-3, lora=OuterLoRAConfig(apply=True, rank=4, alpha=8.0)))
    trainer = MemDLMTrainer(tiny_llada(), arguments(tmp_path, config, 1), train_dataset=examples(2))
    assert is_peft_model(trainer.model)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    lora = {name: p for name, p in trainer.model.named_parameters() if "lora_" in name}
    assert optimized == {id(p) for p in lora.values()}
    for name, p in trainer.model.named_parameters():
        if name not in lora:
            assert torch.equal(p, before[name]), f"base weight {name} changed"
    assert any(not torch.equal(p, before[name]) for name, p in lora.items())
    assert "inner_loss_1" in train_logs(trainer)[0]


def test_4bit_base_with_outer_lora_trains_only_the_lora_weights(tmp_path):
    """The paper's recipe: an NF4 4-bit base (bitsandbytes runs it on CPU too), an outer PEFT LoRA and
    float32 fast weights on the quantised linears."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    tiny_llada().save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    device = {"": 0} if torch.cuda.is_available() else None
    base = LLaDAModelLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map=device)
    lora = OuterLoRAConfig(rank=4, alpha=8.0, dropout=0.0)
    peft_model = apply_outer_lora(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False), lora)
    config = lora_recipe().model_copy(update={"outer": OuterConfig(lr=5e-2, warmup_ratio=0.0, lr_schedule="constant")})
    wrapper = MemoryWrapper(peft_model, config)
    assert all(type(m).__name__ == "Linear4bit" for m in wrapper.memory.targets.values())
    # bitsandbytes repacks 4-bit storage on CPU at the first inference call, so the base is compared by
    # what it computes: every quantised linear on a fixed probe input, and every other frozen tensor.
    frozen = {name: p.detach().clone() for name, p in peft_model.named_parameters()
              if not p.requires_grad and p.dtype.is_floating_point}
    probes = quantised_outputs(peft_model)
    # Rows of one repeated token: a masked token is predictable from any visible one, so 20 steps show it.
    data = [{"input_ids": torch.arange(10, 18)[:, None].repeat(1, 12).to(wrapper.device)}]
    before = wrapper.eval_loss(data)

    prepared = wrapper.prepare(data[0])
    anchor = wrapper.outer.sample_anchor(prepared.x0, prepared.maskable, wrapper.generator)
    wrapper.inner.run(prepared.x0, prepared.maskable, anchor, None, generator=wrapper.generator)
    assert all(v.dtype == torch.float32 for v in wrapper.memory.values), "fast weights are float32 on a 4-bit base"
    assert any(bool(v.abs().sum() > 0) for n, v in zip(wrapper.memory.names, wrapper.memory.values) if "lora_B" in n)
    assert all(p.grad is None for p in peft_model.parameters()), "the inner loop wrote no parameter gradient"
    wrapper.memory.clear()

    history = wrapper.fit(data, max_steps=20, progress=False)
    assert all(math.isfinite(v) for v in history.outer_loss)
    assert all(torch.equal(p, frozen[name]) for name, p in peft_model.named_parameters() if name in frozen)
    for name, output in quantised_outputs(peft_model).items():
        torch.testing.assert_close(output, probes[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert changed and all("lora_" in n for n in changed)
    # It learns as the same recipe on the unquantised base does (NF4 rounding aside): lower than before,
    # and within 10% of the float run's eval loss after the same 20 steps.
    reference = MemoryWrapper(apply_outer_lora(LLaDAModelLM.from_pretrained(tmp_path / "base"), lora), config)
    reference.fit(data, max_steps=20, progress=False)
    after, float_after = wrapper.eval_loss(data), reference.eval_loss(data)
    assert after < before - 0.1 and abs(after - float_after) <= 0.1 * float_after, (before, after, float_after)
    trainer = MemDLMTrainer(peft_model, arguments(tmp_path, config, 2), train_dataset=examples(4))
    trainer.train()
    assert "inner_loss_1" in train_logs(trainer)[0]


@torch.no_grad()
def quantised_outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each 4-bit linear's output on a fixed probe input (the function its frozen weights compute)."""
    generator = torch.Generator().manual_seed(0)
    outputs = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes"):
            probe = torch.randn(3, module.in_features, generator=generator).to(module.weight.device)
            outputs[name] = module(probe).float()
    return outputs


class _GradientProbe(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = [p.grad.clone() for p in model.parameters()]


def test_gradient_accumulation_normalises_over_every_micro_batch_of_the_step(tmp_path):
    """2 accumulated micro-batches of 4 give the gradient of one loss over all 8 rows (same anchors and
    memories), normalised by the step's total maskable tokens, not the mean of two normalised losses."""
    rows = [{**row, "labels": row["labels"].masked_fill(torch.arange(12) < prompt, -100)}
            for row, prompt in zip(examples(8, prompt=0), (1, 1, 1, 1, 9, 9, 9, 9))]  # 11 vs 3 maskable
    config = recipe(warmup_ratio=0.0, lr_schedule="constant")
    probe = _GradientProbe()
    trainer = MemDLMTrainer(tiny_llada(), arguments(tmp_path, config, 1, per_device_train_batch_size=4,
                                                    gradient_accumulation_steps=2, max_grad_norm=0.0),
                            train_dataset=rows, callbacks=[probe])
    trainer.train()

    model = tiny_llada()
    wrapper = MemoryWrapper(model, config)
    numerators, denominators = [], []
    indexed = [{**row, "example_index": index, "epoch": 0} for index, row in enumerate(rows)]
    for chunk in (indexed[:4], indexed[4:]):
        batch = wrapper.prepare(pad_collate(chunk, wrapper.pad_token_id()))
        with wrapper.bilevel_context():
            loss, _, _ = wrapper.compute_loss(batch)
            denominator = wrapper.outer.denominator(batch.maskable)
            (loss * denominator / 56).backward()  # 4 * 11 + 4 * 3 maskable tokens in the step
        numerators.append(float(loss))
        denominators.append(int(denominator))
    assert denominators == [44, 12]
    for expected, got in zip((p.grad for p in model.parameters()), probe.gradients):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
