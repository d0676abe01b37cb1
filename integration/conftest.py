"""Start the real `shardserve serve` as a subprocess on a free port and talk to it over HTTP."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from launcher.groups import free_port
from tests.support.tiny import build_hf_model, save_checkpoint, tiny_config

ROOT = Path(__file__).resolve().parent.parent
STARTUP_DEADLINE = 300.0


# The console script `make venv` installs beside this interpreter: what users run.
SHARDSERVE = str(Path(sys.executable).with_name("shardserve"))
SERVE = [SHARDSERVE, "serve"]


def _environ(extra: dict | None) -> dict:
    """The server's environment. Servers compute in float32 unless a test says otherwise: tests
    compare their text and logits with transformers in float32, and the CPU default dtype
    depends on the host (shards/dtypes.py). A None value removes the variable."""
    env = {"DTYPE": "float32", **os.environ, **(extra or {})}
    return {k: v for k, v in env.items() if v is not None}


class Server:
    def __init__(
        self,
        args: list[str],
        env: dict | None = None,
        log_path: Path | None = None,
        command: list[str] = SERVE,
        own_group: bool = False,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                *command,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *args,
            ],
            cwd=ROOT,
            env=_environ(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=own_group,  # a process group of its own, to signal as a whole
        )

    def wait_ready(self, deadline: float = STARTUP_DEADLINE) -> Server:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs(5000)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {deadline}s:\n{self.logs(5000)}")

    def logs(self, tail: int | None = None) -> str:
        """The server's whole log (or its last `tail` characters, for error messages)."""
        text = self.log_path.read_text(errors="replace") if self.log_path else ""
        return text[-tail:] if tail else text

    def stats(self, **kw) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=10, **kw).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    from launcher.embedded import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, embedded_folder) -> Path:
    """A tiny random Llama that speaks the embedded model's tokenizer (and chat template)."""
    hf = build_hf_model(
        tiny_config(
            "llama", vocab_size=49152, eos_token_id=2, bos_token_id=1, max_position_embeddings=512
        )
    )
    folder = save_checkpoint(hf, tmp_path_factory.mktemp("tiny-llama"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (embedded_folder / name).exists():
            shutil.copy(embedded_folder / name, folder / name)
    return folder


def wait_until(predicate, deadline: float = 60.0) -> bool:
    """Poll until `predicate()` holds; False if the deadline passes first."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def shard_pids(marker: str, rank: int = 0, group: int = 0) -> list[int]:
    """Pids of the shard processes of `rank` in worker `group` whose command line holds
    `marker` (a server's model folder, unique to it)."""
    needle = f'"rank":{rank},"world_size":'
    group_needle = f'"group_index":{group},'
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            continue
        if "shards.server" in cmd and needle in cmd and group_needle in cmd and marker in cmd:
            pids.append(int(pid))
    return pids


def start_server(
    tmp_path_factory, name: str, args: list[str], env: dict | None = None, own_group: bool = False
) -> Server:
    log = tmp_path_factory.mktemp(f"server-{name}") / "server.log"
    return Server(args, env, log, own_group=own_group).wait_ready()


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory):
    server = start_server(
        tmp_path_factory,
        "embedded",
        ["--kv-cache-memory", "1GiB"],
        env={"MODEL_PATH": "/data/model"},
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_folder):
    server = start_server(
        tmp_path_factory, "tiny", ["--model-path", str(tiny_folder), "--kv-cache-memory", "64MiB"]
    )
    yield server
    server.stop()
