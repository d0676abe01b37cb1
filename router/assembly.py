"""The engine's parts (block allocator, scheduler, lookahead drafter; the conversation
template), built one way for the server, the offline API (launcher/llm.py) and the benchmarks,
so that offline figures measure the server's scheduler and offline chats render as served."""

from __future__ import annotations

import logging

from router.http.template_choice import choose_template
from router.http.templates import ChatTemplate
from router.lookahead.drafter import Drafter
from router.lookahead.ngrams import TokenKeys
from router.scheduling.block_allocator import BlockAllocator
from router.scheduling.dynamic_batching import DynamicBatchScheduler
from router.scheduling.scheduler import Scheduler, SchedulerConfig
from router.settings import RouterSettings

log = logging.getLogger("shardserve.router")


def build_scheduler(s: RouterSettings, info, keys: TokenKeys | None) -> Scheduler:
    """The scheduler for a shard (group) that reported `info` (shards/wire.py: ShardInfo);
    `keys` the tokenizer's n-gram keys that lookahead drafts from (None: token ids only)."""
    config = SchedulerConfig(
        max_num_batched_tokens=s.max_num_batched_tokens,
        max_num_seqs=s.max_num_seqs,
        max_model_len=info.max_model_len,
        eos_token_ids=info.eos_token_ids,
        # a few free blocks kept back, so running sequences are not preempted at every step
        watermark_blocks=max(1, info.num_blocks // 100),
    )
    allocator = BlockAllocator(info.num_blocks, info.block_size, s.enable_prefix_caching)
    if s.scheduler == "dynamic-batching":
        return DynamicBatchScheduler(config, allocator, s.max_batch_size, s.batch_wait_timeout)
    drafter = None
    if s.use_lookahead:
        drafter = Drafter.for_shard(s.num_speculative_tokens, info, keys)
    return Scheduler(config, allocator, drafter)


def build_template(s: RouterSettings, tokenizer, eos_token_ids: tuple[int, ...]) -> ChatTemplate:
    """The conversation template: CONV_TEMPLATE, else the tokenizer's, else the family's
    (router/http/template_choice.py), logged with the reason."""
    choice = choose_template(s.conv_template, tokenizer, s.model_path)
    if choice.name is None:
        log.warning(
            "no conversation template: %s; chat requests are refused until CONV_TEMPLATE names "
            "one, /v1/completions serves",
            choice.reason,
        )
        return ChatTemplate.without_format(tokenizer, eos_token_ids, choice.reason)
    named = None if choice.name == "tokenizer" else choice.name
    template = ChatTemplate.create(named, tokenizer, eos_token_ids)
    log.info("conversation template %s: %s", template.name, choice.reason)
    mismatch = template.probe_mismatch()
    if mismatch:
        log.warning("%s: check CONV_TEMPLATE matches this model", mismatch)
    return template
