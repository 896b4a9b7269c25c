"""One MemDLMTrainer step under DDP on CPU (gloo); tests/test_ddp.py launches it with torchrun:

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT \
        tests/ddp_worker.py OUT_DIR

Every rank trains its copy of the same tiny LLaDA for one step on its shard of the global batch
(``global_examples``) and writes ``OUT_DIR/find_unused_<flag>_rank<r>.pt``: the micro-batch it got, its
adapted memory, the module type compute_loss ran under, the parameters DDP reduces, and theta's
gradient just before the optimizer step (after DDP's all-reduce; no clipping), and the evaluation of the
fresh model (each rank scoring its shard) on the global examples and on eval sets of ``EVAL_SIZES``
examples, which do not divide into the ranks' batches. It does so twice, with ``find_unused_parameters``
True and False, the two ways DDP prepares its reducer after a forward.
"""

import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from bilevel_dlm import MemDLMConfig, MemoryConfig
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.trainer import MemDLMTrainer, MemDLMTrainingArguments
from torchrun import end_worker

PER_RANK = 2
EVAL_SIZES = (3, 5, 7)  # with 2 ranks and eval batch 2, accelerate's even_batches would repeat examples


def recipe() -> MemDLMConfig:
    return MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5), seed=3)


def tiny_model() -> LLaDAModelLM:
    torch.manual_seed(0)
    return LLaDAModelLM(tiny_config())


def global_examples() -> list[dict[str, torch.Tensor]]:
    """Four sequences; the first two have far more maskable tokens than the last two, so a loss
    normalised per rank and one normalised over the global batch have different gradients."""
    generator = torch.Generator().manual_seed(11)
    examples = []
    for prompt in (2, 2, 8, 8):
        ids = torch.randint(2, 127, (14,), generator=generator)
        labels = ids.clone()
        labels[:prompt] = -100
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def eval_examples(count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` sequences of 9 to 15 tokens with prompts of 1 to 6 tokens: batches get padding, and
    examples differ in their number of maskable tokens, so a repeated example would change the loss."""
    generator = torch.Generator().manual_seed(100 + count)
    examples = []
    for index in range(count):
        ids = torch.randint(2, 127, (9 + index % 7,), generator=generator)
        labels = ids.clone()
        labels[: 1 + index % 6] = -100
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def evaluation_sets() -> dict[str, list[dict[str, torch.Tensor]]]:
    """The eval sets by name: ``global`` (the four training examples) and ``n<count>`` for EVAL_SIZES."""
    return {"global": global_examples(), **{f"n{count}": eval_examples(count) for count in EVAL_SIZES}}


class _Probe(MemDLMTrainer):
    """Keeps what one compute_loss saw and left: the batch, the adapted memory, the wrapping module."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.record = {
            "input_ids": inputs["input_ids"].clone(),
            "labels": inputs["labels"].clone(),
            "example_index": inputs["example_index"].clone(),
            "epoch": inputs["epoch"].clone(),
            "memory": self.memdlm.memory.state(),
            "wrapped_in": type(model).__name__,
            "reduced": [name for name, p in model.named_parameters() if p.requires_grad],
        }
        return loss


class _GradientProbe(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {name: p.grad.clone() for name, p in model.named_parameters()}


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    for find_unused in (True, False):
        probe = _GradientProbe()
        args = MemDLMTrainingArguments(
            output_dir=str(out_dir / "run"), memdlm=recipe(), max_steps=1, per_device_train_batch_size=PER_RANK,
            train_sampling_strategy="sequential", use_cpu=True, ddp_backend="gloo", ddp_timeout=120,
            ddp_find_unused_parameters=find_unused, max_grad_norm=0.0, report_to=[], save_strategy="no",
            disable_tqdm=True, per_device_eval_batch_size=PER_RANK,
        )
        trainer = _Probe(tiny_model(), args, train_dataset=global_examples(), callbacks=[probe])
        evaluation = trainer.evaluate(eval_dataset=evaluation_sets())  # before training: the fresh model
        trainer.train()
        record = {**trainer.record, "gradients": probe.gradients, "evaluation": evaluation}
        torch.save(record, out_dir / f"find_unused_{find_unused}_rank{args.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_worker()
