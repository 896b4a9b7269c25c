"""MemDLMTrainer on 2 processes (gloo, CPU) with micro-batches of 2, for tests/test_topology.py:

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT \
        tests/topology_worker.py OUT_DIR

For shared and per-sample memory, every rank trains the float64 tiny LLaDA of ``topology.model()`` for
``topology.STEPS`` steps on ``topology.examples()`` (global batch 4: 2 per rank) and rank 0 writes
``OUT_DIR/<memory>.pt`` with the logged losses and the final weights. Then a run of STEPS + 1 steps saves
every step and is resumed from checkpoint-STEPS, a step into the second epoch (the resumed loader skips a
batch of the rank's shard): rank 0 writes both runs' final weights to ``OUT_DIR/resume.pt``.
"""

import sys
from pathlib import Path

import torch

from bilevel_dlm.trainer import MemDLMTrainer
from topology import MICRO_BATCH, STEPS, examples, model, recipe, trainer_arguments
from torchrun import end_worker


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    for per_sample in (False, True):
        name = "per_sample" if per_sample else "shared"
        args = trainer_arguments(out_dir / name, recipe(per_sample), STEPS, per_device_train_batch_size=MICRO_BATCH,
                                 ddp_backend="gloo", ddp_timeout=120)
        trainer = MemDLMTrainer(model(), args, train_dataset=examples())
        trainer.train()
        if args.process_index == 0:
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            weights = {n: p.detach().clone() for n, p in trainer.memdlm.model.named_parameters()}
            torch.save({"losses": losses, "weights": weights, "world": args.world_size}, out_dir / f"{name}.pt")
    finals = []
    for resume in (None, str(out_dir / "resume" / f"checkpoint-{STEPS}")):
        args = trainer_arguments(out_dir / "resume", recipe(False), STEPS + 1, per_device_train_batch_size=MICRO_BATCH,
                                 ddp_backend="gloo", ddp_timeout=120, save_strategy="steps", save_steps=1)
        trainer = MemDLMTrainer(model(), args, train_dataset=examples())
        trainer.train(resume_from_checkpoint=resume)
        finals.append({n: p.detach().clone() for n, p in trainer.memdlm.model.named_parameters()})
    if args.process_index == 0:
        torch.save({"uninterrupted": finals[0], "resumed": finals[1]}, out_dir / "resume.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_worker()
