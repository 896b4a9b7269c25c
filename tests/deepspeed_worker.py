"""One MemDLMTrainer step under DeepSpeed ZeRO-2 on CPU (gloo); tests/test_deepspeed.py launches it:

    python -m torch.distributed.run --nproc_per_node 2 tests/deepspeed_worker.py OUT_DIR

The optimizer is plain SGD at learning rate 1 (no clipping), so theta before minus theta after the
step is exactly the all-reduced gradient. Every rank writes the micro-batch it got, its adapted memory
and its updated parameters (ZeRO-2 partitions gradients and optimizer state, not the parameters).
"""

import json
import sys
from pathlib import Path

import torch

from ddp_worker import PER_RANK, _Probe, global_examples, recipe, tiny_model
from bilevel_dlm.trainer import MemDLMTrainingArguments
from torchrun import end_worker

ZERO2 = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
         "optimizer": {"type": "SGD", "params": {"lr": "auto"}}, "bf16": {"enabled": False}, "fp16": {"enabled": False}}


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    config_file = out_dir / "zero2.json"
    config_file.write_text(json.dumps(ZERO2))
    args = MemDLMTrainingArguments(
        output_dir=str(out_dir / "run"), memdlm=recipe(), max_steps=1, per_device_train_batch_size=PER_RANK,
        train_sampling_strategy="sequential", use_cpu=True, max_grad_norm=0.0, report_to=[], save_strategy="no",
        disable_tqdm=True, deepspeed=str(config_file), learning_rate=1.0, lr_scheduler_type="constant",
    )
    trainer = _Probe(tiny_model(), args, train_dataset=global_examples())
    trainer.train()
    record = {**trainer.record, "parameters": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}
    torch.save(record, out_dir / f"rank{args.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_worker()
