"""Shard process entry point: load a `Worker` and serve step plans over a unix socket.

    python -m shards.server --socket PATH --spec JSON

The shard listens, accepts one router connection, then loads the model and answers with a
`ready` frame (its `ShardInfo`) or an `error` frame. Each `plan` frame gets a `result` frame.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

import orjson

from shards.wire import ShardSpec, StepPlan, recv_frame, send_frame, to_dict

log = logging.getLogger("shardserve.shard")


def serve(socket_path: str, spec: ShardSpec) -> int:
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(1)
    conn, _ = server.accept()
    server.close()
    try:
        from shards.worker import Worker

        worker = Worker(spec)
    except Exception as e:  # any load failure is reported to the router, then we exit
        log.error("shard %d failed to start: %s", spec.rank, e)
        send_frame(conn, {"type": "error", "message": f"{type(e).__name__}: {e}"})
        return 1
    send_frame(conn, {"type": "ready", "info": to_dict(worker.info())})
    while True:
        try:
            msg = recv_frame(conn)
        except ConnectionError:
            return 0
        kind = msg["type"]
        if kind == "plan":
            result = worker.execute(StepPlan.from_dict(msg["plan"]))
            send_frame(conn, {"type": "result", "result": result})
        elif kind == "shutdown":
            return 0
        else:
            send_frame(conn, {"type": "error", "message": f"unknown message type {kind!r}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="shardserve shard process")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--spec", required=True, help="ShardSpec as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return serve(args.socket, ShardSpec.from_dict(orjson.loads(args.spec)))


if __name__ == "__main__":
    sys.exit(main())
