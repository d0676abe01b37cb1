"""A worker group's process group and the channel rank 0 uses to hand each step to its peers.

The model's collectives (all-reduce, all-gather) run on the default group: NCCL on CUDA, gloo
on CPU. Plans are small host-side bytes, so they always travel over a gloo group: on CUDA a
second group, on CPU the default one.

Peers block in a broadcast between steps. The broadcast times out like any collective, so an
idle rank 0 sends a heartbeat every `timeout / 4` seconds; a rank that dies or hangs makes the
next collective fail within the timeout instead of hanging the group.
"""

from __future__ import annotations

import datetime
import logging

import orjson
import torch
import torch.distributed as dist

from layers.parallel import SINGLE, ParallelContext

log = logging.getLogger("shardserve.distributed")


GLOO_GATHER_REDUCE_MAX = 1 << 16  # elements: a decode batch's activations, not a long prefill


class CollectiveError(RuntimeError):
    """A peer left the group, hung past the timeout, or never joined."""


def init_group(
    rank: int,
    world_size: int,
    device: str,
    master_addr: str,
    master_port: int,
    timeout_s: float,
) -> tuple[ParallelContext, object]:
    """Join the group; returns the layers' context and the group that carries plans."""
    if world_size == 1:
        return SINGLE, None
    return join_group(rank, world_size, device, master_addr, master_port, timeout_s)


def join_group(
    rank: int,
    world_size: int,
    device: str,
    master_addr: str,
    master_port: int,
    timeout_s: float,
) -> tuple[ParallelContext, object]:
    """`init_group` without its shortcut for one rank: a group of one still builds the NCCL
    communicator and the gloo plan group, which is how a single GPU can check that wiring."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    extra = {}
    if backend == "nccl":
        cuda = torch.device(device)
        if cuda.index is None:
            cuda = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(cuda)
        # Binds the communicator to this GPU up front: NCCL then sets up at join, where a
        # failure names the rendezvous, rather than at the first collective.
        extra["device_id"] = cuda
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            **extra,
        )
    except Exception as e:  # rendezvous timeout or refused connection
        raise CollectiveError(
            f"rank {rank} of {world_size} could not join the group at "
            f"{master_addr}:{master_port} within {timeout_s:.0f}s: {e}"
        ) from e
    plan_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    log.info(
        "rank %d/%d joined the %s group at %s:%d",
        rank,
        world_size,
        backend,
        master_addr,
        master_port,
    )
    gather_reduce_max = GLOO_GATHER_REDUCE_MAX if backend == "gloo" else 0
    return ParallelContext(rank, world_size, gather_reduce_max=gather_reduce_max), plan_group


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def min_over_ranks(value: int, pctx: ParallelContext, cpu_group=None) -> int:
    """Every rank must agree on sizes the router sees (KV blocks): take the smallest."""
    if pctx.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group)
    return int(t.item())


class PlanChannel:
    """Rank 0 broadcasts one orjson message per step (a length, then the bytes); peers receive
    it. Messages: shards/wire.py's PLAN, PING and SHUTDOWN frames."""

    def __init__(self, pctx: ParallelContext, group=None) -> None:
        self.pctx = pctx
        self.group = group

    def _broadcast(self, t: torch.Tensor) -> None:
        try:
            dist.broadcast(t, src=0, group=self.group)
        except Exception as e:
            raise CollectiveError(
                f"rank {self.pctx.rank}: lost the group while passing a step: {e}"
            ) from e

    def send(self, message: dict) -> None:
        data = orjson.dumps(message)
        self._broadcast(torch.tensor([len(data)], dtype=torch.int64))
        self._broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def recv(self) -> dict:
        header = torch.empty(1, dtype=torch.int64)
        self._broadcast(header)
        buf = torch.empty(int(header.item()), dtype=torch.uint8)
        self._broadcast(buf)
        return orjson.loads(buf.numpy().tobytes())
