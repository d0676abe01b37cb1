"""Incremental detokenization with stop strings.

Text is released only when it is final: a token that ends in the middle of a UTF-8 character
(the tokenizer shows U+FFFD) waits for the next one, and the tail that could still become a stop
string is held back until it is ruled out. A stop string ends the text before it and is never
emitted.
"""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"
# Tokens kept as left context when decoding the newest ones: enough for tokenizers that merge
# whitespace or bytes across token boundaries.
_CONTEXT_TOKENS = 6


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all decided output text (before any stop string)
        self.emitted = 0  # chars of `text` already released
        self.stopped_on: str | None = None
        self.num_taken = 0  # of the tokens last fed, how many came before the stop (all if none)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Feed new tokens; returns the text that became final (possibly empty)."""
        if self.stopped_on is not None:
            self.num_taken = 0
            return ""
        self.num_taken = len(token_ids)
        for i, token in enumerate(token_ids):
            self.ids.append(token)
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
                self.text += full[len(prefix) :]
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.ids)
            if self.stop and self._find_stop():
                self.num_taken = i + 1
                break
        return self._release(final=self.stopped_on is not None)

    def flush(self) -> str:
        """At the end of the sequence: release whatever is still held back."""
        if self.stopped_on is None:
            full = self._decode(self.ids[self.prefix_offset :])
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            if len(full) > len(prefix):
                self.text += full[len(prefix) :].rstrip(_REPLACEMENT)
                self.prefix_offset = self.read_offset = len(self.ids)
            if self.stop:
                self._find_stop()
        return self._release(final=True)

    def _find_stop(self) -> bool:
        # A match can only start where it could overlap text not checked before.
        longest = max(len(s) for s in self.stop)
        start = max(0, self.emitted - longest)
        best = -1
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best == -1 or i < best):
                best, self.stopped_on = i, s
        if best == -1:
            return False
        self.text = self.text[:best]
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
