"""Run a worker group's ranks as spawned processes (gloo) and collect rank 0's logits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp

from launcher.groups import free_port
from tests.tiny import make_worker, our_logits


def _rank_main(rank: int, ws: int, port: int, folder: str, tokens, prompt_len, chunk, out):
    worker = make_worker(
        folder,
        rank=rank,
        world_size=ws,
        master_port=port,
        num_threads=1,
        collective_timeout_s=60.0,
    )
    logits = our_logits(worker, tokens, prompt_len, chunk)
    if rank == 0:
        torch.save(logits, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def tp_logits(
    folder: Path, ws: int, tokens: list[int], prompt_len: int, chunk: int | None = None
) -> torch.Tensor:
    out = folder.parent / f"{folder.name}-tp{ws}-logits.pt"
    mp.start_processes(
        _rank_main,
        args=(ws, free_port(), str(folder), tokens, prompt_len, chunk, str(out)),
        nprocs=ws,
        start_method="spawn",
    )
    return torch.load(out)
