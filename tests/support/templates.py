"""A test tokenizer with every family's special tokens, and the conversations the template
tests render."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from router.http.templates import ChatTemplate

LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
LLAMA2_SPECIALS = ("<s>", "</s>")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GLM_SPECIALS = ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
ALL_SPECIALS = LLAMA3_SPECIALS + LLAMA2_SPECIALS + QWEN_SPECIALS + GLM_SPECIALS

# Strings a template would encode whole if it skipped the official segmenting.
_GLUED = [
    "user\n\n",
    "system\n\n",
    "assistant\n\n",
    "user\n",
    "system\n",
    "assistant\n",
    "\nHello there",
    "\n\nHello there",
    "\nYou are a helpful assistant.",
    "\nBe brief.",
    "\n\nBe brief.",
    "Be brief.\n\n",
    "Hi ",
    " Hi",
    "[INST] Hello [/INST] Hi ",
    "\n你好",
]


@functools.cache
def _tokenizer(specials: tuple[str, ...] = ALL_SPECIALS, chat_template: str | None = None):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(_GLUED, trainer)
    backend.add_special_tokens(list(specials))
    kw = {"eos_token": "</s>"} if "</s>" in specials else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kw)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


SYSTEM = "Be brief."
TURNS = [
    {"role": "user", "content": " Hello there \n"},
    {"role": "assistant", "content": "Hi"},
    {"role": "user", "content": "你好"},
]
WITH_SYSTEM = [{"role": "system", "content": SYSTEM}, *TURNS]


def _enc(tok, s: str) -> list[int]:
    return tok.encode(s, add_special_tokens=False)


def _id(tok, token: str) -> int:
    token_id = tok.convert_tokens_to_ids(token)
    assert isinstance(token_id, int), token
    return token_id


def _render(name: str, messages: list[dict], tok=None) -> list[int]:
    return ChatTemplate.create(name, tok or _tokenizer()).render(messages)
