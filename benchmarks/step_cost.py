"""Cost of a MemDLM step against a plain MDLM step on the same tiny LLaDA and batch.

Runs the variants interleaved (so machine noise hits all alike), reports median time ratios, and
peak memory ratios (CUDA: the allocator's peak; CPU: the peak of live tensor bytes, tracked by a
dispatch mode in a separate pass so that it does not disturb the timings).

    python benchmarks/step_cost.py                 # CPU, defaults
    python benchmarks/step_cost.py --device cuda --d-model 1024 --layers 16 --batch 8 --length 512
    python benchmarks/step_cost.py --compile inductor --threads 1   # also the compiled MDLM and MemDLM steps
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryWrapper, OuterConfig
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.prefix import PrefixReplay
from bilevel_dlm.diagnostics import LiveTensorBytes


def build(args: argparse.Namespace, mode: str, share_prefix: bool = True, compile_backend: str | None = None
          ) -> MemoryWrapper:
    torch.manual_seed(0)
    config = tiny_config(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                         mlp_hidden_size=4 * args.d_model, vocab_size=args.vocab, embedding_size=args.vocab,
                         mask_token_id=args.vocab - 1)
    model = LLaDAModelLM(config).to(args.device)
    if compile_backend:
        model.compile(backend=compile_backend)
    wrapper = MemoryWrapper(model, MemDLMConfig(inner=InnerConfig(mode=mode), outer=OuterConfig(warmup_ratio=0.0)))
    wrapper.share_prefix = share_prefix
    wrapper.configure_optimizers(10_000)
    return wrapper


def mdlm_step(wrapper: MemoryWrapper, batch) -> None:
    """The plain MDLM step: same anchor sampling, loss, clipping and AdamW, no memory."""
    prepared = wrapper.prepare(batch)
    anchor = wrapper.outer.sample_anchor(prepared.x0, prepared.maskable, wrapper.generator)
    loss = wrapper.outer.loss(prepared.x0, prepared.maskable, anchor, prepared.model_attention_mask)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(wrapper.trainable_parameters(), 1.0)
    wrapper.optimizer.step()
    wrapper.optimizer.zero_grad(set_to_none=True)


def make_batch(args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, args.vocab - 1, (args.batch, args.length), generator=g)
    labels = ids.clone()
    labels[:, : args.length // 4] = -100
    return {"input_ids": ids.to(args.device), "labels": labels.to(args.device)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--compile", metavar="BACKEND", help="also time the MDLM and MemDLM steps of a model compiled "
                        "in place with this torch.compile backend (inductor, aot_eager)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = make_batch(args)
    variants = {
        "mdlm": (build(args, "first_order"), mdlm_step),
        "memdlm_preset": (build(args, "first_order"), MemoryWrapper.step),
        "memdlm_no_prefix_sharing": (build(args, "first_order", share_prefix=False), MemoryWrapper.step),
        "memdlm_unrolled": (build(args, "unrolled"), MemoryWrapper.step),
    }
    if args.compile:
        variants["mdlm_compiled"] = (build(args, "first_order", compile_backend=args.compile), mdlm_step)
        variants["memdlm_preset_compiled"] = (build(args, "first_order", compile_backend=args.compile), MemoryWrapper.step)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, (wrapper, step) in variants.items():  # warm-up (a compiled model compiles in its first two steps)
        for _ in range(2 if name.endswith("_compiled") else 1):
            step(wrapper, batch)
    for _ in range(args.repeats):
        for name, (wrapper, step) in variants.items():
            sync(args.device)
            start = time.perf_counter()
            step(wrapper, batch)
            sync(args.device)
            times[name].append(time.perf_counter() - start)

    peaks: dict[str, float] = {}
    for name, (wrapper, step) in variants.items():
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(wrapper, batch)
            peaks[name] = torch.cuda.max_memory_allocated() - base
        elif name.endswith("_compiled"):  # a dispatch mode would trace into the compiled graphs
            peaks[name] = float("nan")
        else:
            with LiveTensorBytes() as tracker:
                step(wrapper, batch)
            peaks[name] = tracker.peak

    inner_peak = inner_loop_peak(variants["memdlm_preset"][0], batch, args.device)

    shape = f"d_model {args.d_model}, {args.layers} blocks, vocab {args.vocab}, batch {args.batch} x {args.length}"
    print(f"step cost on {args.device} ({shape}), {args.repeats} interleaved repeats, medians")
    base_time, base_peak = statistics.median(times["mdlm"]), peaks["mdlm"]
    print(f"{'variant':28s} {'time ratio':>10s} {'peak-memory ratio':>18s}")
    for name in variants:
        ratio_t = statistics.median(times[name]) / base_time
        print(f"{name:28s} {ratio_t:10.2f} {peaks[name] / base_peak:18.3f}")
    if args.compile:
        for eager, compiled in (("mdlm", "mdlm_compiled"), ("memdlm_preset", "memdlm_preset_compiled")):
            print(f"{compiled}: {statistics.median(times[eager]) / statistics.median(times[compiled]):.2f}x "
                  f"faster than {eager} ({args.compile})")
    print(f"preset inner loop (anchor stage recorded for the outer pass): peak {inner_peak / 2**20:.1f} MiB, "
          f"{inner_peak / base_peak:.3f} of the MDLM step's peak")


def inner_loop_peak(wrapper: MemoryWrapper, batch: dict, device: str) -> int:
    """Peak bytes while the inner loop runs and the recorded prefix is held, before the outer pass."""
    prepared = wrapper.prepare(batch)
    anchor = wrapper.outer.sample_anchor(prepared.x0, prepared.maskable, wrapper.generator)
    prefix = PrefixReplay(wrapper.backbone.blocks(wrapper.model), wrapper.memory.first_block)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        wrapper.inner.run(prepared.x0, prepared.maskable, anchor, None, generator=wrapper.generator, prefix=prefix)
        return torch.cuda.max_memory_allocated() - base
    with LiveTensorBytes() as tracker:
        wrapper.inner.run(prepared.x0, prepared.maskable, anchor, None, generator=wrapper.generator, prefix=prefix)
    return tracker.peak


if __name__ == "__main__":
    main()
