"""One shard: builds its slice of the model from a `ShardSpec`, sizes and allocates the KV cache,
and executes step plans. Transport-agnostic: `shards/server.py` puts it behind a socket, the
offline API calls it in-process."""

from __future__ import annotations

import logging

import torch

from layers.attention.backend import Attention, select_backend
from layers.quant import int8
from layers.rotary import rope_type
from shards import kernels, kv_cache
from shards.compiled_decode import COMPILED_MODES, CompiledDecode
from shards.cuda_graphs import DecodeGraphs
from shards.distributed import init_group, min_over_ranks
from shards.dtypes import resolve_dtype
from shards.heap import HeapTrimmer
from shards.loader import load_weights
from shards.model_config import ModelConfig, check_tensor_parallel, load_model_config
from shards.models.base import BuildContext
from shards.models.registry import model_class
from shards.runner import ModelRunner
from shards.wire import ShardInfo, ShardSpec, StepPlan, StepResult

log = logging.getLogger("shardserve.worker")


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights as served: quantized layers count their quantized form (whatever
    parameters hold it) plus their bias, a tied weight counts once, packed copies replace what
    they pack."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        quant = getattr(m, "quant", None)
        quantized = quant is not None and getattr(m, "weight", None) is None  # and float freed
        if quantized:
            total += quant.weight_bytes(m)
        packed = getattr(m, "packed_weight", None)
        for name, p in m.named_parameters(recurse=False):
            if id(p) in seen or (name == "weight" and packed is not None):
                continue
            seen.add(id(p))
            if not quantized or name == "bias":
                total += p.numel() * p.element_size()
        if packed is not None:
            total += packed.numel() * packed.element_size()
    return total


def resolve_max_model_len(cfg: ModelConfig, requested: int | None) -> int:
    return requested or cfg.max_position_embeddings


class Worker:
    def __init__(self, spec: ShardSpec, cuda_graphs: bool | None = None) -> None:
        """cuda_graphs: replay decode steps as CUDA graphs where this shard can (default: the
        opposite of the spec's ENFORCE_EAGER)."""
        self.spec = spec
        if cuda_graphs is None:
            cuda_graphs = not spec.enforce_eager
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        self.device = torch.device(spec.device)
        self.cfg = load_model_config(spec.model_path)
        self.dtype = resolve_dtype(
            spec.dtype, self.device, self.cfg.checkpoint_dtype, spec.quantization
        )
        self.max_model_len = resolve_max_model_len(self.cfg, spec.max_model_len)
        backend = select_backend(self.device, self.dtype)
        self.block_size = spec.block_size
        if backend.name == "flash-attn":
            from layers.attention.flash import REQUIRED_BLOCK_MULTIPLE

            self.block_size = (
                -(-spec.block_size // REQUIRED_BLOCK_MULTIPLE) * REQUIRED_BLOCK_MULTIPLE
            )
        check_tensor_parallel(self.cfg, spec.world_size)
        self.pctx, self.plan_group = init_group(
            spec.rank,
            spec.world_size,
            spec.device,
            spec.master_addr,
            spec.master_port,
            spec.collective_timeout_s,
        )
        cpu_kernels = spec.fast_kernels and spec.cpu_kernels and self.device.type == "cpu"
        if cpu_kernels:
            kernels.load()  # before the layers are built: they look for its ops
        pctx = self.pctx
        why_eager = self._why_eager(backend.name, "cpu") if spec.cpu_compile else None
        compiled = spec.cpu_compile and why_eager is None
        bc = BuildContext(
            pctx=pctx,
            dtype=self.dtype,
            device=self.device,
            backend=backend,
            max_position=self.max_model_len,
            quantization=spec.quantization,
            fast_kernels=spec.fast_kernels,
            compiled_decode=compiled,
            cpu_kernels=cpu_kernels,
        )
        with torch.device(self.device):
            self.model = model_class(self.cfg.architecture)(self.cfg, bc).eval()
        self.load_report = load_weights(self.model, spec.model_path, progress=spec.progress)
        self.weight_bytes = model_weight_bytes(self.model)
        attn = next(m for m in self.model.modules() if isinstance(m, Attention))
        self.kv_heads, self.head_dim = attn.local_num_kv_heads, attn.head_dim
        self.kv_block_bytes = kv_cache.block_bytes(
            self.cfg.num_hidden_layers, self.block_size, self.kv_heads, self.head_dim, self.dtype
        )
        num_blocks = min_over_ranks(self._num_blocks(), self.pctx, self.plan_group)
        kv_cache.check_capacity(num_blocks, self.block_size, self.max_model_len)
        caches = kv_cache.allocate(
            self.cfg.num_hidden_layers,
            num_blocks,
            self.block_size,
            self.kv_heads,
            self.head_dim,
            self.dtype,
            self.device,
        )
        self.num_blocks = num_blocks
        self.attention_backend = backend.name
        self.heap = HeapTrimmer()
        self.runner = ModelRunner(
            self.model,
            caches,
            self.block_size,
            self.cfg.vocab_size,
            self.device,
            spec.seed,
            driver=spec.rank == 0,
            graphs=self._decode_graphs(caches, backend.name) if cuda_graphs else None,
            compiled=(
                CompiledDecode(self.model, caches, self.block_size, trees=spec.lookahead)
                if compiled
                else None
            ),
        )
        if why_eager:
            log.info("decode steps run eagerly: not compiled with %s", why_eager)
        elif compiled:  # now, rather than on the first request that needs each batch size
            self.runner.compiled.warm_up()
            int8.warm_up(self.model)  # the int8 GEMM of prompt chunks and larger batches
        log.info(
            "shard %d/%d of group %d ready: %s %s on %s, %s attention, "
            "%d KV blocks of %d tokens (%.2f GiB)",
            spec.rank,
            spec.world_size,
            spec.group_index,
            self.cfg.architecture,
            str(self.dtype).split(".")[-1],
            self.device,
            backend.name,
            num_blocks - 1,
            self.block_size,
            num_blocks * self.kv_block_bytes / 2**30,
        )

    def _why_eager(self, backend_name: str, target: str) -> str | None:
        """Why decode steps cannot run captured on `target` ("cpu": torch.compile'd steps,
        "cuda": CUDA graphs), or None: the one place that decides, from the spec and the config
        alone (the model is not built yet when the CPU's answer is needed). Collectives between
        ranks and dynamic-NTK rotary (frequencies from host-side lengths) break either."""
        if self.device.type != target:
            return f"a {self.device.type} device"
        if backend_name != "torch-sdpa":
            return f"{backend_name} attention"
        if self.spec.world_size > 1:
            return "tensor parallelism"
        if rope_type(self.cfg.rope_scaling) == "dynamic":
            return "dynamic NTK rotary"
        if target == "cpu" and self.spec.quantization not in COMPILED_MODES:
            return f"quantization {self.spec.quantization}"
        return None

    def _decode_graphs(self, caches, backend_name: str) -> DecodeGraphs | None:
        why = self._why_eager(backend_name, "cuda")
        if why:
            log.info("decode steps run eagerly: CUDA graphs are not supported with %s", why)
            return None
        return DecodeGraphs(self.model, caches, self.block_size, self.max_model_len)

    def _num_blocks(self) -> int:
        if self.device.type == "cpu":
            # KV_CACHE_MEMORY is the group's budget: each rank holds its heads' share.
            budget = self.spec.kv_cache_memory // self.spec.world_size
            return kv_cache.cpu_num_blocks(budget, self.kv_block_bytes)
        return self._profile_gpu_blocks()

    @torch.inference_mode()
    def _profile_gpu_blocks(self) -> int:
        """Run the largest step the scheduler may plan, then give the KV cache what is left of
        gpu_memory_utilization × total memory after weights and that step's peak activations."""
        from layers.attention.metadata import AttentionMetadata, BatchLayout

        n = min(self.spec.max_num_batched_tokens, self.max_model_len)
        nb = -(-n // self.block_size) + 1
        scratch = kv_cache.allocate(
            self.cfg.num_hidden_layers,
            nb,
            self.block_size,
            self.kv_heads,
            self.head_dim,
            self.dtype,
            self.device,
        )
        layout = BatchLayout([n], [0], [list(range(1, nb))], self.block_size)
        slots = torch.arange(self.block_size, self.block_size + n, device=self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        seq_lens = torch.full((n,), n, device=self.device)
        meta = AttentionMetadata(layout, slots, seq_lens)
        hidden = self.model(ids, torch.arange(n, device=self.device), scratch, meta)
        self.model.compute_logits(hidden[-min(n, 256) :])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del scratch, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        # The CUDA context, cuBLAS and NCCL workspaces live outside torch's allocator but in
        # the same memory: they count against the share too.
        outside = max(total - free - torch.cuda.memory_reserved(self.device), 0)
        free_for_kv = int(total * self.spec.gpu_memory_utilization) - peak - outside
        if free_for_kv <= 0:
            raise kv_cache.KVCacheError(
                f"weights and activations take {peak / 2**30:.2f} GiB and the CUDA context "
                f"{outside / 2**30:.2f} GiB, more than gpu_memory_utilization="
                f"{self.spec.gpu_memory_utilization} of {total / 2**30:.2f} GiB leaves"
            )
        log.info(
            "GPU memory: %.2f GiB x %.2f; weights and a %d-token step peak at %.2f GiB, "
            "%.2f GiB outside torch; %.2f GiB left for the KV cache",
            total / 2**30,
            self.spec.gpu_memory_utilization,
            n,
            peak / 2**30,
            outside / 2**30,
            free_for_kv / 2**30,
        )
        return free_for_kv // self.kv_block_bytes

    def info(self) -> ShardInfo:
        return ShardInfo(
            num_blocks=self.num_blocks - 1,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            vocab_size=self.cfg.vocab_size,
            eos_token_ids=self.cfg.eos_token_ids,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            attention_backend=self.attention_backend,
            weight_bytes=self.weight_bytes,
            kv_block_bytes=self.kv_block_bytes,
            tree_rows=self.runner.compiled.usable_tree_rows() if self.runner.compiled else (),
        )

    def execute(self, plan: StepPlan) -> StepResult:
        result = self.runner.execute(plan)
        self.heap.step()
        return result
