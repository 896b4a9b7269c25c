"""Generation speed and memory-while-decoding, measured side by side in one run.

1. Tokens per second of LLaDA's sampler at temperature 0 on one random tiny LLaDA, interleaved, as ratios
   against (a) the head on every position (``full_logits``, the plain path): (b) the head only on the block
   being decoded (default), (c) the prefix KV cache and (d) the dual KV cache (refreshed once per block of
   32), (e) threshold parallel decoding (``threshold=0.9``), (f) dual cache with threshold; for prompts of
   256 / 1024 tokens and 64 / 256 new tokens, with the share of generated tokens equal to (b)'s.
2. The sampler's own overhead: sampler time / time of the bare model forwards it needs (goal <= 1.15).
3. Batched ``adapt`` of 8 prompts / the same 8 prompts one at a time (goal <= 0.25).
4. Memory while decoding on the main job's position-recall task: a MemDLM (preset) model trained briefly
   (3 seeds), exact match and time with no memory, prompt memory and memory refreshed after every block.
5. KV caching on the other backbones, interleaved with their uncached samplers: Dream's sampler with the
   prefix cache (refreshed every 8 steps, and never) and in blocks of 32 (uncached, prefix and dual cache
   refreshed once per block), LLaDA2's block-diffusion sampler with its exact prefix cache.
6. Decoding the trained model of 4: exact match, forwards and seconds under (b)-(f) and (g) factor-based
   parallel decoding (``factor=1``), (e) and (f) by Fast-dLLM's threshold rule (the default), beside (h) the
   share rule with one step per token and (i) the share rule with Fast-dLLM's published steps (one per block).
7. LLaDA2.1's token editing against LLaDA2.0's decoding, interleaved on a random tiny LLaDA2 whose head is
   scaled so that thresholds fire and tokens get edited: tokens/s, forwards per token, share of equal tokens.

    python benchmarks/generation.py --threads 1                          # every section
    python benchmarks/generation.py --threads 1 --sections speed cache   # sections 1-3 and 5
    python benchmarks/generation.py --device cuda --sections speed cache --d-model 1024 --layers 8   # a GPU figure
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bilevel_dlm import MemDLMConfig, MemoryConfig, MemoryWrapper, OuterConfig
from bilevel_dlm.evaluation import task_accuracy
from bilevel_dlm.integrations import tiny_model
from bilevel_dlm.integrations.dream import DreamModel, tiny_config as dream_config
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.integrations.llada2 import LLaDA2MoeModelLM, tiny_config as llada2_config
from bilevel_dlm.sampling import BlockDiffusionSampler, DreamSampler, LLaDASampler, Sampler
from bilevel_dlm.tasks import encode_example
from bilevel_dlm.tasks.recall import make_recall_dataset, recall_tokenizer

DEVICE = torch.device("cpu")  # set from --device in main()


def timed(function) -> float:
    """Seconds of ``function()``, waiting for the device's queued work before and after."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    started = time.perf_counter()
    function()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter() - started


def random_llada(args: argparse.Namespace) -> MemoryWrapper:
    torch.manual_seed(0)
    model = LLaDAModelLM(tiny_config(d_model=args.d_model, n_layers=args.layers, vocab_size=args.vocab,
                                     embedding_size=args.vocab, mask_token_id=args.vocab - 1,
                                     max_sequence_length=4096)).eval()
    return MemoryWrapper(model.to(DEVICE), MemDLMConfig())


def random_dream(args: argparse.Namespace) -> MemoryWrapper:
    torch.manual_seed(0)
    model = DreamModel(dream_config(hidden_size=args.d_model, intermediate_size=2 * args.d_model,
                                    num_hidden_layers=args.layers, vocab_size=args.vocab, mask_token_id=args.vocab - 1,
                                    bos_token_id=args.vocab - 2, max_position_embeddings=4096)).eval()
    return MemoryWrapper(model.to(DEVICE), MemDLMConfig())


def random_llada2(args: argparse.Namespace) -> MemoryWrapper:
    torch.manual_seed(0)
    model = LLaDA2MoeModelLM(llada2_config(hidden_size=args.d_model, num_hidden_layers=args.layers,
                                           vocab_size=args.vocab, mask_token_id=args.vocab - 1,
                                           max_position_embeddings=4096)).eval()
    return MemoryWrapper(model.to(DEVICE), MemDLMConfig())


def interleaved(wrapper: MemoryWrapper, args: argparse.Namespace, variants: dict[str, Sampler],
                new_lengths: tuple[int, ...] = (64, 256)):
    """For prompts of 256 / 1024 and each of ``new_lengths`` new tokens: (prompt, new, median seconds per
    variant, last output per variant), the variants' samplers run in turn ``args.repeats`` times."""
    for prompt_length in (256, 1024):
        for new_tokens in new_lengths:
            ids = torch.randint(2, args.vocab - 2, (args.batch, prompt_length),
                                generator=torch.Generator().manual_seed(0)).to(DEVICE)
            times, outputs = {name: [] for name in variants}, {}
            for _ in range(args.repeats):
                for name, sampler in variants.items():
                    times[name].append(timed(lambda: outputs.update(
                        {name: sampler.sample(wrapper.view, ids, max_new_tokens=new_tokens)})))
            yield prompt_length, new_tokens, {name: statistics.median(t) for name, t in times.items()}, outputs


def print_ratios(wrapper: MemoryWrapper, args: argparse.Namespace, variants: dict[str, Sampler], base: str,
                 agree: str, new_lengths: tuple[int, ...] = (64, 256)) -> None:
    """Tokens/s (ratio against ``base``) [share of generated tokens equal to ``agree``'s] {forwards}."""
    print(f"{'prompt':>7s} {'new':>5s} " + " ".join(f"{name:>34s}" for name in variants))
    for prompt_length, new_tokens, times, outputs in interleaved(wrapper, args, variants, new_lengths):
        reference = outputs[agree].sequences[:, prompt_length:]
        cells = [f"{args.batch * new_tokens / t:7.1f} ({times[base] / t:5.2f}x) "
                 f"[{float((outputs[name].sequences[:, prompt_length:] == reference).float().mean()):.2f}] "
                 f"{{{outputs[name].model_calls}}}" for name, t in times.items()]
        print(f"{prompt_length:7d} {new_tokens:5d} " + " ".join(f"{c:>34s}" for c in cells))


def speed(args: argparse.Namespace) -> None:
    wrapper = random_llada(args)
    variants = {name: LLaDASampler(block_length=32, **settings) for name, settings in {
        "(a) head everywhere": dict(full_logits=True), "(b) head on the block": {},
        "(c) prefix cache": dict(cache="prefix"), "(d) dual cache": dict(cache="dual"),
        "(e) threshold 0.9": dict(threshold=0.9), "(f) dual + threshold 0.9": dict(cache="dual", threshold=0.9),
    }.items()}
    print(f"1. tokens/s, LLaDA sampler at temperature 0, d_model {args.d_model}, {args.layers} blocks, "
          f"vocab {args.vocab}, batch {args.batch}, blocks of 32, one step per token (medians of {args.repeats}); "
          "(ratio against (a)) [share of new tokens equal to (b)'s] {forwards}")
    print_ratios(wrapper, args, variants, "(a) head everywhere", "(b) head on the block")

    ids = torch.randint(2, args.vocab - 1, (args.batch, 256), generator=torch.Generator().manual_seed(1)).to(DEVICE)
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

    prompts = torch.randint(2, args.vocab - 1, (8, 256), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    batched, single = [], []
    for _ in range(args.repeats):
        batched.append(timed(lambda: wrapper.adapt(prompts)))
        single.append(timed(lambda: [wrapper.adapt(prompts[i:i + 1]) for i in range(8)]))
    print(f"3. adapt 8 prompts batched / one at a time: {statistics.median(batched) / statistics.median(single):.3f} "
          "(goal <= 0.25)")


def trained_recall_model(args: argparse.Namespace, pairs: int = 6, seed: int = 0):
    """A tiny LLaDA trained with the MemDLM preset on position recall (initialised and shuffled from
    ``seed``); (wrapper, tokenizer, test, seconds)."""
    tokenizer = recall_tokenizer()

    def rows(examples):
        out = []
        for e in examples:
            length = 2 + sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (e.prompt, e.answer))
            out.append(encode_example(tokenizer, e.prompt, e.answer, length))
        return out

    train = rows(make_recall_dataset("position", 2048, 0, n_pairs=pairs))
    test = make_recall_dataset("position", 64, 2, n_pairs=pairs)
    torch.manual_seed(seed)
    config = MemDLMConfig(memory=MemoryConfig(layer_fraction=0.1), outer=OuterConfig(lr=2e-3, warmup_ratio=0.05),
                          seed=seed)
    wrapper = MemoryWrapper(tiny_model("llada", tokenizer, width=128, layers=2), config, tokenizer=tokenizer)
    trained = timed(lambda: wrapper.fit(train, max_steps=args.train_steps, batch_size=32, progress=False))
    return wrapper, tokenizer, test, trained


def memory_while_decoding(args: argparse.Namespace, seeds: int = 3) -> None:
    pairs = 6
    scores, seconds = ({adapt: [] for adapt in (False, "prompt", "blocks")} for _ in range(2))
    for seed in range(seeds):
        wrapper, tokenizer, test, _ = trained_recall_model(args, pairs, seed)
        for adapt in scores:
            result = {}
            seconds[adapt].append(timed(lambda: result.update(score=task_accuracy(
                wrapper, tokenizer, test, max_new_tokens=pairs + 2, adapt=adapt, batch_size=64,
                block_length=(pairs + 2) // 4))))
            scores[adapt].append(result["score"][0])
    print(f"4. memory while decoding: position recall ({pairs} values + EOS in 8 new tokens, 4 blocks of 2), LLaDA, "
          f"MemDLM preset trained {args.train_steps} steps, {seeds} seeds (model and data order), 64 test prompts in "
          "one batch: exact match mean [min, max], per seed, seconds (median)")
    for adapt in scores:
        print(f"   memory {str(adapt):7s}: {statistics.mean(scores[adapt]):.3f} [{min(scores[adapt]):.3f}, "
              f"{max(scores[adapt]):.3f}], {[round(s, 3) for s in scores[adapt]]}, {statistics.median(seconds[adapt]):.2f} s")


def cached_decoding(args: argparse.Namespace) -> None:
    print(f"5. KV cache on Dream and LLaDA2, d_model {args.d_model}, {args.layers} blocks, vocab {args.vocab}, batch "
          f"{args.batch}, temperature 0, 64 new tokens (medians of {args.repeats}); (ratio against the uncached "
          "sampler) [share of new tokens equal to its] {forwards}")
    print("   Dream sampler, alg entropy, one step per token:")
    variants = {"no cache": DreamSampler(), "prefix, refresh every 8": DreamSampler(cache="prefix", cache_refresh=8),
                "prefix, never refreshed": DreamSampler(cache="prefix"),
                "blocks of 32, no cache": DreamSampler(block_length=32),
                "blocks of 32, prefix": DreamSampler(block_length=32, cache="prefix"),
                "blocks of 32, dual": DreamSampler(block_length=32, cache="dual")}
    print_ratios(random_dream(args), args, variants, "no cache", "no cache", new_lengths=(64,))
    print("   LLaDA2 block-diffusion sampler, blocks of 32, one step per token of a block, threshold 1 (never fires):")
    variants = {"no cache": BlockDiffusionSampler(threshold=1.0), "prefix cache": BlockDiffusionSampler(threshold=1.0, cache="prefix")}
    print_ratios(random_llada2(args), args, variants, "no cache", "no cache", new_lengths=(64,))


def trained_decoding(args: argparse.Namespace, seeds: int = 3) -> None:
    pairs = 6
    variants = {"(b) no cache": {}, "(c) prefix cache": dict(cache="prefix"), "(d) dual cache": dict(cache="dual"),
                "(e) threshold 0.9": dict(threshold=0.9), "(f) dual + threshold 0.9": dict(cache="dual", threshold=0.9),
                "(g) factor 1": dict(factor=1.0),
                "(h) threshold 0.9, share": dict(threshold=0.9, threshold_rule="share", steps=pairs + 2),
                "(i) share, 1 step a block": dict(threshold=0.9, threshold_rule="share", steps=1)}
    scores, calls, seconds = ({name: [] for name in variants} for _ in range(3))
    for seed in range(seeds):
        trained, tokenizer, test, _ = trained_recall_model(args, pairs, seed)
        forwards = []
        handle = trained.model.register_forward_pre_hook(lambda *_: forwards.append(1))  # one per model call
        try:
            for name, settings in variants.items():
                forwards.clear()
                result = {}
                seconds[name].append(timed(lambda: result.update(score=task_accuracy(
                    trained, tokenizer, test, max_new_tokens=pairs + 2, adapt=False, batch_size=64,
                    block_length=pairs + 2, **settings))))
                scores[name].append(result["score"][0])
                calls[name].append(len(forwards))
        finally:
            handle.remove()
    print(f"6. position recall ({pairs} values + EOS in 8 new tokens, one block of 8, at most 8 steps), LLaDA, MemDLM "
          f"preset trained {args.train_steps} steps, {seeds} seeds (model and data order), 64 test prompts in one "
          "batch, memory off: exact match mean [min, max], forwards per seed, seconds (median)")
    for name in variants:
        print(f"   {name:26s}: {statistics.mean(scores[name]):.3f} [{min(scores[name]):.3f}, {max(scores[name]):.3f}], "
              f"forwards {calls[name]}, {statistics.median(seconds[name]):.2f} s")


def token_editing(args: argparse.Namespace) -> None:
    wrapper = random_llada2(args)
    with torch.no_grad():
        wrapper.model.lm_head.weight.mul_(args.head_scale)
    variants = {"LLaDA2.0, threshold 0.95": BlockDiffusionSampler(),
                "LLaDA2.1, editing 0.9": BlockDiffusionSampler(editing_threshold=0.9),
                "LLaDA2.1, editing 0.9, cache": BlockDiffusionSampler(editing_threshold=0.9, cache="prefix")}
    print(f"7. LLaDA2 block diffusion, release defaults (blocks of 32, threshold 0.95), d_model {args.d_model}, "
          f"{args.layers} blocks, vocab {args.vocab}, head x{args.head_scale}, batch {args.batch}, temperature 0 "
          f"(medians of {args.repeats}); (ratio against LLaDA2.0) [share of new tokens equal to its] {{forwards}}")
    print_ratios(wrapper, args, variants, "LLaDA2.0, threshold 0.95", "LLaDA2.0, threshold 0.95", new_lengths=(64,))


SECTIONS = {"speed": speed, "memory": memory_while_decoding, "cache": cached_decoding, "decode": trained_decoding,
            "editing": token_editing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--head-scale", type=float, default=30.0, help="section 7: the random model's head scale")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--device", default="cpu", help="where sections 1-3 and 5 run (4 and 6 train on the CPU)")
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    for section in args.sections:
        SECTIONS[section](args)


if __name__ == "__main__":
    main()
