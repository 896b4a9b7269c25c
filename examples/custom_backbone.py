"""Adding a backbone: ModernBERT (a masked LM that is not one of the built-in families) as a diffusion LM.

One small adapter class tells the core where ModernBERT's blocks, FFN / attention linears and vocabulary
head are; everything else (bilevel training, prompt adaptation) then works unchanged. The model here is
a tiny random ``transformers.ModernBertForMaskedLM`` trained on synthetic arithmetic progressions (the
prompt fixes start and stride, the response continues them), so nothing is downloaded.

Run:
    python examples/custom_backbone.py                # 100 outer steps (a few seconds on a CPU)
    python examples/custom_backbone.py --steps 10 --batch-size 4
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn
from transformers import ModernBertConfig, ModernBertForMaskedLM

from bilevel_dlm import (
    Backbone, History, MemDLMConfig, MemoryConfig, MemoryParams, MemoryWrapper, OuterConfig, register_backbone,
)

PAD, CLS, SEP, MASK = 0, 1, 2, 3  # special ids of the tiny vocabulary; ordinary tokens are 4..VOCAB-1
VOCAB = 128


@register_backbone
class ModernBertBackbone(Backbone):
    """ModernBERT: a bidirectional encoder whose logits are already aligned with its input.

    The base class's forward call (``input_ids`` + 2D ``attention_mask``), ``align_hidden`` and
    ``finalize_logits`` apply as they are; only the module layout is declared.
    """

    name = "modernbert"
    blocks_path = "model.layers"
    model_types = ("modernbert",)
    class_names = ("ModernBertForMaskedLM",)
    ffn_targets = ("mlp.Wi", "mlp.Wo")  # Wi is the fused gate + up projection (out = 2 * intermediate)
    attention_targets = ("attn.Wqkv", "attn.Wo")

    def output_head(self, model: nn.Module) -> nn.Module:
        """The hidden -> vocabulary linear; its input is the prediction head's (dense, GELU, norm) output."""
        return model.decoder


def tiny_modernbert(seed: int = 0, layers: int = 4) -> ModernBertForMaskedLM:
    """A random ModernBERT with hidden size 64 and a 128-token vocabulary (SDPA attention, CPU friendly)."""
    config = ModernBertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=CLS,
        cls_token_id=CLS, eos_token_id=SEP, sep_token_id=SEP, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return ModernBertForMaskedLM(config)


def counting_task(n: int, length: int, seed: int, prompt: int = 4) -> list[dict[str, torch.Tensor]]:
    """Examples ``[CLS] s, s+k, s+2k, ...`` (ordinary tokens, wrapping around) with a random start s and
    stride k in 1..3. The first ``prompt`` positions are the prompt (labels -100): they fix s and k, and
    the response continues the progression."""
    generator = torch.Generator().manual_seed(seed)
    n_tokens = VOCAB - (MASK + 1)
    examples = []
    for _ in range(n):
        start = torch.randint(0, n_tokens, (1,), generator=generator)
        stride = torch.randint(1, 4, (1,), generator=generator)
        body = MASK + 1 + (start + stride * torch.arange(length - 1)) % n_tokens
        ids = torch.cat([torch.tensor([CLS]), body])
        labels = ids.clone()
        labels[:prompt] = -100
        examples.append({"input_ids": ids, "labels": labels})
    return examples


@dataclass
class Result:
    """What :func:`main` measured (MDLM losses with fixed anchors, memory off unless stated)."""

    history: History
    train_loss: tuple[float, float]  # first examples of the training set, before / after training
    held_out_loss: tuple[float, float]  # unseen progressions, before / after training
    held_out_prompt_memory: float  # unseen progressions, memory adapted on each prompt
    memory: MemoryParams  # adapted on one held-out prompt


def main(steps: int = 100, batch_size: int = 8, length: int = 16, n_train: int = 64, seed: int = 0,
         layer_fraction: float = 0.25, verbose: bool = True) -> Result:
    """Train ModernBERT with MemDLM's bilevel recipe for ``steps`` outer steps, then adapt memory on a prompt.

    ``layer_fraction`` 0.25 puts the fast weights in the last of the 4 blocks (MemDLM's last-10% rule
    on a model this small).
    """
    say = print if verbose else (lambda *args: None)
    model = tiny_modernbert(seed)
    config = MemDLMConfig(
        memory=MemoryConfig(rank=4, layer_fraction=layer_fraction),  # fast weights on Wi and Wo
        outer=OuterConfig(lr=3e-3, warmup_ratio=0.0, lr_schedule="constant"),
        seed=seed,
    )
    # A real ModernBERT checkpoint declares no mask id in its config: pass it (or tokenizer=...).
    wrapper = MemoryWrapper(model, config, mask_token_id=MASK)
    say(f"backbone: {type(wrapper.backbone).__name__}; fast weights on {list(wrapper.memory.targets)}")

    train, held_out = counting_task(n_train, length, seed), counting_task(16, length, seed + 1)
    probe = train[:16]
    train_before = wrapper.eval_loss(probe, batch_size=batch_size)
    held_before = wrapper.eval_loss(held_out, batch_size=batch_size)
    history = wrapper.fit(train, max_steps=steps, batch_size=batch_size, progress=False)
    for step, loss, inner in zip(history.steps, history.outer_loss, history.inner_losses):
        say(f"step {step:3d}  outer {loss:6.3f}  inner " + " ".join(f"{x:6.3f}" for x in inner))
    train_after = wrapper.eval_loss(probe, batch_size=batch_size)
    held_after = wrapper.eval_loss(held_out, batch_size=batch_size)
    held_prompt = wrapper.eval_loss(held_out, memory="prompt", batch_size=batch_size)
    say(f"MDLM loss on training examples {train_before:.3f} -> {train_after:.3f}; on unseen ones "
        f"{held_before:.3f} -> {held_after:.3f} ({held_prompt:.3f} with memory adapted on each prompt)")

    prompt = held_out[0]["input_ids"][None, :4]
    memory = wrapper.adapt(prompt)
    say(f"memory adapted on the prompt {prompt[0].tolist()} (base weights untouched):")
    for name, value in memory.state().items():
        say(f"  {name:28s} {str(tuple(value.shape)):14s} norm {value.norm():.4f}")
    return Result(history, (train_before, train_after), (held_before, held_after), held_prompt, memory)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="outer training steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=16, help="tokens per example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer-fraction", type=float, default=1.0, help="last fraction of blocks with fast weights")
    args = parser.parse_args()
    main(steps=args.steps, batch_size=args.batch_size, length=args.length, seed=args.seed,
         layer_fraction=args.layer_fraction)
