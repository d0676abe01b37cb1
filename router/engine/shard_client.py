"""The router's end of a shard's unix socket: one request frame, one answer frame."""

from __future__ import annotations

import contextlib
import socket
import time

import orjson

from shards import wire
from shards.wire import ShardInfo, StepPlan, StepResult, frame, recv_frame, send_frame


class ShardError(RuntimeError):
    pass


class ShardClient:
    def __init__(
        self, socket_path: str, is_alive=lambda: True, connect_timeout: float = 60.0
    ) -> None:
        """Connect to a shard that is starting; `is_alive` lets us stop waiting on a dead one."""
        deadline = time.monotonic() + connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if not is_alive():
                    raise ShardError(f"shard exited before opening {socket_path}") from None
                if time.monotonic() > deadline:
                    raise ShardError(
                        f"shard did not open {socket_path} in {connect_timeout}s"
                    ) from None
                time.sleep(0.05)
        self.sock = sock
        self._info: ShardInfo | None = None

    def wait_ready(self) -> ShardInfo:
        try:
            msg = recv_frame(self.sock)
        except ConnectionError as e:
            raise ShardError("shard closed the connection while loading") from e
        if msg["type"] != wire.READY:
            raise ShardError(msg.get("message", "shard failed to start"))
        self._info = ShardInfo.from_dict(msg["info"])
        return self._info

    def info(self) -> ShardInfo:
        return self._info or self.wait_ready()

    def execute(self, plan: StepPlan) -> StepResult:
        send_frame(self.sock, frame(wire.PLAN, plan=plan))
        msg = recv_frame(self.sock)
        if msg["type"] != wire.RESULT:
            raise ShardError(msg.get("message", f"unexpected frame {msg['type']!r}"))
        return StepResult.from_dict(msg["result"])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            send_frame(self.sock, frame(wire.SHUTDOWN))
        self.sock.close()


class AsyncShardClient:
    """The same protocol over asyncio streams, for the router's event loop."""

    def __init__(self, reader, writer) -> None:
        self._reader, self._writer = reader, writer
        self.info: ShardInfo | None = None

    @staticmethod
    async def connect(socket_path: str, timeout: float = 600.0) -> AsyncShardClient:
        """Connect to a starting shard and wait until its model is loaded."""
        import asyncio

        deadline = time.monotonic() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(socket_path, limit=1 << 26)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise ShardError(f"shard did not open {socket_path} in {timeout}s") from None
                await asyncio.sleep(0.05)
        client = AsyncShardClient(reader, writer)
        msg = await client._recv()
        if msg["type"] != wire.READY:
            raise ShardError(msg.get("message", "shard failed to start"))
        client.info = ShardInfo.from_dict(msg["info"])
        return client

    async def _recv(self) -> dict:
        import asyncio

        try:
            header = await self._reader.readexactly(4)
            payload = await self._reader.readexactly(int.from_bytes(header, "big"))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise ShardError("shard connection closed") from e
        return orjson.loads(payload)

    async def execute(self, plan: StepPlan) -> StepResult:
        payload = orjson.dumps(frame(wire.PLAN, plan=plan))
        self._writer.write(len(payload).to_bytes(4, "big") + payload)
        await self._writer.drain()
        msg = await self._recv()
        if msg["type"] != wire.RESULT:
            raise ShardError(msg.get("message", f"unexpected frame {msg['type']!r}"))
        return StepResult.from_dict(msg["result"])

    def close(self) -> None:
        self._writer.close()
