"""Token sampling, vectorized over the rows of a step.

Order of operations on the logits of one row: penalties (repetition over prompt + output, the
transformers rule; presence/frequency over output, the OpenAI rule), then temperature, top-k,
top-p, min-p, then an exact draw from the remaining distribution. Temperature 0 is argmax.
A request with a `seed` draws from its own generator, so its tokens do not depend on what else
is in the batch. Logprobs are of the model's raw distribution (before penalties/temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shards.wire import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SeqSamplingState:
    params: SamplingParams
    generator: torch.Generator | None  # own generator when the request has a seed
    prompt_mask: torch.Tensor | None  # [vocab] bool: tokens in the prompt (repetition penalty)
    output_counts: torch.Tensor | None  # [vocab] int32: generated tokens (all penalties)

    @staticmethod
    def create(
        params: SamplingParams, prompt_ids: list[int], vocab_size: int, device
    ) -> SeqSamplingState:
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
        mask = counts = None
        if params.has_penalties:
            counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids:
                mask[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True
        return SeqSamplingState(params, gen, mask, counts)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None  # per row, None when no row asked
    top_logprobs: list[list[tuple[int, float]] | None] | None


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first of tied maxima, as torch.argmax): max's kernel is ~3x
    faster than argmax's on CPU (16 x 49,152 logits: 0.16 against 0.51 ms)."""
    return logits.max(dim=-1).indices


def apply_penalties(logits: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
    rows = [i for i, s in enumerate(states) if s.params.has_penalties]
    if not rows:
        return logits
    idx = torch.tensor(rows, device=logits.device)
    sub = logits[idx]  # [P, vocab]
    counts = torch.stack([states[i].output_counts for i in rows]).to(sub.dtype)
    seen = torch.stack([states[i].prompt_mask for i in rows]) | (counts > 0)
    rep = torch.tensor([states[i].params.repetition_penalty for i in rows], device=sub.device)[
        :, None
    ]
    penalized = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalized, sub)
    freq = torch.tensor([states[i].params.frequency_penalty for i in rows], device=sub.device)[
        :, None
    ]
    pres = torch.tensor([states[i].params.presence_penalty for i in rows], device=sub.device)[
        :, None
    ]
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    logits = logits.clone()
    logits[idx] = sub
    return logits


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) what top-k, then top-p (on the top-k renormalized distribution), then
    min-p remove. logits: [rows, vocab], already divided by temperature. top_k: [rows] int with
    vocab for "off"; top_p, min_p: [rows] float."""
    vocab = logits.shape[-1]
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop = ranks >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
        probs = sorted_logits.softmax(dim=-1)
        # Keep a token while the mass before it is below top_p: the smallest set reaching top_p.
        # Rows with top_p = 1 skip this: their tail mass rounds to 1.0 in float32.
        drop |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
        sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
        logits = torch.full_like(logits, _NEG_INF).scatter(-1, order, sorted_logits)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, _NEG_INF)
    return logits


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each (non-greedy) row is drawn from, after temperature and filters."""
    dev = logits.device
    vocab = logits.shape[-1]
    temp = torch.tensor([p.temperature for p in params], device=dev, dtype=logits.dtype)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=logits.dtype)
    min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=logits.dtype)
    return filter_logits(logits / temp[:, None], top_k, top_p, min_p).softmax(dim=-1)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One exact draw per row of `probs` by inverting its CDF: one uniform per row where an
        exponential race (argmax p / E) needs one per vocabulary entry, 15x slower here at 48
        rows. Sums in float64 keep the tail's tiny probabilities their own width."""
        cdf = probs.double().cumsum(dim=-1)
        u = torch.rand(
            len(generators), 1, dtype=torch.float64, device=probs.device, generator=self.generator
        )
        for row, gen in enumerate(generators):
            if gen is not None:
                u[row] = torch.rand(1, dtype=torch.float64, device=probs.device, generator=gen)
        # The first index whose cumulative mass exceeds u * total: a token of probability 0
        # adds no width, so it is never the first (right=True) to pass the mark. Should
        # rounding put the mark at the total, the last token of positive probability is taken.
        total = cdf[:, -1:].contiguous()
        picked = torch.searchsorted(cdf, u * total, right=True)
        last = torch.searchsorted(cdf, total, right=False)
        return torch.minimum(picked, last).squeeze(1)

    def sample(self, logits: torch.Tensor, states: list[SeqSamplingState]) -> SamplerOutput:
        # logits: [rows, vocab] float32, one row per sequence that samples this step
        want_logprobs = any(s.params.logprobs is not None for s in states)
        raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
        logits = apply_penalties(logits, states)
        tokens = greedy_tokens(logits)
        sampled_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if sampled_rows:
            idx = torch.tensor(sampled_rows, device=logits.device)
            probs = sampling_probs(logits[idx], [states[i].params for i in sampled_rows])
            tokens[idx] = self._draw(probs, [states[i].generator for i in sampled_rows])
        token_list = tokens.tolist()
        for s, t in zip(states, token_list):
            if s.output_counts is not None:
                s.output_counts[t] += 1
        if raw_logprobs is None:
            return SamplerOutput(token_list, None, None)
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        top: list[list[tuple[int, float]] | None] = []
        for row, s in enumerate(states):
            k = s.params.logprobs or 0
            if k > 0:
                vals, ids = raw_logprobs[row].topk(k)
                top.append(list(zip(ids.tolist(), vals.tolist())))
            else:
                top.append(None)
        return SamplerOutput(token_list, chosen, top)
