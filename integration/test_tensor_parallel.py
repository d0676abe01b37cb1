"""Tensor parallelism, worker groups and multi-node through the real launcher: the same greedy
text as one rank, requests spread over groups, a dead rank or group reported, a node that never
joins refused."""

from __future__ import annotations

import contextlib
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from integration.conftest import Server, free_port, shard_pids, start_server, wait_until

PROMPTS = ["Hello there", "The capital of France is", "1, 2, 3, 4,", "Once upon a time"]


def _complete(server: Server, prompt: str, max_tokens: int = 12) -> str:
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def reference(tiny_server) -> dict[str, str]:
    return {p: _complete(tiny_server, p) for p in PROMPTS}


def _start(tmp_path_factory, name: str, folder, *args, env=None) -> Server:
    server = start_server(
        tmp_path_factory,
        name,
        ["--model-path", str(folder), "--kv-cache-memory", "64MiB", *args],
        env=env,
    )
    server.marker = str(folder)
    return server


def test_tp2_gives_the_same_greedy_text_as_one_rank(tmp_path_factory, tiny_folder, reference):
    server = _start(tmp_path_factory, "tp2", tiny_folder, "--num-gpus", "2")
    try:
        assert {p: _complete(server, p) for p in PROMPTS} == reference
        assert "2 worker group" not in server.logs()
        assert "TP 2" in server.logs()
    finally:
        server.stop()


def test_worker_groups_share_the_load_and_survive_a_dead_group(
    tmp_path_factory, tiny_folder, reference
):
    server = _start(
        tmp_path_factory, "groups", tiny_folder, "--num-gpus", "2", env={"WORKER_NUM": "2"}
    )
    try:
        prompts = PROMPTS * 3
        with ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(lambda p: _complete(server, p), prompts))
        assert texts == [reference[p] for p in prompts]
        groups = server.stats()["groups"]
        assert [g["group"] for g in groups] == [0, 1]
        assert all(g["dispatched"] > 0 for g in groups)
        assert sum(g["finished"]["length"] for g in groups) == len(prompts)

        (victim,) = shard_pids(server.marker, rank=1, group=0)
        os.kill(victim, signal.SIGKILL)
        # every request is still answered: one that lands on the dead group before the router
        # knows is retried on the live one
        assert [_complete(server, p) for p in PROMPTS] == [reference[p] for p in PROMPTS]
        assert httpx.get(f"{server.url}/health").json() == {
            "status": "ok",
            "dead_worker_groups": [0],
        }
        assert server.proc.poll() is None
        # the launcher's process monitor logs it when its own poll sees the exit, which may
        # come after the router has already marked the group dead
        assert wait_until(
            lambda: "worker group 0 is down; 1 group(s) still serving" in server.logs()
        )
    finally:
        server.stop()


def test_dead_rank_stops_a_single_group_server(tmp_path_factory, tiny_folder):
    server = _start(tmp_path_factory, "tp-kill", tiny_folder, "--num-gpus", "2")
    (victim,) = shard_pids(server.marker, rank=1, group=0)
    os.kill(victim, signal.SIGKILL)
    assert server.proc.wait(timeout=120) != 0
    assert "shard 1/2 of worker group 0" in server.logs()
    server.stop()


def test_two_nodes_on_one_machine(tmp_path_factory, tiny_folder, reference):
    port = free_port()
    common = ["--nnodes", "2", "--master-port", str(port), "--master-addr", "127.0.0.1"]
    log = tmp_path_factory.mktemp("node1") / "server.log"
    node1 = Server(
        [
            "--model-path",
            str(tiny_folder),
            "--kv-cache-memory",
            "64MiB",
            *common,
            "--node-rank",
            "1",
        ],
        log_path=log,
    )
    try:
        node0 = _start(tmp_path_factory, "node0", tiny_folder, *common, "--node-rank", "0")
        try:
            assert {p: _complete(node0, p) for p in PROMPTS} == reference
            assert "TP 2 over 2 node(s)" in node0.logs()
        finally:
            node0.stop()
        assert node1.proc.wait(timeout=60) == 0  # node 0's shutdown reaches node 1
        assert "node 1 of 2" in node1.logs()
    finally:
        node1.stop()


def test_node_that_never_joins_is_a_clear_error(tmp_path_factory, tiny_folder):
    log = tmp_path_factory.mktemp("lonely") / "server.log"
    server = Server(
        ["--model-path", str(tiny_folder), "--nnodes", "2", "--master-port", str(free_port())],
        env={"COLLECTIVE_TIMEOUT": "5"},
        log_path=log,
    )
    assert server.proc.wait(timeout=120) == 1
    assert "could not join the group" in server.logs()
    server.stop()


def test_hung_rank_fails_requests_and_stops_the_server(tmp_path_factory, tiny_folder):
    server = _start(
        tmp_path_factory,
        "tp-hang",
        tiny_folder,
        "--num-gpus",
        "2",
        env={"COLLECTIVE_TIMEOUT": "10"},
    )
    (victim,) = shard_pids(server.marker, rank=1, group=0)
    os.kill(victim, signal.SIGSTOP)
    try:
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "Hello", "max_tokens": 4, "temperature": 0},
            timeout=120,
        )
        assert r.status_code == 503, r.text  # an error within the timeout, never a hang
        assert server.proc.wait(timeout=120) != 0
        assert "shard 0/2 of worker group 0" in server.logs()
    finally:
        with contextlib.suppress(ProcessLookupError):  # the launcher has killed it by now
            os.kill(victim, signal.SIGCONT)
        server.stop()
