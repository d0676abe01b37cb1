"""Run a worker group's ranks as spawned processes (gloo) and collect rank 0's logits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp

from launcher.groups import free_port
from tests.support.tiny import make_worker, our_logits


def _rank_main(rank: int, ws: int, port: int, folder: str, tokens, prompt_len, chunk, out, kw):
    worker = make_worker(
        folder,
        rank=rank,
        world_size=ws,
        master_port=port,
        num_threads=1,
        collective_timeout_s=60.0,
        **kw,
    )
    logits = our_logits(worker, tokens, prompt_len, chunk)
    if rank == 0:
        torch.save(logits, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def tp_logits(
    folder: Path, ws: int, tokens: list[int], prompt_len: int, chunk: int | None = None, **kw
) -> torch.Tensor:
    """Rank 0's logits of `our_logits` with every rank in its own process; `kw` goes to each
    rank's ShardSpec."""
    out = folder.parent / f"{folder.name}-tp{ws}-logits.pt"
    mp.start_processes(
        _rank_main,
        args=(ws, free_port(), str(folder), tokens, prompt_len, chunk, str(out), kw),
        nprocs=ws,
        start_method="spawn",
    )
    return torch.load(out)


def _reduce_main(rank: int, ws: int, port: int, out: str):
    from shards.distributed import init_group

    pctx, _ = init_group(rank, ws, "cpu", "127.0.0.1", port, 60.0)
    results = {}
    for n in (7, pctx.gather_reduce_max, pctx.gather_reduce_max + 1):  # gather path, then ring
        x = torch.arange(n, dtype=torch.float32) * (rank + 1)
        results[n] = pctx.all_reduce(x.clone())
    torch.save(results, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def all_reduce_results(tmp: Path, ws: int) -> list[dict]:
    """Each rank's all_reduce of arange(n) * (rank + 1), for sizes on both sides of the
    gather threshold."""
    out = str(tmp / "reduce")
    mp.start_processes(_reduce_main, args=(ws, free_port(), out), nprocs=ws, start_method="spawn")
    return [torch.load(f"{out}.{r}") for r in range(ws)]
