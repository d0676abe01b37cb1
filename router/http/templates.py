"""Conversation templates: messages → prompt token ids, plus each template's stop tokens.

A template renders to segments: text (tokenized on its own, no special tokens added) and
special-token ids. Rendering per segment reproduces the families' reference code, which
tokenizes roles, separators and contents separately rather than one concatenated string.
Sources, per template:
  llama-3        Meta llama3 `ChatFormat.encode_dialog_prompt` (tokenizer.py)
  llama-2        Meta llama `Llama.chat_completion` (generation.py): one BOS...EOS per round
  qwen-7b-chat   Qwen `qwen_generation_utils.make_context` (chatml)
  baichuan-chat  Baichuan-13B-Chat `_build_chat_input` (user 195, assistant 196 ... EOS)
  baichuan2-chat Baichuan2 `generation_utils.build_chat_input` (same reserved ids)
  chatglm2       ChatGLM2-6B `build_prompt` ("[Round n]\\n\\n问：...\\n\\n答：")
  chatglm3       ChatGLM3-6B `build_chat_input` (<|role|> tokens, metadata line)
  generate       no template: the message contents as they are
  shennong_chat  Tencent's industry model: its format is not public, so it uses the
                 checkpoint's own chat template
Without a named template the tokenizer's own `chat_template` is used, else the family's format
(router/http/template_choice.py); a model with neither gets a template that refuses chats, naming
CONV_TEMPLATE, while completions are served.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jinja2

Segment = str | int
Message = dict  # {"role": str, "content": str}


class TemplateError(ValueError):
    pass


class NoChatFormat(TemplateError):
    """A chat request to a model served without any chat format."""


@dataclass(frozen=True)
class _Spec:
    render: Callable[[list[Message], Callable[[str], int]], list[Segment]]
    stop_tokens: tuple[str | int, ...] = ()  # names resolved through the tokenizer, or ids
    # Tokenize text with the tokenizer's own special tokens (BOS): `generate` is a plain prompt.
    add_special_tokens: bool = False
    description: str = ""


def _split_system(
    messages: list[Message], default: str | None = None
) -> tuple[str | None, list[Message]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return default, messages


def _llama3(messages, tok) -> list[Segment]:
    out: list[Segment] = [tok("<|begin_of_text|>")]
    for m in messages:
        out += [tok("<|start_header_id|>"), m["role"], tok("<|end_header_id|>"), "\n\n"]
        out += [m["content"].strip(), tok("<|eot_id|>")]
    return out + [tok("<|start_header_id|>"), "assistant", tok("<|end_header_id|>"), "\n\n"]


def _llama2(messages, tok) -> list[Segment]:
    system, turns = _split_system(messages)
    if system is not None and turns:
        turns = [
            {
                "role": turns[0]["role"],
                "content": f"<<SYS>>\n{system}\n<</SYS>>\n\n{turns[0]['content']}",
            }
        ] + turns[1:]
    bos, eos = tok("<s>"), tok("</s>")
    out: list[Segment] = []
    for i in range(0, len(turns), 2):
        user = turns[i]["content"].strip()
        if i + 1 < len(turns):
            answer = turns[i + 1]["content"].strip()
            out += [bos, f"[INST] {user} [/INST] {answer} ", eos]
        else:
            out += [bos, f"[INST] {user} [/INST]"]
    return out


def _chatml(messages, tok) -> list[Segment]:
    system, turns = _split_system(messages, "You are a helpful assistant.")
    start, end = tok("<|im_start|>"), tok("<|im_end|>")
    out: list[Segment] = [start, "system", "\n", system, end]
    for m in turns:
        out += ["\n", start, m["role"], "\n", m["content"], end]
    return out + ["\n", start, "assistant", "\n"]


def _baichuan2(messages, tok) -> list[Segment]:
    system, turns = _split_system(messages)
    out: list[Segment] = [system] if system else []
    for m in turns:
        out += [195 if m["role"] == "user" else 196, m["content"]]
    # The reference opens the assistant turn unless the conversation already ends in one.
    return out if turns and turns[-1]["role"] == "assistant" else out + [196]


def _baichuan13b(messages, tok) -> list[Segment]:
    # Baichuan-13B closes each assistant turn with EOS. Its reference refuses system messages;
    # we keep them as leading text, as Baichuan2 does, rather than fail the request.
    system, turns = _split_system(messages)
    out: list[Segment] = [system] if system else []
    for m in turns:
        if m["role"] == "user":
            out += [195, m["content"]]
        else:
            out += [196, m["content"], tok("</s>")]
    return out + [196]


def _chatglm2(messages, tok) -> list[Segment]:
    system, turns = _split_system(messages)
    prompt = f"{system}\n\n" if system else ""
    for i in range(0, len(turns), 2):
        n = i // 2 + 1
        if i + 1 < len(turns):
            prompt += (
                f"[Round {n}]\n\n问：{turns[i]['content']}\n\n答：{turns[i + 1]['content']}\n\n"
            )
        else:
            prompt += f"[Round {n}]\n\n问：{turns[i]['content']}\n\n答："
    return [tok("[gMASK]"), tok("sop"), prompt]


def _chatglm3(messages, tok) -> list[Segment]:
    out: list[Segment] = [tok("[gMASK]"), tok("sop")]
    for m in messages:
        out += [tok(f"<|{m['role']}|>"), "\n", m["content"]]
    return out + [tok("<|assistant|>")]


def _generate(messages, tok) -> list[Segment]:
    return ["\n".join(m["content"] for m in messages)]


TEMPLATES: dict[str, _Spec] = {
    "generate": _Spec(_generate, add_special_tokens=True, description="no template"),
    "llama-3": _Spec(_llama3, ("<|eot_id|>", "<|end_of_text|>")),
    "llama-2": _Spec(_llama2, ("</s>",)),
    "qwen-7b-chat": _Spec(_chatml, ("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
    "baichuan2-chat": _Spec(_baichuan2, (195,)),
    "baichuan-chat": _Spec(_baichuan13b, (195,)),
    "chatglm3": _Spec(_chatglm3, ("<|user|>", "<|observation|>")),
    "chatglm2": _Spec(_chatglm2, ()),
}
TOKENIZER_TEMPLATE_ALIASES = ("shennong_chat",)
KNOWN_NAMES = sorted([*TEMPLATES, *TOKENIZER_TEMPLATE_ALIASES])


@dataclass
class ChatTemplate:
    """A resolved template for one tokenizer: render messages to ids, with stop ids."""

    name: str
    tokenizer: object
    eos_token_ids: tuple[int, ...] = ()
    _spec: _Spec | None = field(default=None, repr=False)
    stop_token_ids: tuple[int, ...] = ()
    no_format: str | None = None  # why chats are refused (a model with no chat format)

    @staticmethod
    def create(name: str | None, tokenizer, eos_token_ids: tuple[int, ...] = ()) -> ChatTemplate:
        if name is not None and name not in TEMPLATES and name not in TOKENIZER_TEMPLATE_ALIASES:
            raise TemplateError(
                f"unknown conversation template {name!r} (CONV_TEMPLATE / conv_template_name); "
                f"known: {', '.join(KNOWN_NAMES)}"
            )
        spec = TEMPLATES.get(name) if name else None
        if spec is None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"{'template ' + repr(name) if name else 'no CONV_TEMPLATE given'} and the "
                "tokenizer has no chat_template: set CONV_TEMPLATE to one of "
                + ", ".join(KNOWN_NAMES)
            )
        t = ChatTemplate(name or "tokenizer", tokenizer, tuple(eos_token_ids), spec)
        stops = list(eos_token_ids)
        for s in spec.stop_tokens if spec else ():
            stops.append(s if isinstance(s, int) else t._special_id(s))
        t.stop_token_ids = tuple(dict.fromkeys(stops))
        if spec is not None:
            # Fail at start-up, not per request: every role's special tokens must exist.
            t.render([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
            if spec.render in (_baichuan2, _baichuan13b) and len(tokenizer) <= 196:
                raise TemplateError(
                    f"template {name!r} needs token ids 195 and 196; the tokenizer has "
                    f"{len(tokenizer)} tokens"
                )
        return t

    @staticmethod
    def without_format(tokenizer, eos_token_ids: tuple[int, ...], reason: str) -> ChatTemplate:
        """For a model with no known chat format (a base model): completions stop at EOS as
        usual; every chat is refused with what to set."""
        eos = tuple(dict.fromkeys(eos_token_ids))
        return ChatTemplate("none", tokenizer, eos, stop_token_ids=eos, no_format=reason)

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if token_id is None or (
            token_id == unk and token != getattr(self.tokenizer, "unk_token", None)
        ):
            raise TemplateError(
                f"template {self.name!r} needs the special token {token!r}, "
                "which this tokenizer does not have"
            )
        return int(token_id)

    def render(self, messages: list[Message]) -> list[int]:
        if self.no_format is not None:
            raise NoChatFormat(
                f"this model has no chat format ({self.no_format}): use /v1/completions, or "
                f"restart the server with CONV_TEMPLATE set to one of {', '.join(KNOWN_NAMES)}"
            )
        if self._spec is None:
            try:
                ids = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True
                )
            except jinja2.TemplateError as e:  # the template's own raise_exception, mostly
                raise TemplateError(f"the model's chat template refused the messages: {e}") from e
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            return [int(i) for i in ids]
        out: list[int] = []
        for seg in self._spec.render(messages, self._special_id):
            if isinstance(seg, int):
                out.append(seg)
            elif seg:
                out.extend(
                    self.tokenizer.encode(seg, add_special_tokens=self._spec.add_special_tokens)
                )
        return out

    def probe_mismatch(self) -> str | None:
        """For a named template on a tokenizer that has its own chat template: render one probe
        conversation through both; a description of the difference, or None if they agree."""
        if self._spec is None or self.name == "generate":
            return None
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        probe = [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "Seven."},
            {"role": "user", "content": "And another?"},
        ]
        ours = self.render(probe)
        try:
            theirs = ChatTemplate("tokenizer", self.tokenizer).render(probe)
        except Exception as e:  # a tokenizer template may reject system messages, etc.
            return f"the tokenizer's own template could not render the probe ({e})"
        if ours == theirs:
            return None
        i = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))
        )
        return (
            f"template {self.name!r} and the tokenizer's chat_template render a probe "
            f"conversation differently from token {i} ({len(ours)} vs {len(theirs)} tokens)"
        )
