"""Peak memory and time of one MemDLM (preset) step at long sequence lengths, with activation checkpointing.

The paper trains at 4096 tokens. A tiny-width LLaDA runs one bilevel step (anchor, two inner stages,
outer loss and backward) at each length; the script prints the peak of live tensor bytes (CUDA: the
allocator's peak) and its growth from one length to the next, beside the size of one attention score
matrix (batch x heads x L x L float32), the part that is quadratic by nature.

    python benchmarks/long_sequence.py --threads 1                     # 1024, 2048, 4096 tokens on CPU
    python benchmarks/long_sequence.py --device cuda --lengths 4096 8192
"""

from __future__ import annotations

import argparse
import time

import torch

from bilevel_dlm import MemDLMConfig, MemoryWrapper
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config
from bilevel_dlm.diagnostics import LiveTensorBytes


def step_peak(args: argparse.Namespace, length: int) -> tuple[int, float]:
    torch.manual_seed(0)
    config = tiny_config(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                         mlp_hidden_size=4 * args.d_model, max_sequence_length=max(length, 512))
    model = LLaDAModelLM(config).to(args.device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapper = MemoryWrapper(model, MemDLMConfig())
    ids = torch.randint(2, 127, (args.batch, length), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : length // 4] = -100
    batch = {"input_ids": ids.to(args.device), "labels": labels.to(args.device)}
    wrapper.step(batch)  # warm-up (optimizer state, kernels)
    started = time.perf_counter()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        wrapper.step(batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, time.perf_counter() - started
    with LiveTensorBytes() as tracker:
        wrapper.step(batch)
    return tracker.peak, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"one MemDLM step on {args.device}: d_model {args.d_model}, {args.layers} blocks, batch {args.batch}, "
          "activation checkpointing on")
    print(f"{'tokens':>7s} {'peak MiB':>10s} {'growth':>7s} {'one L x L score matrix MiB':>27s} {'step s':>8s}")
    previous = None
    for length in args.lengths:
        peak, seconds = step_peak(args, length)
        scores = args.batch * args.heads * length * length * 4
        growth = f"{peak / previous:.2f}x" if previous else "-"
        print(f"{length:7d} {peak / 2**20:10.1f} {growth:>7s} {scores / 2**20:27.1f} {seconds:8.2f}")
        previous = peak


if __name__ == "__main__":
    main()
