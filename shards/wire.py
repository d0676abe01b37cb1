"""Router ↔ shard messages: plain dataclasses, stdlib + orjson only (the router imports this).

A step plan carries ids and counts: which sequences run how many tokens at which positions,
over which KV blocks. A sequence's sampling parameters travel once, when it first appears.
Frames on a socket are a 4-byte big-endian length followed by one orjson document.
Also here: what the launcher's signals mean to the processes it starts.
"""

from __future__ import annotations

import signal
import socket
import struct
from dataclasses import asdict, dataclass, field

import orjson


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: plus the top k
    prompt_logprobs: int | None = None  # the same for each prompt token (scoring a text)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


@dataclass(slots=True)
class NewSeq:
    seq_id: int
    sampling: SamplingParams
    prompt_token_ids: list[int]  # sent only when a penalty needs the prompt; else empty


@dataclass(slots=True)
class ScheduledSeq:
    seq_id: int
    token_ids: list[int]  # the tokens this sequence runs now
    start_pos: int  # position of token_ids[0] == tokens already in the KV cache
    block_table: list[int]  # covers start_pos + len(token_ids) tokens
    sample: bool  # whether a token is sampled after the last one
    # For prompt logprobs: the prompt token that follows each of token_ids, as far as the
    # prompt goes (one fewer than token_ids for the chunk that ends the prompt).
    prompt_targets: list[int] | None = None
    # Lookahead: token_ids[1:] are draft tokens of a tree; draft i's parent is the entry
    # draft_parents[i] of token_ids (0 = the real token). Its K/V go to slot start_pos + 1 + i,
    # at position start_pos + its depth.
    draft_parents: list[int] | None = None


@dataclass(slots=True)
class StepPlan:
    step_id: int
    seqs: list[ScheduledSeq]
    new_seqs: list[NewSeq] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # drop their sampler state
    # (from, to) cache slots: accepted draft K/V moved into place before this step's forward
    kv_moves: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @staticmethod
    def from_dict(d: dict) -> StepPlan:
        return StepPlan(
            step_id=d["step_id"],
            seqs=[ScheduledSeq(**s) for s in d["seqs"]],
            new_seqs=[
                NewSeq(n["seq_id"], SamplingParams(**n["sampling"]), n["prompt_token_ids"])
                for n in d["new_seqs"]
            ],
            finished_seq_ids=d["finished_seq_ids"],
            kv_moves=[tuple(m) for m in d.get("kv_moves", ())],
        )


@dataclass(slots=True)
class SeqOutput:
    seq_id: int
    token_ids: list[int]
    logprobs: list[float] | None = None  # one per token in token_ids
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float] | None = None  # one per prompt target in the plan
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    accepted: list[int] | None = None  # lookahead: tree indices of the accepted draft path


@dataclass(slots=True)
class StepResult:
    step_id: int
    # One per sequence that sampled a token or scored prompt tokens, in plan order.
    outputs: list[SeqOutput]
    forward_seconds: float = 0.0

    @staticmethod
    def from_dict(d: dict) -> StepResult:
        def pairs(rows):
            return None if rows is None else [[tuple(p) for p in row] for row in rows]

        outputs = [
            SeqOutput(
                o["seq_id"],
                o["token_ids"],
                o["logprobs"],
                pairs(o["top_logprobs"]),
                o["prompt_logprobs"],
                pairs(o["prompt_top_logprobs"]),
                o.get("accepted"),
            )
            for o in d["outputs"]
        ]
        return StepResult(d["step_id"], outputs, d["forward_seconds"])


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """Everything a shard needs to load its model and size its cache. What a `Config` sets
    has no default here: launcher/plan.py derives it (`shard_spec`)."""

    model_path: str
    dtype: str | None  # None: shards/dtypes.py's default; "auto": the checkpoint's
    block_size: int
    kv_cache_memory: int  # bytes, CPU only
    gpu_memory_utilization: float
    max_model_len: int | None
    max_num_batched_tokens: int
    seed: int | None
    quantization: str
    enforce_eager: bool  # False: decode steps replay as CUDA graphs where they can
    cpu_compile: bool  # decode steps run torch.compile'd on CPU where they can
    lookahead: bool  # the router drafts trees: compile steps that verify them too
    master_addr: str  # the group's rendezvous, when world_size > 1
    master_port: int
    collective_timeout_s: float
    # set per machine and rank by the launcher, or turned by tests and benchmarks
    device: str = "cpu"  # "cpu" or "cuda"
    fast_kernels: bool = True  # False: only the plain-torch reference paths (tests)
    cpu_kernels: bool = True  # the hand-written CPU kernels (shards/kernels.py), where built
    rank: int = 0
    world_size: int = 1
    group_index: int = 0  # which worker group (WORKER_NUM), for messages
    num_threads: int | None = None
    progress: bool = True

    @staticmethod
    def from_dict(d: dict) -> ShardSpec:
        return ShardSpec(**d)


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """What a loaded shard reports back."""

    num_blocks: int  # usable KV blocks (block 0 is reserved as the null block)
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    device: str
    attention_backend: str
    weight_bytes: int
    kv_block_bytes: int
    # Row counts of compiled steps that verify one sequence's draft tree (empty: none); a
    # tree's rows are padded to the next of them, so drafts sized to fill one cost no more.
    tree_rows: tuple[int, ...] = ()

    @staticmethod
    def from_dict(d: dict) -> ShardInfo:
        return ShardInfo(
            **{
                **d,
                "eos_token_ids": tuple(d["eos_token_ids"]),
                "tree_rows": tuple(d.get("tree_rows", ())),
            }
        )


def to_dict(obj) -> dict:
    return asdict(obj)


# -- frames --------------------------------------------------------------------------------------
# Each frame on the router <-> shard socket is {"type": KIND, ...}, 4-byte length first: the
# router sends PLAN ("plan": a StepPlan) and SHUTDOWN; the shard answers READY ("info": its
# ShardInfo) once loaded, RESULT ("result": a StepResult) for each plan, and ERROR ("message")
# when it cannot go on. Rank 0 passes PLAN and SHUTDOWN on to its tensor-parallel peers, and
# PING while the group is idle (shards/distributed.py: PlanChannel).
PLAN, RESULT, READY, ERROR, SHUTDOWN, PING = "plan", "result", "ready", "error", "shutdown", "ping"


def frame(kind: str, **fields) -> dict:
    return {"type": kind, **fields}


_HEADER = struct.Struct(">I")


def send_frame(sock: socket.socket, message: dict | object) -> None:
    payload = orjson.dumps(message)
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("shard connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> dict:
    (length,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return orjson.loads(_recv_exact(sock, length))


# -- the launcher's signals to its children ----------------------------------------------------
# SIGTERM and SIGINT are the launcher's to act on: a service manager (systemd's control-group
# kill) or a terminal's Ctrl-C sends them to every process of the server at once, and a child
# that stopped on them would cut the requests in flight that the launcher is draining. The
# launcher passes its decisions on with these two instead.
DRAIN_SIGNAL = signal.SIGUSR1  # the router: finish the requests in flight, then exit 0
STOP_SIGNAL = signal.SIGUSR2  # every child: stop now


def _leave_to_launcher(signum, frame) -> None:
    pass


def leave_stop_signals_to_launcher() -> None:
    """For a child of the launcher: SIGTERM and SIGINT do nothing here. A Python handler rather
    than SIG_IGN, which processes this one starts (compile workers) would inherit."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _leave_to_launcher)
