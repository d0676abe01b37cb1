"""Synthetic prompts for `shardserve bench`: every request distinct, lengths in approximate
tokens. No tokenizer here: each word below is one token (with its leading space) in the usual
BPE vocabularies, so a prompt of n words and stops is about n tokens."""

from __future__ import annotations

import random


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NOUNS = _words(
    """time year people way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book eye job
word business issue side kind head house service friend father power hour game line end member law
car city community name president team minute idea kid body information back parent face level
office door health person art war history party result change morning reason research girl guy
moment air teacher force education river stone bread garden window paper music letter table road
field horse ship island winter summer forest bird dog cat tree flower apple light fire wind rain
cloud sun moon star sea hill valley bridge tower castle king queen farmer doctor engineer painter
writer singer soldier market village harbor lake mountain desert storm snow glass wood iron gold
silver copper salt sugar coffee tea milk cheese rice corn wheat wool cotton silk"""
)
ADJECTIVES = _words(
    """red blue green black white small large old new young long short quick slow quiet
loud warm cold bright dark early late strong simple clear heavy soft deep"""
)
VERBS = _words(
    """walk run read write build carry open close watch hold bring send find keep give take
make move play sing sail paint cook wash plant grow"""
)
WORDS = NOUNS + ADJECTIVES + VERBS

# The fixed words around the varied text, in approximate tokens, so totals come out near n.
_PROMPT_OVERHEAD = 12


def _sentences(rng: random.Random, num_tokens: int) -> str:
    """Lower-case sentences of 6–14 random words; each word and each stop is about a token."""
    out: list[str] = []
    left = num_tokens
    while left > 1:
        n = min(rng.randint(6, 14), left - 1)
        out.append(" ".join(rng.choice(WORDS) for _ in range(n)) + ".")
        left -= n + 1
    return " ".join(out)


def random_prompt(rng: random.Random, num_tokens: int) -> str:
    """About `num_tokens` of varied text: random words from the first token on, so two prompts
    share no prefix beyond the chat template's own."""
    text = _sentences(rng, max(2, num_tokens - _PROMPT_OVERHEAD))
    return f"{text}\n\nWrite a long story that uses the words above."


def _record(rng: random.Random, idx: int) -> str:
    adj, noun, verb = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS)
    place, goods = rng.choice(NOUNS), rng.choice(NOUNS)
    return (
        f"Record {idx}: the {adj} {noun} of the {place} will {verb} "
        f"{rng.randint(2, 99)} {goods} each {rng.choice(('week', 'month', 'year'))}."
    )


def rag_prompt(rng: random.Random, num_document_tokens: int) -> str:
    """A numbered document of about `num_document_tokens` and a question that asks to quote part
    of it word for word: the answer copies the prompt, as RAG answers often do."""
    records: list[str] = []
    # A record is about 21 tokens where digits are single tokens (SmolLM, Qwen); the numbering
    # makes every record quotable by index.
    for idx in range(1, max(2, num_document_tokens // 21) + 1):
        records.append(_record(rng, idx))
    first = rng.randint(1, max(1, len(records) - 4))
    return (
        "Read the document and answer the question.\n\nDocument:\n"
        + "\n".join(records)
        + f"\n\nQuestion: quote records {first} to {min(first + 4, len(records))} of the "
        "document word for word, then explain what they say."
    )


def build_prompts(
    num_requests: int, prompt_tokens: int, rag_document_tokens: int, seed: int
) -> list[str]:
    """One prompt per request; a string seed per request keeps them reproducible and distinct."""
    prompts = []
    for i in range(num_requests):
        rng = random.Random(f"shardserve-bench-{seed}-{i}")
        if rag_document_tokens > 0:
            prompts.append(rag_prompt(rng, rag_document_tokens))
        else:
            prompts.append(random_prompt(rng, prompt_tokens))
    return prompts
