"""Lay out worker groups: one shard process per tensor-parallel rank, WORKER_NUM groups.

Group g uses GPUs g*TP … g*TP+TP-1; on CPU each rank gets an equal share of the cores.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import orjson

from shards.wire import ShardSpec, to_dict


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def shard_argv(spec: ShardSpec, socket_path: str) -> list[str]:
    """`python -m shards.server` arguments for one rank; rank 0 alone listens for the router."""
    argv = ["--spec", orjson.dumps(to_dict(spec)).decode()]
    return argv + ["--socket", socket_path] if spec.rank == 0 else argv


def socket_path(socket_dir: str, group_index: int) -> str:
    return os.path.join(socket_dir, f"shard-{group_index}.sock")


def cpu_threads(num_processes: int) -> int | None:
    """Threads per rank on CPU; None (torch's default) when one process has the machine."""
    if num_processes <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // num_processes)


def group_specs(
    base: ShardSpec,
    tp: int,
    group_index: int = 0,
    num_groups: int = 1,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
) -> list[ShardSpec]:
    """The specs of worker group `group_index`'s ranks that run on this node: ranks
    node_rank*TP/nnodes … (node_rank+1)*TP/nnodes-1, each on the next local GPU."""
    per_node = tp // nnodes
    port = master_port or (free_port(master_addr) if tp > 1 else 0)
    threads = base.num_threads
    if base.device == "cpu" and threads is None:
        threads = cpu_threads(per_node * num_groups)
    specs = []
    for local in range(per_node):
        device = base.device
        if base.device.startswith("cuda"):
            device = f"cuda:{group_index * per_node + local}"
        rank = node_rank * per_node + local
        specs.append(
            dataclasses.replace(
                base,
                rank=rank,
                world_size=tp,
                group_index=group_index,
                master_addr=master_addr,
                master_port=port,
                device=device,
                num_threads=threads,
                progress=base.progress and rank == 0,
            )
        )
    return specs
