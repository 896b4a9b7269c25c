"""One command that tells whether the library is correct on a device and how fast it is there.

    python benchmarks/gpu_check.py --device cuda            # one H100 / H200: <= 8 minutes
    python benchmarks/gpu_check.py --device cuda --quick    # <= 3 minutes
    python benchmarks/gpu_check.py --device cpu --quick     # a dry run with tiny shapes (about a minute)

Sections, each with a one-line summary:

1. correctness: the device-agnostic core tests (``pytest -m device --device DEVICE``: prefix sharing ==
   recomputation over the option matrix, a bfloat16 base with float32 fast weights, batch rows == rows
   alone in generation, KV-cache exactness, adapt leaves the base bitwise unchanged); pass / fail counts;
2. step cost: the MemDLM preset and the MDLM step on a random LLaDA (about 1B parameters on a GPU, bf16,
   sequence 2048, and 4096 with activation checkpointing), interleaved repeats, medians, peak memory, and
   model FLOPs utilisation against the device's dense bf16 peak;
3. host syncs per step: CUDA synchronisations seen by the profiler, and the library's own counter
   (``bilevel_dlm.diagnostics.HostSyncCounter``, which also counts on a CPU), against the budget of
   docs/how-a-step-works.md (1 per batch + 1 per inner stage + 1 outer + 1 metrics, dense models);
4. generation: tokens/s of LLaDA's sampler uncached / prefix cache / dual cache / threshold 0.9 (prompt
   1024, 256 new tokens, batch 8 on a GPU), and batched ``adapt`` of 8 prompts against 8 one at a time.

Writes ``OUT/gpu_results.json`` and ``OUT/gpu_results.md``. The budget is kept: every section has an
allowance, and a section that would start after the time is spent is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bilevel_dlm import InnerConfig, MemDLMConfig, MemoryWrapper, OuterConfig
from bilevel_dlm.diagnostics import HostSyncCounter
from bilevel_dlm.integrations.llada import LLaDAModelLM, tiny_config

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, matched on the device name.
BF16_PEAKS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))
SHAPES = {  # model and workload per (device kind, quick)
    "gpu": dict(d_model=2048, layers=16, heads=16, mlp=5632, vocab=32768, batch=4, lengths=(2048, 4096),
                repeats=5, prompt=1024, new=256, gen_batch=8, block=32),
    "gpu_quick": dict(d_model=2048, layers=16, heads=16, mlp=5632, vocab=32768, batch=4, lengths=(2048,),
                      repeats=3, prompt=1024, new=256, gen_batch=8, block=32),
    "cpu": dict(d_model=64, layers=2, heads=4, mlp=128, vocab=256, batch=2, lengths=(64, 128), repeats=3,
                prompt=32, new=16, gen_batch=4, block=8),
}
ALLOWANCE = {"correctness": 0.35, "step_cost": 0.30, "host_syncs": 0.10, "generation": 0.25}  # of the budget
MINIMUM_SECONDS = {"correctness": 10.0, "step_cost": 5.0, "host_syncs": 1.0, "generation": 3.0}  # to start at all


class Budget:
    """Seconds left of the total; a section starts only if its allowance still fits."""

    def __init__(self, seconds: float) -> None:
        self.total, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_llada(shape: dict, device: torch.device, dtype: torch.dtype, inner_steps: int) -> MemoryWrapper:
    torch.manual_seed(0)
    config = tiny_config(d_model=shape["d_model"], n_layers=shape["layers"], n_heads=shape["heads"],
                         n_kv_heads=shape["heads"], mlp_hidden_size=shape["mlp"], vocab_size=shape["vocab"],
                         embedding_size=shape["vocab"], mask_token_id=shape["vocab"] - 1,
                         max_sequence_length=max(shape["lengths"]) + shape["new"] + shape["prompt"])
    model = LLaDAModelLM(config).to(device, dtype)
    recipe = MemDLMConfig(inner=InnerConfig(steps=inner_steps), outer=OuterConfig(warmup_ratio=0.0))
    wrapper = MemoryWrapper(model, recipe)
    wrapper.configure_optimizers(10_000)
    return wrapper


def batch_of(shape: dict, length: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, shape["vocab"] - 1, (shape["batch"], length), generator=generator)
    labels = ids.clone()
    labels[:, : length // 4] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "example_index": torch.arange(shape["batch"], device=device)}


def forward_flops(wrapper: MemoryWrapper, tokens: int, length: int) -> float:
    """Matmul FLOPs of one forward: 2 x (non-embedding parameters) per token, plus attention's QK^T and AV."""
    config = wrapper.model.config
    embedding = wrapper.model.get_input_embeddings().weight.numel()
    parameters = sum(p.numel() for p in wrapper.model.parameters()) - embedding
    return 2.0 * parameters * tokens + 4.0 * config.n_layers * tokens * length * config.d_model


def bf16_peak(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "no peak for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAKS:
        if key in name:
            return peak * 1e12, f"{key} dense bf16 peak {peak} TFLOP/s"
    return None, f"unknown bf16 peak for {name}"


# ----- sections ----------------------------------------------------------------------------------------------
DEVICE_TESTS = ("tests/test_option_matrix.py", "tests/test_kv_cache.py", "tests/test_generation_matrix.py",
                "tests/test_compile.py")  # where the tests marked ``device`` are (they need the [test] extra)


def correctness(args: argparse.Namespace, allowance: float) -> dict[str, Any]:
    selection = ["-m", "device"] + (["-k", "bfloat16 or one_step_per_block or llada-none"] if args.quick else [])
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--device", args.device,
               *selection, *DEVICE_TESTS]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=allowance)
        output, status = result.stdout, "pass" if result.returncode == 0 else "fail"
    except subprocess.TimeoutExpired as expired:  # what ran so far still counts
        output, status = expired.stdout or "", "timed out"
        output = output.decode() if isinstance(output, bytes) else output
    passed = len(re.findall(r" PASSED", output))
    failures = re.findall(r"^(\S+) (?:FAILED|ERROR)", output, flags=re.M)
    return {"status": status, "passed": passed, "failed": len(failures), "failures": failures[:20],
            "summary": output.strip().splitlines()[-1] if output.strip() else "", "seconds": time.perf_counter() - started,
            "note": "needs the test extra: pip install -e '.[test]'"}


def step_cost(args: argparse.Namespace, shape: dict, device: torch.device, dtype: torch.dtype,
              allowance: float) -> dict[str, Any]:
    section_end = time.perf_counter() + allowance
    peak, peak_note = bf16_peak(device)
    steps = {"MDLM": 0, "MemDLM preset": 2}
    rows = []
    for length in shape["lengths"]:
        checkpointing = length > shape["lengths"][0]
        row: dict[str, Any] = {"length": length, "activation_checkpointing": checkpointing}
        if time.perf_counter() > section_end:
            rows.append({**row, "skipped": "the section's time was spent"})
            continue
        batch = batch_of(shape, length, device)

        def build(inner_steps: int) -> MemoryWrapper:
            wrapper = random_llada(shape, device, dtype, inner_steps)
            if checkpointing:
                wrapper.model.gradient_checkpointing_enable()
            return wrapper

        peaks: dict[str, int | None] = {}
        for name, inner_steps in steps.items():  # each variant's peak with only its model alive
            wrapper = build(inner_steps)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            wrapper.step(batch)
            peaks[name] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            del wrapper
            if device.type == "cuda":
                torch.cuda.empty_cache()
        variants = {name: build(inner_steps) for name, inner_steps in steps.items()}
        for wrapper in variants.values():  # warm-up
            wrapper.step(batch)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(shape["repeats"]):
            if time.perf_counter() > section_end and all(times.values()):
                break
            for name, wrapper in variants.items():
                synchronize(device)
                started = time.perf_counter()
                wrapper.step(batch)
                synchronize(device)
                times[name].append(time.perf_counter() - started)
        tokens = shape["batch"] * length
        flops = 3.0 * forward_flops(variants["MDLM"], tokens, length)  # forward + backward of one pass
        row["parameters"] = sum(p.numel() for p in variants["MDLM"].model.parameters())
        for name in variants:
            median = statistics.median(times[name])
            row[name] = {"median_seconds": median, "repeats": len(times[name]), "peak_bytes": peaks[name],
                         "mfu": None if peak is None else flops / median / peak}
        row["cost_ratio"] = row["MemDLM preset"]["median_seconds"] / row["MDLM"]["median_seconds"]
        rows.append(row)
        del variants
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"dtype": str(dtype).replace("torch.", ""), "peak": peak_note, "rows": rows,
            "mfu_rule": "3 x (2 x non-embedding parameters x tokens + 4 x layers x tokens x length x d_model) per "
                        "step for both variants, the LM head counted on every token (the step runs it on the "
                        "supervised positions only, so MFU is overstated by the head's share); MemDLM's inner "
                        "passes count as overhead, not as useful work"}


def host_syncs(shape: dict, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    wrapper = random_llada(shape, device, dtype, 2)
    batch = batch_of(shape, shape["lengths"][0], device)
    wrapper.step(batch)  # warm-up
    budget = 1 + wrapper.config.inner.steps + 1 + 1
    # AdamW reads its step counters, CPU tensors that wait for nothing: on a GPU the counter skips reads of CPU
    # tensors; on a CPU, where every read is counted as it would cost on a GPU, the optimizer's are taken off
    # (one per parameter on the CPU's single-tensor path).
    optimizer_reads = 0 if device.type == "cuda" else len(wrapper.trainable_parameters())
    with HostSyncCounter(device_only=device.type == "cuda") as counter:
        wrapper.step(batch)
    result: dict[str, Any] = {"budget": budget, "library_counter": counter.count - optimizer_reads,
                              "adamw_step_counter_reads": optimizer_reads, "events": dict(counter.events)}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            wrapper.step(batch)
            synchronize(device)
        syncs = sum(event.count for event in profiler.key_averages() if "Synchronize" in event.key)
        result["cuda_synchronizations"] = syncs - 1  # less the one this check adds to end the step
    return result


def generation(shape: dict, device: torch.device, dtype: torch.dtype, allowance: float) -> dict[str, Any]:
    section_end = time.perf_counter() + allowance
    wrapper = random_llada(shape, device, dtype, 2)
    wrapper.model.eval()
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, shape["vocab"] - 1, (shape["gen_batch"], shape["prompt"]), generator=generator).to(device)
    common = dict(max_new_tokens=shape["new"], steps=shape["new"], block_length=shape["block"], adapt=False, seed=0)
    # A random model is rarely 0.9 confident: that variant then reveals about one token per step, as uncached.
    variants = {"uncached": {}, "prefix cache": {"cache": "prefix"}, "dual cache": {"cache": "dual"},
                "threshold 0.9 (random model: about one token per step)": {"threshold": 0.9}}
    with torch.no_grad():  # warm-up: kernels, allocator, the first adapt
        wrapper.generate(prompts[:1], **{**common, "max_new_tokens": shape["block"], "steps": shape["block"]})
        wrapper.adapt(prompts[:1])
    rates: dict[str, Any] = {}
    for name, options in variants.items():
        if time.perf_counter() > section_end:
            rates[name] = "skipped: the section's time was spent"
            continue
        synchronize(device)
        started = time.perf_counter()
        with torch.no_grad():
            wrapper.generate(prompts, **common, **options)
        synchronize(device)
        rates[name] = shape["gen_batch"] * shape["new"] / (time.perf_counter() - started)
    adapt_ratio = None
    if time.perf_counter() < section_end:
        timings = []
        for batched in (True, False):
            synchronize(device)
            started = time.perf_counter()
            if batched:
                wrapper.adapt(prompts)
            else:
                for row in prompts:
                    wrapper.adapt(row[None])
            synchronize(device)
            timings.append(time.perf_counter() - started)
        adapt_ratio = timings[0] / timings[1]
    return {"tokens_per_second": rates, "adapt_batched_over_one_at_a_time": adapt_ratio,
            "workload": f"prompt {shape['prompt']}, {shape['new']} new tokens, batch {shape['gen_batch']}, "
                        f"block {shape['block']}, one token per step (threshold: until the block is full)"}


# ----- report --------------------------------------------------------------------------------------------------
def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, section in results["sections"].items():
        if "error" in section:
            lines.append(f"{name}: error {section['error']}")
        elif "skipped" in section:
            lines.append(f"{name}: skipped ({section['skipped']})")
        elif name == "correctness":
            lines.append(f"correctness: {section['status']}, {section.get('passed', 0)} passed, "
                         f"{section.get('failed', 0)} failed ({section['seconds']:.0f} s)")
        elif name == "step_cost":
            parts = []
            for row in section["rows"]:
                if "skipped" in row:
                    parts.append(f"L={row['length']} skipped")
                    continue
                mfu = row["MDLM"]["mfu"]
                parts.append(f"L={row['length']}: MemDLM/MDLM {row.get('cost_ratio', float('nan')):.2f}x, MDLM "
                             f"{row['MDLM']['median_seconds']:.3f} s" + (f", MFU {mfu:.1%}" if mfu else ""))
            lines.append("step cost: " + "; ".join(parts))
        elif name == "host_syncs":
            cuda = section.get("cuda_synchronizations")
            lines.append(f"host syncs per step: library counter {section['library_counter']} (budget "
                         f"{section['budget']}; AdamW's host-side step counters not counted)"
                         + (f", CUDA synchronisations {cuda}" if cuda is not None else ""))
        elif name == "generation":
            rates = ", ".join(f"{k} {v:.0f} tok/s" if isinstance(v, float) else f"{k} {v}"
                              for k, v in section["tokens_per_second"].items())
            ratio = section["adapt_batched_over_one_at_a_time"]
            lines.append(f"generation: {rates}" + (f"; adapt batched / one at a time {ratio:.2f}" if ratio else ""))
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# gpu_check on {results['environment']['device_name']}", "",
             f"Command: `{results['command']}`; {results['seconds']:.0f} s of a {results['budget_seconds']:.0f} s "
             "budget.", ""]
    lines += [f"- {line}" for line in summary_lines(results)]
    cost = results["sections"].get("step_cost", {})
    if cost.get("rows"):
        lines += ["", "| length | checkpointing | variant | median step (s) | peak memory (GiB) | MFU |", "|---|---|---|---|---|---|"]
        for row in cost["rows"]:
            for name in ("MDLM", "MemDLM preset"):
                if name in row and row[name]["median_seconds"] is not None:
                    v = row[name]
                    mfu = f"{v['mfu']:.1%}" if v["mfu"] is not None else "n/a"
                    memory = f"{v['peak_bytes'] / 2**30:.2f}" if v["peak_bytes"] is not None else "n/a"
                    lines.append(f"| {row['length']} | {row['activation_checkpointing']} | {name} | "
                                 f"{v['median_seconds']:.4f} | {memory} | {mfu} |")
        lines += ["", f"MFU rule: {cost['mfu_rule']}; {cost['peak']}."]
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "device": str(device), "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="the 3-minute version (one length, fewer repeats)")
    parser.add_argument("--budget", type=float, help="seconds (default: 480, 180 with --quick; 90 on a CPU)")
    parser.add_argument("--out", default=".", help="folder for gpu_results.json and gpu_results.md")
    parser.add_argument("--sections", nargs="+", choices=sorted(ALLOWANCE), default=list(ALLOWANCE))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    shape = SHAPES["cpu" if device.type != "cuda" else "gpu_quick" if args.quick else "gpu"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seconds = args.budget or (90.0 if device.type != "cuda" else 180.0 if args.quick else 480.0)
    budget = Budget(seconds)
    results: dict[str, Any] = {"command": " ".join(["python benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
                               "environment": environment(device), "budget_seconds": seconds, "sections": {}}
    runs: dict[str, Callable[[float], dict[str, Any]]] = {
        "correctness": lambda allowance: correctness(args, allowance),
        "step_cost": lambda allowance: step_cost(args, shape, device, dtype, allowance),
        "host_syncs": lambda allowance: host_syncs(shape, device, dtype),
        "generation": lambda allowance: generation(shape, device, dtype, allowance),
    }
    for name in ALLOWANCE:
        if name not in args.sections:
            results["sections"][name] = {"skipped": "not selected (--sections)"}
            continue
        allowance = ALLOWANCE[name] * seconds
        needed = max(0.5 * allowance, MINIMUM_SECONDS[name])  # half its share, and never less than it can run in
        if budget.left() < needed:
            results["sections"][name] = {"skipped": f"{max(budget.left(), 0):.0f} s of the budget left, the section "
                                                    f"needs at least {needed:.0f} s"}
            continue
        started = time.perf_counter()
        try:
            results["sections"][name] = runs[name](min(allowance, budget.left()))
            print(summary_lines({"sections": {name: results["sections"][name]}})[0], flush=True)
        except Exception as error:  # a failing section is a finding, not the end of the check
            results["sections"][name] = {"status": "error", "error": f"{type(error).__name__}: {error}"}
            print(f"{name}: error {results['sections'][name]['error']}", flush=True)
        results["sections"][name]["seconds"] = time.perf_counter() - started
        save(results, budget, Path(args.out))  # after every section: an interrupted check keeps what it measured
    save(results, budget, Path(args.out))
    return results


def save(results: dict[str, Any], budget: Budget, out: Path) -> None:
    results["seconds"] = budget.total - budget.left()
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_results.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
