"""Shard process entry point: load a `Worker` and serve step plans.

    python -m shards.server --spec JSON [--socket PATH]

Rank 0 of a worker group listens on the unix socket, accepts one router connection, then loads
the model and answers with a `ready` frame (its `ShardInfo`) or an `error` frame. Each `plan`
frame gets a `result` frame. With tensor parallelism, rank 0 also broadcasts every plan to its
peers (`shards/distributed.py`), which run the same forward and send nothing back.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import socket
import sys

import orjson

from shards import logs, wire
from shards.distributed import PlanChannel, leave_group
from shards.wire import (
    STOP_SIGNAL,
    ShardSpec,
    StepPlan,
    frame,
    leave_stop_signals_to_launcher,
    recv_frame,
    send_frame,
    to_dict,
)

log = logging.getLogger("shardserve.shard")


def _accept(socket_path: str) -> socket.socket:
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(1)
    conn, _ = server.accept()
    server.close()
    return conn


def _name(spec: ShardSpec) -> str:
    return f"shard {spec.rank}/{spec.world_size} of group {spec.group_index}"


def serve(socket_path: str | None, spec: ShardSpec) -> int:
    if spec.rank == 0 and socket_path is None:
        raise ValueError("rank 0 needs --socket")
    conn = _accept(socket_path) if spec.rank == 0 else None
    try:
        try:
            from shards.worker import Worker

            worker = Worker(spec)
        except Exception as e:  # any load failure is reported to the router, then we exit
            log.error("%s failed to start: %s", _name(spec), e)
            if conn is not None:
                send_frame(conn, frame(wire.ERROR, message=f"{type(e).__name__}: {e}"))
            return 1
        channel = PlanChannel(worker.pctx, worker.plan_group) if spec.world_size > 1 else None
        try:
            if conn is None:
                return _follow(worker, channel)
            return _lead(conn, worker, channel, spec.collective_timeout_s / 4)
        except Exception as e:  # a peer left or hung (a collective failed), or a step broke
            log.error("%s stopped: %s: %s", _name(spec), type(e).__name__, e)
            if conn is not None:
                with contextlib.suppress(OSError):
                    send_frame(conn, frame(wire.ERROR, message=str(e)))
            return 1
    finally:
        leave_group()


class _StopSignal:
    """The launcher's STOP_SIGNAL on rank 0 of a group: finish the step, tell the peers (maybe on
    other nodes) to shut down, then exit. A wake-up pipe interrupts the wait between steps. (A
    rank without peers, or a follower, takes the signal's default action: it ends.)"""

    def __init__(self) -> None:
        self.received = False
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(STOP_SIGNAL, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = True


def _lead(conn: socket.socket, worker, channel: PlanChannel | None, heartbeat_s: float) -> int:
    stop = _StopSignal() if channel is not None else None
    send_frame(conn, frame(wire.READY, info=to_dict(worker.info())))
    while True:
        if stop is not None:
            readable = select.select([conn, stop.wake_r], [], [], heartbeat_s)[0]
            if stop.received:
                with contextlib.suppress(RuntimeError, OSError):  # peers stopped as well
                    channel.send(frame(wire.SHUTDOWN))
                return 0
            if not readable:
                channel.send(frame(wire.PING))  # peers time out if the group stays silent
                continue
            if stop.wake_r in readable:
                os.read(stop.wake_r, 512)  # another signal's wake-up byte: drain it
            if conn not in readable:
                continue
        try:
            msg = recv_frame(conn)
        except ConnectionError:
            msg = frame(wire.SHUTDOWN)
        kind = msg["type"]
        if kind == wire.PLAN:
            if channel is not None:
                channel.send(msg)
            result = worker.execute(StepPlan.from_dict(msg["plan"]))
            send_frame(conn, frame(wire.RESULT, result=result))
        elif kind == wire.SHUTDOWN:
            if channel is not None:
                channel.send(msg)
            return 0
        else:
            send_frame(conn, frame(wire.ERROR, message=f"unknown message type {kind!r}"))


def _follow(worker, channel: PlanChannel) -> int:
    while True:
        msg = channel.recv()
        if msg["type"] == wire.PLAN:
            worker.execute(StepPlan.from_dict(msg["plan"]))
        elif msg["type"] == wire.SHUTDOWN:
            return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="shardserve shard process")
    parser.add_argument("--socket", default=None, help="unix socket (rank 0 only)")
    parser.add_argument("--spec", required=True, help="ShardSpec as JSON")
    args = parser.parse_args(argv)
    leave_stop_signals_to_launcher()
    logs.configure()
    return serve(args.socket, ShardSpec.from_dict(orjson.loads(args.spec)))


if __name__ == "__main__":
    sys.exit(main())
