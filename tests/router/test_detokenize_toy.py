"""IncrementalDetokenizer on explicit cases: toy decoders that make token boundaries explicit
(characters, UTF-8 bytes) and a tokenizer whose decode depends on left context."""

from __future__ import annotations

from router.http.detokenize import IncrementalDetokenizer
from tests.router.test_detokenize import FFFD, _feed

# -- explicit examples, toy decoders ----------------------------------------------------------


class _Chars:
    """One token per code point: token boundaries are exactly character boundaries."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


class _Bytes:
    """One token per UTF-8 byte: every multi-byte character spans several tokens."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _chars(text: str) -> list[list[int]]:
    return [[ord(c)] for c in text]


def test_partial_stop_prefix_is_held_then_released():
    detok = IncrementalDetokenizer(_Chars(), [], stop=("aab",))
    pieces = [detok.add_tokens(t) for t in _chars("xaaaab")]
    assert pieces == ["x", "", "", "a", "a", ""]
    assert detok.stopped_on == "aab"
    assert detok.flush() == ""


def test_held_back_prefix_is_released_by_flush():
    detok = IncrementalDetokenizer(_Chars(), [], stop=("aab",))
    pieces = [detok.add_tokens(t) for t in _chars("xaa")]
    assert pieces == ["x", "", ""]
    assert detok.flush() == "aa"
    assert detok.stopped_on is None


def test_shorter_stop_completing_first_wins():
    # "c" is complete one token before "abcd" could be; generation stops there.
    detok = IncrementalDetokenizer(_Chars(), [], stop=("abcd", "c"))
    pieces, tail = _feed(detok, _chars("xabcdy"))
    assert "".join(pieces) + tail == "xab"
    assert detok.stopped_on == "c"


def test_overlapping_stops_toy_decoder_picks_the_one_completed_first():
    detok = IncrementalDetokenizer(_Chars(), [], stop=("aab", "aa"))
    pieces, tail = _feed(detok, _chars("xaab"))
    assert "".join(pieces) + tail == "x"
    assert detok.stopped_on == "aa"


def test_tokens_after_a_stop_are_ignored():
    detok = IncrementalDetokenizer(_Chars(), [], stop=("!",))
    assert detok.add_tokens([ord(c) for c in "hi! more"]) == "hi"
    assert detok.add_tokens([ord("x")]) == ""
    assert detok.flush() == ""


def test_empty_stop_strings_are_ignored():
    detok = IncrementalDetokenizer(_Chars(), [], stop=("",))
    pieces, tail = _feed(detok, _chars("abc"))
    assert pieces == ["a", "b", "c"] and tail == ""
    assert detok.stopped_on is None


def test_split_utf8_character_waits_for_its_last_byte():
    detok = IncrementalDetokenizer(_Bytes(), [])
    pieces = [detok.add_tokens([b]) for b in "a😀b".encode()]
    assert pieces == ["a", "", "", "", "😀", "b"]


def test_flush_drops_an_unfinished_character():
    # The sequence ended (max_tokens) two bytes into a four-byte emoji.
    detok = IncrementalDetokenizer(_Bytes(), [])
    assert detok.add_tokens(list(b"ok") + list("😀".encode()[:2])) == "ok"
    assert detok.flush() == ""


def test_stop_inside_split_utf8_is_found_once_complete():
    detok = IncrementalDetokenizer(_Bytes(), [], stop=("世",))
    pieces = [detok.add_tokens([b]) for b in "ab世界".encode()]
    assert "".join(pieces) == "ab"
    assert detok.stopped_on == "世"


def test_prompt_ending_mid_character_is_context_only():
    # The prompt's last bytes start a character the output never completes; output is its own.
    prompt = list(b"hi") + list("é".encode()[:1])
    detok = IncrementalDetokenizer(_Bytes(), prompt)
    pieces, tail = _feed(detok, [[b] for b in b"ok"])
    assert FFFD not in "".join(pieces) + tail


# -- a tokenizer whose decode depends on left context ---------------------------------------


def _metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"])
    backend.train_from_iterator(["Hello world, the world says hello back"] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_leading_space_survives_with_prompt_context():
    # SentencePiece-style decoders drop the space of a sequence's first word; the prompt's last
    # tokens are decoded as left context so the first output word keeps its space.
    tok = _metaspace_tokenizer()
    prompt = tok.encode("Hello", add_special_tokens=False)
    both = tok.encode("Hello world says", add_special_tokens=False)
    assert both[: len(prompt)] == prompt
    out_ids = both[len(prompt) :]
    assert not tok.decode(out_ids).startswith(" ")  # the trap this guards against
    pieces, tail = _feed(IncrementalDetokenizer(tok, prompt), [[i] for i in out_ids])
    assert "".join(pieces) + tail == " world says"
