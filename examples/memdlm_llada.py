"""MemDLM on a tiny LLaDA, offline on CPU: build the model and tokenizer, train a few bilevel steps on
the synthetic long-context suite, and print the losses.

    python examples/memdlm_llada.py                # defaults: a couple of minutes on 2 CPU cores
    python examples/memdlm_llada.py --steps 5      # quicker
"""

from __future__ import annotations

import argparse

import torch

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.tasks import TASKS, build_corpus, build_tokenizer


def main(steps: int = 40, batch_size: int = 8, context_length: int = 96, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = LLaDAModelLM(tiny_config(vocab_size=len(tokenizer), embedding_size=len(tokenizer),
                                     mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.eos_token_id))
    corpus = build_corpus(tokenizer, tasks=list(TASKS), n_per_task=16, context_lengths=[context_length],
                          seed=seed, max_length=context_length + 48)
    config = MemDLMConfig(memory=MemoryConfig(layer_fraction=0.25), outer=OuterConfig(lr=1e-3), seed=seed)
    wrapper = MemoryWrapper(model, config, tokenizer=tokenizer)
    history = wrapper.fit(corpus, eval_data=corpus[:16], max_steps=steps, batch_size=batch_size)
    for step in range(0, steps, max(1, steps // 10)):
        inner = ", ".join(f"{value:.3f}" for value in history.inner_losses[step])
        print(f"step {history.steps[step]:4d}  outer {history.outer_loss[step]:.3f}  inner [{inner}]")
    print(f"eval loss: memory off {history.eval_loss[-1]:.3f}, prompt memory {history.eval_loss_prompt_memory[-1]:.3f}")
    return history.outer_loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context-length", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.batch_size, args.context_length, args.seed)
