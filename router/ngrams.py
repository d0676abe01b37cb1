"""The n-gram indexes lookahead drafts from (router/lookahead.py): where the text a sequence
has just produced occurred before, and what followed.

A model that quotes its prompt often re-wraps the lines it quotes ("the first\\nfunction" in the
document, "the first function" in the answer): the quoted words come back as other tokens (" x"
for "\\nx"), and an index of raw token ids loses the place at every such break. So besides raw
n-grams the index keeps n-grams of the tokens' text with whitespace stripped (`TokenKeys`),
which still find the place; the continuation is then taken from the raw tokens there, adjusted
at its start for the whitespace the sequence has already produced.
"""

from __future__ import annotations

from collections import OrderedDict

# A raw match at least this long is trusted over a longer whitespace-insensitive one.
STRONG_RAW_MATCH = 3


class TokenKeys:
    """Per token id: its text without surrounding whitespace as a small int (-1: whitespace
    only), and the id of the same text without its leading space (itself if none)."""

    def __init__(self, texts: list[str]) -> None:
        ids: dict[str, int] = {}
        self.key: list[int] = []
        for i, t in enumerate(texts):
            k = t.strip()
            if not k:
                self.key.append(-1)
            elif "\ufffd" in k:  # a partial UTF-8 sequence: equal text, different bytes
                self.key.append(len(texts) + i)  # above every shared key, one per token
            else:
                self.key.append(ids.setdefault(k, len(ids)))
        first: dict[str, int] = {}
        for i, t in enumerate(texts):
            first.setdefault(t, i)
        self.unspaced = [
            first.get(t[1:], i) if t.startswith(" ") else i for i, t in enumerate(texts)
        ]

    @staticmethod
    def from_tokenizer(tokenizer) -> TokenKeys:
        return TokenKeys([tokenizer.decode([i]) for i in range(len(tokenizer))])


class NgramIndex:
    """n-gram → positions of the token after each occurrence, for one growing token list;
    with `keys`, also over the tokens' whitespace-stripped text."""

    def __init__(self, max_ngram: int, keys: TokenKeys | None = None) -> None:
        self.max_ngram = max_ngram
        self.keys = keys
        self.tokens: list[int] = []
        self.follow: dict[tuple[int, ...], list[int]] = {}
        self.words: list[int] = []  # keys of the tokens that are not whitespace only
        self.word_ends: list[int] = []  # the raw position after each of them
        self.word_follow: dict[tuple[int, ...], list[int]] = {}  # words n-gram -> raw positions

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.tokens.append(t)
            end = len(self.tokens)
            for n in range(1, min(self.max_ngram, end) + 1):
                self.follow.setdefault(tuple(self.tokens[end - n : end]), []).append(end)
            if self.keys is None or self.keys.key[t] < 0:
                continue
            self.words.append(self.keys.key[t])
            self.word_ends.append(end)
            m = len(self.words)
            for n in range(1, min(self.max_ngram, m) + 1):
                self.word_follow.setdefault(tuple(self.words[m - n : m]), []).append(end)

    def _raw(self, depth: int, limit: int) -> tuple[int, list[list[int]]]:
        toks = self.tokens
        end = len(toks)
        for n in range(min(self.max_ngram, end), 0, -1):
            places = self.follow.get(tuple(toks[end - n :]))
            if not places:
                continue
            runs = [toks[p : p + depth] for p in reversed(places) if p < end]
            runs = [r for r in runs if r]
            if runs:
                return n, runs[:limit]
        return 0, []

    def _words(self, depth: int) -> tuple[int, list[int]]:
        """The continuation after the latest earlier occurrence of the longest suffix of
        words, and that suffix's length."""
        toks, m = self.tokens, len(self.words)
        if not m:
            return 0, []
        here = self.word_ends[-1]
        for n in range(min(self.max_ngram, m), 0, -1):
            places = self.word_follow.get(tuple(self.words[m - n :]))
            p = next((p for p in reversed(places or ()) if p < here), None)
            if p is None:
                continue
            run = toks[p : p + depth + 4]
            if self.keys.key[toks[-1]] < 0:
                # the sequence already broke the line or spaced: the quote's own break or
                # space before its next word is not coming again
                while run and self.keys.key[run[0]] < 0:
                    run = run[1:]
                if run:
                    run[0] = self.keys.unspaced[run[0]]
            return n, run[:depth]
        return 0, []

    def continuations(self, depth: int, limit: int) -> list[list[int]]:
        """Up to `limit` token runs that followed earlier occurrences of the sequence's last
        tokens: the latest occurrences of the longest raw suffix that occurred before, and
        the latest of its longest whitespace-insensitive suffix, which leads when the raw
        match is weak and it is longer."""
        n_raw, runs = self._raw(depth, limit)
        if self.keys is None:
            return runs
        n_words, run = self._words(depth)
        if run and all(run != r for r in runs):
            at = 0 if n_words > n_raw and n_raw < STRONG_RAW_MATCH else min(1, len(runs))
            runs.insert(at, run)
        return runs[:limit]


class SharedNgrams:
    """Continuations of recent generated text across requests: (n-gram) → next tokens, bounded
    by an LRU over keys."""

    def __init__(self, max_ngram: int, depth: int, capacity: int = 100_000) -> None:
        self.max_ngram, self.depth, self.capacity = max_ngram, depth, capacity
        self.table: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()

    def add(self, tokens: list[int]) -> None:
        for end in range(1, len(tokens)):
            nxt = tokens[end : end + self.depth]
            for n in range(1, min(self.max_ngram, end) + 1):
                key = tuple(tokens[end - n : end])
                self.table[key] = nxt
                self.table.move_to_end(key)
        while len(self.table) > self.capacity:
            self.table.popitem(last=False)

    def continuation(self, tokens: list[int]) -> list[int]:
        for n in range(min(self.max_ngram, len(tokens)), 0, -1):
            run = self.table.get(tuple(tokens[len(tokens) - n :]))
            if run:
                self.table.move_to_end(tuple(tokens[len(tokens) - n :]))
                return run
        return []
