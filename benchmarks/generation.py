"""Generation speed and memory-while-decoding, measured side by side in one run.

1. Tokens per second of LLaDA's sampler at temperature 0 on one random tiny LLaDA: (a) the head on every
   position (``full_logits``, the plain path), (b) the head only on the block being decoded (default),
   (e) threshold parallel decoding (``threshold``), interleaved, as ratios against (a), for prompts of
   256 / 1024 tokens and 64 / 256 new tokens.
2. The sampler's own overhead: sampler time / time of the bare model forwards it needs (goal <= 1.15).
3. Batched ``adapt`` of 8 prompts / the same 8 prompts one at a time (goal <= 0.25).
4. Memory while decoding on the main job's position-recall task: a MemDLM (preset) model trained briefly,
   exact match and time with no memory, prompt memory and memory refreshed after every block.
5. KV caching: tokens/s of (b) the uncached sampler, (c) the prefix cache and (d) the dual cache
   (refreshed once per block of 32), interleaved, as ratios against (b), with the share of generated
   tokens equal to (b)'s; and exact match of the trained model of 4 with each.

    python benchmarks/generation.py --threads 1                    # every section
    python benchmarks/generation.py --threads 1 --sections cache   # section 5 only
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig
from bilevel_dlm.evaluation import task_accuracy
from bilevel_dlm.integrations import tiny_model
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.sampling import LLaDASampler
from bilevel_dlm.tasks import encode_example
from bilevel_dlm.tasks.recall import make_recall_dataset, recall_tokenizer


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def random_llada(args: argparse.Namespace) -> MemoryWrapper:
    torch.manual_seed(0)
    model = LLaDAModelLM(tiny_config(d_model=args.d_model, n_layers=args.layers, vocab_size=args.vocab,
                                     embedding_size=args.vocab, mask_token_id=args.vocab - 1,
                                     max_sequence_length=4096)).eval()
    return MemoryWrapper(model, MemDLMConfig())


def interleaved(wrapper: MemoryWrapper, args: argparse.Namespace, variants: dict[str, dict]):
    """For prompts of 256 / 1024 and 64 / 256 new tokens: (prompt, new, seconds per variant, last output
    per variant), the variants' LLaDA samplers (blocks of 32) run in turn ``args.repeats`` times."""
    for prompt_length in (256, 1024):
        for new_tokens in (64, 256):
            ids = torch.randint(2, args.vocab - 1, (args.batch, prompt_length), generator=torch.Generator().manual_seed(0))
            times, outputs = {name: [] for name in variants}, {}
            for _ in range(args.repeats):
                for name, settings in variants.items():
                    sampler = LLaDASampler(block_length=32, **settings)
                    times[name].append(timed(lambda: outputs.update(
                        {name: sampler.sample(wrapper.view, ids, max_new_tokens=new_tokens)})))
            yield prompt_length, new_tokens, {name: statistics.median(t) for name, t in times.items()}, outputs


def speed(args: argparse.Namespace) -> None:
    wrapper = random_llada(args)
    variants = {"(a) head everywhere": dict(full_logits=True), "(b) head on the block": {},
                "(e) threshold 0.9": dict(threshold=0.9)}
    print(f"1. tokens/s, LLaDA sampler at temperature 0, d_model {args.d_model}, {args.layers} blocks, "
          f"vocab {args.vocab}, batch {args.batch}, blocks of 32, one step per token (medians of {args.repeats})")
    print(f"{'prompt':>7s} {'new':>5s} " + " ".join(f"{name:>22s}" for name in variants) + "   steps (e)")
    for prompt_length, new_tokens, times, outputs in interleaved(wrapper, args, variants):
        base = times["(a) head everywhere"]
        cells = [f"{args.batch * new_tokens / t:9.1f} ({base / t:4.2f}x)" for t in times.values()]
        print(f"{prompt_length:7d} {new_tokens:5d} " + " ".join(f"{c:>22s}" for c in cells)
              + f"   {outputs['(e) threshold 0.9'].model_calls}/{new_tokens}")

    ids = torch.randint(2, args.vocab - 1, (args.batch, 256), generator=torch.Generator().manual_seed(1))
    sampler = LLaDASampler(block_length=32)
    out = sampler.sample(wrapper.view, ids, max_new_tokens=64)
    canvas = out.sequences.clone()
    sampler_times, forward_times = [], []
    for _ in range(args.repeats):
        sampler_times.append(timed(lambda: sampler.sample(wrapper.view, ids, max_new_tokens=64)))

        def forwards() -> None:
            with torch.no_grad():
                for _ in range(out.model_calls):
                    wrapper.view.logits(canvas, None, None, slice(256, 288))
        forward_times.append(timed(forwards))
    print(f"2. sampler time / its bare forwards ({out.model_calls} forwards, prompt 256, 64 new): "
          f"{statistics.median(sampler_times) / statistics.median(forward_times):.3f} (goal <= 1.15)")

    prompts = torch.randint(2, args.vocab - 1, (8, 256), generator=torch.Generator().manual_seed(2))
    batched, single = [], []
    for _ in range(args.repeats):
        batched.append(timed(lambda: wrapper.adapt(prompts)))
        single.append(timed(lambda: [wrapper.adapt(prompts[i:i + 1]) for i in range(8)]))
    print(f"3. adapt 8 prompts batched / one at a time: {statistics.median(batched) / statistics.median(single):.3f} "
          "(goal <= 0.25)")


def trained_recall_model(args: argparse.Namespace, pairs: int = 6):
    """A tiny LLaDA trained with the MemDLM preset on position recall; (wrapper, tokenizer, test, seconds)."""
    tokenizer = recall_tokenizer()

    def rows(examples):
        out = []
        for e in examples:
            length = 2 + sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (e.prompt, e.answer))
            out.append(encode_example(tokenizer, e.prompt, e.answer, length))
        return out

    train = rows(make_recall_dataset("position", 2048, 0, n_pairs=pairs))
    test = make_recall_dataset("position", 64, 2, n_pairs=pairs)
    torch.manual_seed(0)
    config = MemDLMConfig(memory=MemoryConfig(layer_fraction=0.1), outer=OuterConfig(lr=2e-3, warmup_ratio=0.05))
    wrapper = MemoryWrapper(tiny_model("llada", tokenizer, width=128, layers=2), config, tokenizer=tokenizer)
    trained = timed(lambda: wrapper.fit(train, max_steps=args.train_steps, batch_size=32, progress=False))
    return wrapper, tokenizer, test, trained


def memory_while_decoding(args: argparse.Namespace) -> None:
    pairs = 6
    wrapper, tokenizer, test, trained = trained_recall_model(args, pairs)
    print(f"4. memory while decoding: position recall ({pairs} values + EOS in 8 new tokens, 4 blocks of 2), MemDLM preset "
          f"trained {args.train_steps} steps ({trained:.0f} s), 64 test prompts")
    for adapt in (False, "prompt", "blocks"):
        result = {}
        seconds = timed(lambda: result.update(score=task_accuracy(wrapper, tokenizer, test, max_new_tokens=pairs + 2,
                                                                  adapt=adapt, batch_size=64, block_length=(pairs + 2) // 4)))
        print(f"   memory {str(adapt):7s}: exact match {result['score'][0]:.3f}, {seconds:.2f} s")


def cached_decoding(args: argparse.Namespace) -> None:
    wrapper = random_llada(args)
    variants = {"(b) no cache": {}, "(c) prefix cache": dict(cache="prefix"), "(d) dual cache": dict(cache="dual")}
    print(f"5. KV cache: tokens/s, LLaDA sampler at temperature 0, d_model {args.d_model}, {args.layers} blocks, "
          f"vocab {args.vocab}, batch {args.batch}, blocks of 32, one step per token (medians of {args.repeats}); "
          "[share of tokens equal to (b)'s]")
    print(f"{'prompt':>7s} {'new':>5s} " + " ".join(f"{name:>28s}" for name in variants))
    for prompt_length, new_tokens, times, outputs in interleaved(wrapper, args, variants):
        base, plain = times["(b) no cache"], outputs["(b) no cache"].sequences
        cells = [f"{args.batch * new_tokens / t:7.1f} ({base / t:4.2f}x) "
                 f"[{float((outputs[name].sequences == plain)[:, prompt_length:].float().mean()):.2f}]"
                 for name, t in times.items()]
        print(f"{prompt_length:7d} {new_tokens:5d} " + " ".join(f"{c:>28s}" for c in cells))
    pairs = 6
    trained, tokenizer, test, seconds = trained_recall_model(args, pairs)
    print(f"   position recall ({pairs} values + EOS in 8 new tokens, one block of 8, 8 steps), MemDLM preset "
          f"trained {args.train_steps} steps ({seconds:.0f} s), 64 test prompts, memory off:")
    for name, settings in variants.items():
        score = task_accuracy(trained, tokenizer, test, max_new_tokens=pairs + 2, adapt=False, batch_size=64,
                              block_length=pairs + 2, **settings)
        print(f"   {name:18s}: exact match {score[0]:.3f}")


SECTIONS = {"speed": speed, "memory": memory_while_decoding, "cache": cached_decoding}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for section in args.sections:
        SECTIONS[section](args)


if __name__ == "__main__":
    main()
