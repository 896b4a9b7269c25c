"""One MemDLM step under FSDP2 (``fully_shard``) on CPU with gloo; tests/test_fsdp.py launches it:

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR

Every block and the root are sharded. Each rank adapts its own memory on its shard of the global batch
(its seed is ``config.seed + rank``, as MemDLMTrainer's ranks), weights its outer loss by
``n_local * world / n_global`` (the Trainer's global normalisation) and backpropagates; FSDP
reduce-scatters (averages) theta's gradient. Rank 0 writes the gathered full gradient and each rank its
memory to OUT_DIR, once with prefix sharing and once without.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from ddp_worker import global_examples, recipe, tiny_model
from bilevel_dlm import MemoryWrapper
from bilevel_dlm.data import pad_collate
from torchrun import end_worker


def one_step(out_dir: Path, rank: int, world: int, share_prefix: bool) -> None:
    model = tiny_model()
    for block in model.model.transformer.blocks:
        fully_shard(block)
    fully_shard(model)
    config = recipe()
    wrapper = MemoryWrapper(model, config.model_copy(update={"seed": config.seed + rank}))
    wrapper.share_prefix = share_prefix
    examples = global_examples()
    per_rank = len(examples) // world
    batch = wrapper.prepare(pad_collate(examples[rank * per_rank:(rank + 1) * per_rank], wrapper.pad_token_id()))
    local = wrapper.outer.denominator(batch.maskable).float()
    total = local.clone()
    dist.all_reduce(total)
    with wrapper.bilevel_context():
        loss, _, _ = wrapper.compute_loss(batch)
        (loss * local * world / total).backward()
    gradients = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    torch.save(wrapper.memory.state(), out_dir / f"memory_share_{share_prefix}_rank{rank}.pt")
    if rank == 0:
        torch.save(gradients, out_dir / f"gradients_share_{share_prefix}.pt")


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for share_prefix in (False, True):
        one_step(out_dir, dist.get_rank(), dist.get_world_size(), share_prefix)
    end_worker()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
