"""The n-gram indexes lookahead drafts from (router/lookahead/drafter.py): where the text a sequence
has just produced occurred before, and what followed.

A model that quotes its prompt often re-wraps the lines it quotes ("the first\\nfunction" in the
document, "the first function" in the answer): the quoted words come back as other tokens (" x"
for "\\nx"), and an index of raw token ids loses the place at every such break. So besides raw
n-grams the index keeps n-grams of the tokens' text with whitespace stripped (`TokenKeys`),
which still find the place; the continuation is then taken from the raw tokens there, adjusted
at its start for the whitespace the sequence has already produced. And a model that quotes
often writes the text's whitespace its own way throughout (drops every line's indentation,
one kind of break for another): `QuoteStyle` learns that from where drafts went wrong and
respells the drafts that follow.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict

# A raw match at least this long is trusted over a longer whitespace-insensitive one.
STRONG_RAW_MATCH = 3
# How far from where a copied passage has got to its next occurrence may lie (tokens): the
# model re-wraps and re-spaces what it quotes, so the copy drifts against the passage.
NEAR = 32


class TokenKeys:
    """Per token id: its text without surrounding whitespace as a small int (-1: whitespace
    only), the id of the same text without its leading space (itself if none), the id of the
    text after a single space (-1 if no such token), whether it is a line break (with or
    without indentation), whether it is one without indentation, and for an indented one the
    id of its breaks alone (-1 for every other token or if no such token)."""

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
        self.spaced = [
            first.get(" " + t.lstrip(" "), -1) if k >= 0 and t.lstrip(" ")[:1].strip() else -1
            for t, k in zip(texts, self.key)
        ]
        self.breaks = [t.startswith("\n") and not t.strip() for t in texts]
        self.bare_breaks = [not t.strip() and t.endswith("\n") for t in texts]
        self.dedented = [
            first.get(t.rstrip(" \t"), -1) if br and t.rstrip(" \t") != t else -1
            for t, br in zip(texts, self.breaks)
        ]
        self.newline = first.get("\n", -1)

    @staticmethod
    def from_tokenizer(tokenizer) -> TokenKeys:
        return TokenKeys([tokenizer.decode([i]) for i in range(len(tokenizer))])


class QuoteStyle:
    """How one sequence writes the whitespace of the text it quotes, learned where a draft
    from that text met a different whitespace token: indentation dropped (one indented break
    written bare stands for all of them) or one token for another. Without it, a draft of an
    indented passage fails at every line, the model writing each break its own way."""

    def __init__(self, keys: TokenKeys) -> None:
        self.keys = keys
        self.respell: dict[int, int] = {}  # a whitespace token of the text -> the model's
        self.dedent = False

    @property
    def learned(self) -> bool:
        return self.dedent or bool(self.respell)

    def apply(self, run: list[int]) -> list[int]:
        k = self.keys
        out = []
        unspace = False
        for t in run:
            if unspace:
                t = k.unspaced[t]
            new = self.respell.get(t, t)
            if self.dedent and new == t and k.dedented[t] >= 0:
                new = k.dedented[t]
            # The indentation's last space rides on the next word ("\n   " + " set"): after a
            # break written bare the word comes without it ("\n" + "set")
            unspace = new != t and k.bare_breaks[new] and not k.bare_breaks[t]
            out.append(new)
        return out

    def learn(self, source: list[int], drafted: list[int], got: list[int]) -> None:
        """`drafted`, `apply(source)`, against the tokens the sequence went on with: the
        first difference, if both are whitespace, says how the model spells that token."""
        k = self.keys
        for s, d, g in zip(source, drafted, got):
            if d == g:
                continue
            if k.key[d] < 0 and k.key[g] < 0:
                self.respell.pop(s, None)
                if g == k.dedented[s]:
                    self.dedent = True
                elif g == s:  # the text's own spelling after all
                    self.dedent = self.dedent and k.dedented[s] < 0
                else:
                    self.respell[s] = g
            return


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
        # The passage the sequence is copying: the place its copy started from and the
        # sequence's length then; and the previous call's first run, to confirm as that
        self.copy_at: int | None = None
        self.copy_len = 0
        self.pending: tuple[int, int] | None = None
        self.style = QuoteStyle(keys) if keys is not None else None
        # The last call's first run as found and as respelled, and where it would go on
        self.lead: tuple[int, list[int], list[int]] | None = None

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

    def _raw(self, depth: int, limit: int) -> tuple[int, list[tuple[int, list[int]]]]:
        """The latest earlier occurrences of the longest raw suffix that occurred before, as
        (place, run) pairs, and the suffix's length."""
        toks = self.tokens
        end = len(toks)
        for n in range(min(self.max_ngram, end), 0, -1):
            places = self.follow.get(tuple(toks[end - n :]))
            if not places:
                continue
            runs = [(p, toks[p : p + depth]) for p in reversed(places) if p < end]
            if runs:
                return n, runs[:limit]
        return 0, []

    def _word_run(self, p: int, depth: int) -> list[int]:
        """The raw run at p for a whitespace-insensitive match."""
        run = self.tokens[p : p + depth + 4]
        if self.keys.key[self.tokens[-1]] < 0:
            # the sequence already broke the line or spaced: the quote's own break or space
            # before its next word is not coming again
            while run and self.keys.key[run[0]] < 0:
                run = run[1:]
            if run:
                run[0] = self.keys.unspaced[run[0]]
        return run[:depth]

    def _words(self, depth: int) -> tuple[int, int, list[int]]:
        """The place and continuation after the latest earlier occurrence of the longest
        suffix of words, and that suffix's length."""
        m = len(self.words)
        if not m:
            return 0, 0, []
        here = self.word_ends[-1]
        for n in range(min(self.max_ngram, m), 0, -1):
            places = self.word_follow.get(tuple(self.words[m - n :]))
            p = next((p for p in reversed(places or ()) if p < here), None)
            if p is not None:
                return n, p, self._word_run(p, depth)
        return 0, 0, []

    def _near(self, target: int, depth: int) -> tuple[int, int, list[int]]:
        """The occurrence of the longest suffix (raw or of words; raw on a tie) that lies
        within NEAR of `target`: (suffix length, place, run), or (0, 0, []) if none does."""
        toks, m = self.tokens, len(self.words)
        best = (0, 0, [])
        searches = [(self.follow, toks, len(toks), False)]
        if self.keys is not None and m:
            searches.append((self.word_follow, self.words, self.word_ends[-1], True))
        for table, seq, before, words in searches:
            for n in range(min(self.max_ngram, len(seq)), best[0], -1):
                p = _nearest(table.get(tuple(seq[len(seq) - n :]), ()), target, before)
                if p is not None:
                    run = self._word_run(p, depth) if words else toks[p : p + depth]
                    best = (n, p, run) if run else best
                    break
        return best

    def continuations(self, depth: int, limit: int) -> list[list[int]]:
        """Up to `limit` token runs that followed earlier occurrences of the sequence's last
        tokens: the latest occurrences of the longest raw suffix that occurred before, and
        the latest of its longest whitespace-insensitive suffix, which leads when the raw
        match is weak and it is longer. While the sequence copies a passage (the first token
        of the previous call's first run was produced), the occurrence nearest to where the
        copy has got to leads unless a stronger raw match lies elsewhere: after the model
        departs from the passage for a token or two, a short suffix occurs all over the
        text, and its latest occurrence is rarely where the copy resumes."""
        self._follow_copy()
        self._learn_style()
        n_raw, found = self._raw(depth, limit)
        strongest = n_raw
        if self.keys is not None:
            n_words, p, run = self._words(depth)
            strongest = max(n_raw, n_words)
            if run and all(run != r for _, r in found):
                at = 0 if n_words > n_raw and n_raw < STRONG_RAW_MATCH else min(1, len(found))
                found.insert(at, (p, run))
        if self.copy_at is not None:
            n_near, p, run = self._near(self.copy_at + len(self.tokens) - self.copy_len, depth)
            if run:
                found = [f for f in found if f[1] != run]
                lead = n_near >= strongest or strongest < STRONG_RAW_MATCH
                found.insert(0 if lead else min(1, len(found)), (p, run))
        found = [f for f in found if f[1]][:limit]
        self.pending = (found[0][0], len(self.tokens)) if found else None
        runs = [run for _, run in found]
        if runs and self.style is not None:
            source = runs[0]
            if self.style.learned:
                runs = _unique([self.style.apply(r) for r in runs])  # respelling may merge runs
            self.lead = (len(self.tokens), source, runs[0])
        if runs and limit > 1 and self.keys is not None:
            runs[1:1] = [v for v in self._rewraps(runs[0]) if v not in runs]
        return runs

    def _rewraps(self, run: list[int]) -> list[list[int]]:
        """The run with its first line break as the model may write it instead: a space
        before the next word (it re-wraps the text it quotes) or, for an indented break, a
        bare one (it drops the indentation). Which one a model does varies within a text, so
        both go into the tree next to the run itself, sharing the run's tokens up to there."""
        k = self.keys
        for j in range(len(run) - 1):
            if k.breaks[run[j]] and k.key[run[j + 1]] >= 0:
                out = []
                if k.spaced[run[j + 1]] >= 0:
                    out.append(run[:j] + [k.spaced[run[j + 1]]] + run[j + 2 :])
                if run[j] != k.newline >= 0:
                    out.append(run[:j] + [k.newline, k.unspaced[run[j + 1]]] + run[j + 2 :])
                return out
        return []

    def _learn_style(self) -> None:
        if self.lead is not None:
            at, source, drafted = self.lead
            self.style.learn(source, drafted, self.tokens[at : at + len(drafted)])
            self.lead = None

    def _follow_copy(self) -> None:
        """Take the previous call's first run as the passage being copied if the sequence
        went on with that run's first token (or the same word)."""
        if self.pending is None:
            return
        place, length = self.pending
        if len(self.tokens) <= length:
            return
        got, want = self.tokens[length], self.tokens[place]
        if got == want or (self.keys is not None and self.keys.key[got] == self.keys.key[want]):
            self.copy_at, self.copy_len = place, length
        self.pending = None


def _unique(runs: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for r in runs:
        if r not in out:
            out.append(r)
    return out


def _nearest(places, target: int, before: int) -> int | None:
    """Of ascending places, the one nearest to target that is before `before`, if within
    NEAR of it."""
    i = bisect.bisect_left(places, target)
    near = [p for p in places[max(i - 1, 0) : i + 1] if p < before and abs(p - target) <= NEAR]
    return min(near, key=lambda p: abs(p - target), default=None)


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
