"""One MemDLMTrainer step under DDP on CPU (gloo); tests/test_ddp.py launches it with torchrun:

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT \
        tests/ddp_worker.py OUT_DIR

Every rank trains its copy of the same tiny LLaDA for one step on its shard of the global batch
(``global_examples``) and writes ``OUT_DIR/find_unused_<flag>_rank<r>.pt``: the micro-batch it got, its
adapted memory, the module type compute_loss ran under, the parameters DDP reduces, and theta's
gradient just before the optimizer step (after DDP's all-reduce; no clipping), and the evaluation of the
fresh model on the global examples (each rank scoring its shard). It does so twice, with
``find_unused_parameters`` True and False, the two ways DDP prepares its reducer after a forward.
"""

import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from bilevel_dlm import MemDLMConfig, MemoryConfig
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.trainer import MemDLMTrainer, MemDLMTrainingArguments

PER_RANK = 2


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


class _Probe(MemDLMTrainer):
    """Keeps what one compute_loss saw and left: the batch, the adapted memory, the wrapping module."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.record = {
            "input_ids": inputs["input_ids"].clone(),
            "labels": inputs["labels"].clone(),
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
        evaluation = trainer.evaluate(eval_dataset=global_examples())  # before training: the fresh model
        trainer.train()
        record = {**trainer.record, "gradients": probe.gradients, "evaluation": evaluation}
        torch.save(record, out_dir / f"find_unused_{find_unused}_rank{args.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
