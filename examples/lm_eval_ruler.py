"""lm-eval's own RULER tasks on a bilevel_dlm checkpoint, with the paper's decoding settings, offline.

    python examples/lm_eval_ruler.py --output runs/ruler --length 1024 --limit 4

Builds a tiny random LLaDA (a stand-in for a trained checkpoint: its scores are 0) with a byte-level BPE
tokenizer (RULER's prompts have capitals and digits), saves it, and runs lm-eval's ``niah_single_1``,
``ruler_vt`` and ``ruler_cwe`` (they generate their data with the checkpoint's tokenizer) at the model's
length through ``python -m bilevel_dlm.lm_eval run``, with memory off and with prompt memory. It prints
the command it ran and the scores. Needs ``pip install -e ".[ruler]"``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryWrapper
from bilevel_dlm.integrations import tiny_model
from bilevel_dlm.tasks import build_byte_level_tokenizer

TASKS = "niah_single_1,ruler_vt,ruler_cwe"
CORPUS = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
          "One of the special magic numbers for the key is: 1234567. What is the special magic number?",
          "VAR ABCDE = 12345. Find all variables that are assigned the value 12345.",
          "Below is a numbered list of words. What are the 10 most common words in the above list?"] * 10


def checkpoint(output: Path, length: int) -> Path:
    """A tiny random LLaDA of maximum length ``length`` with a byte-level tokenizer that knows RULER's words
    (an inefficient one leaves ruler_cwe no room for its word list at short lengths), saved to ``output``."""
    from wonderwords import RandomWord  # RULER's own word source (lm_eval[ruler])

    words = RandomWord().random_words(3000, word_min_length=3)
    tokenizer = build_byte_level_tokenizer(CORPUS + [" ".join(words[i:i + 50]) for i in range(0, 3000, 50)],
                                           vocab_size=4096)
    torch.manual_seed(0)
    model = tiny_model("llada", tokenizer, max_length=length)
    model.config.max_sequence_length = length
    config = MemDLMConfig(memory=MemoryConfig(rank=4, layer_fraction=0.25))
    return MemoryWrapper(model, config, tokenizer=tokenizer).save_pretrained(output)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/ruler", help="checkpoint and results folder")
    parser.add_argument("--length", type=int, default=1024, help="the model's maximum length = RULER's length")
    parser.add_argument("--limit", type=int, default=4, help="examples per task")
    args = parser.parse_args()
    output = Path(args.output)
    run = checkpoint(output / "model", args.length)
    model_args = f"pretrained={run},tokenizer={run / 'tokenizer'},batch_size=8,steps=256,block_length=32"
    for memory in ("off", "prompt"):
        command = [sys.executable, "-m", "bilevel_dlm.lm_eval", "run", "--model", "bilevel_dlm",
                   "--model_args", f"{model_args},memory={memory}", "--device", "cpu", "--tasks", TASKS,
                   "--metadata", json.dumps({"max_seq_lengths": [args.length]}), "--limit", str(args.limit),
                   "--output_path", str(output / f"results-{memory}")]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
