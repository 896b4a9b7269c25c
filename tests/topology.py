"""The run that tests/test_topology.py trains on every topology: a float64 tiny LLaDA, 8 examples of 9 to 14
tokens with prompts of 1 to 6 (so batches are padded and differ in maskable tokens), global batch 4 over
3 optimizer steps (the third in the second epoch, reshuffled), AdamW at a constant rate with clipping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bilevel_dlm import MemDLMConfig, MemoryConfig, OuterConfig
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.trainer import MemDLMTrainingArguments

GLOBAL_BATCH, MICRO_BATCH, STEPS, SEED = 4, 2, 3, 5


def model() -> LLaDAModelLM:
    torch.manual_seed(0)
    return LLaDAModelLM(tiny_config()).double()


def recipe(per_sample: bool) -> MemDLMConfig:
    return MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.5, per_sample=per_sample, dtype="float64"),
                        outer=OuterConfig(lr=3e-3, warmup_ratio=0.0, lr_schedule="constant", weight_decay=0.0),
                        seed=SEED)


def examples() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    rows = []
    for index in range(8):
        ids = torch.randint(2, 127, (9 + index % 6,), generator=generator)
        labels = ids.clone()
        labels[: 1 + (index * 5) % 6] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def trainer_arguments(output: Path, config: MemDLMConfig, max_steps: int, **overrides: Any) -> MemDLMTrainingArguments:
    settings = dict(output_dir=str(output), seed=SEED, use_cpu=True, report_to=[], logging_steps=1,
                    save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    return MemDLMTrainingArguments.from_memdlm(config, max_steps=max_steps, **{**settings, **overrides})
