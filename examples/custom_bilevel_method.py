"""A new bilevel method written only against the public API: test-time training with learned step sizes
and forgetting (TTT / Titans-style ideas), on MemDLM's LoRA fast weights and outer objective.

``LearnedRateTTT`` adapts the memory on the anchor's *visible* tokens only (it never sees the answers it
is scored on): each of its steps hides a random half of them and takes a gradient step on reconstructing
them (per-sample memory: each row on its own mean), ``phi <- (1 - sigmoid(f)) phi - exp(log_lr_i) grad_i``. The per-tensor log-rates ``log_lr`` and the
forgetting logit ``f`` are meta-parameters: the inner gradients are constants (first order), but the
rates and the decay stay in the graph, so the outer loss trains them with theta. Everything it needs is
the :class:`~bilevel_dlm.InnerMethod` contract; ``MemoryWrapper(model, inner=...)`` does the rest (fit,
checkpoints, prompt memory through ``for_prompts``).

    python examples/custom_bilevel_method.py            # 60 outer steps on a tiny LLaDA (about a minute)
    python examples/custom_bilevel_method.py --steps 5
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from bilevel_dlm import InnerMethod, InnerResult, MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig
from bilevel_dlm.integrations import tiny_model
from bilevel_dlm.rng import uniform
from bilevel_dlm.tasks import encode_example
from bilevel_dlm.tasks.recall import make_recall_dataset, recall_tokenizer


class LearnedRateTTT(InnerMethod):
    name = "TTT (learned rates)"

    def __init__(self, view, memory, steps: int = 2, lr: float = 0.1, hide: float = 0.5) -> None:
        self.view, self.memory, self.steps, self.hide = view, memory, steps, hide
        self.log_lr = nn.Parameter(torch.full((len(memory.names),), math.log(lr), device=memory.device))
        self.forget = nn.Parameter(torch.tensor(-4.0, device=memory.device))  # decay sigmoid(-4) = 0.018

    def meta_parameters(self) -> list[nn.Parameter]:
        return [self.log_lr, self.forget]

    def for_prompts(self, memory, settings) -> LearnedRateTTT:
        method = LearnedRateTTT(self.view, memory, settings.steps, hide=self.hide)
        method.log_lr, method.forget = self.log_lr.detach(), self.forget.detach()  # the trained rates
        return method

    def run(self, x0, maskable, anchor, attention_mask=None, *, generator=None, weighting=None, prefix=None):
        self.memory.reset(batch_size=x0.shape[0], generator=generator)
        visible = ~anchor.masked if attention_mask is None else ~anchor.masked & attention_mask.bool()
        values, losses, norms = list(self.memory.values), [], []
        with self.memory.bind():
            for _ in range(self.steps):
                hidden = visible & (uniform(x0.shape, generator, x0.device) < self.hide)
                leaves = [v.detach().requires_grad_() for v in values]
                self.memory.set(leaves)
                logits = self.view.logits(torch.where(hidden, self.view.mask_token_id, anchor.input_ids), attention_mask)
                ce = F.cross_entropy(logits[hidden], x0[hidden], reduction="none")
                if self.memory.per_sample:  # the sum of row means: each row adapts as it would alone
                    ce = ce / hidden.sum(1)[hidden.nonzero()[:, 0]]
                loss = ce.sum() if self.memory.per_sample else ce.mean()
                grads = torch.autograd.grad(loss, leaves)
                keep, rates = 1 - torch.sigmoid(self.forget), self.log_lr.exp()
                values = [keep * v - rates[i] * g for i, (v, g) in enumerate(zip(values, grads))]
                losses.append(loss.detach())
                norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        self.memory.set(values)  # carries the graph to log_lr and forget only
        return InnerResult(torch.stack(losses), torch.stack(norms))


def main(steps: int = 60, seed: int = 0, verbose: bool = True) -> tuple[MemoryWrapper, list[float]]:
    """Train a tiny LLaDA with the method on position recall; returns the wrapper and the outer losses."""
    torch.manual_seed(seed)
    tokenizer = recall_tokenizer()
    rows = [encode_example(tokenizer, e.prompt, e.answer, 24)
            for e in make_recall_dataset("position", 256, seed, n_pairs=4, n_queries=1)]
    config = MemDLMConfig(memory=MemoryConfig(layer_fraction=0.5), outer=OuterConfig(lr=3e-3), seed=seed)
    wrapper = MemoryWrapper(tiny_model("llada", tokenizer, width=64, layers=2), config, tokenizer=tokenizer,
                            inner=lambda view, memory: LearnedRateTTT(view, memory))
    history = wrapper.fit(rows, max_steps=steps, batch_size=16, progress=False)
    if verbose:
        rates = wrapper.inner.log_lr.exp().tolist()
        print(f"outer loss {history.outer_loss[0]:.3f} -> {history.outer_loss[-1]:.3f}; learned rates "
              f"{min(rates):.4f}..{max(rates):.4f}, decay {torch.sigmoid(wrapper.inner.forget).item():.4f}")
    return wrapper, history.outer_loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    main(**vars(parser.parse_args()))
