"""Chat templates: render a conversation and know, by construction, where each assistant turn lies.

A template is a Jinja chat template (the tokenizer's own or a built-in one) plus its end-of-turn
string. Assistant spans come from the template's structure: the conversation is rendered turn by turn,
and the text an assistant turn adds after the generation prompt, up to and including its end-of-turn
string, is that turn's span. Spans are character ranges; tokenization maps them to tokens by offsets,
so nothing depends on how markers split into tokens.

Tool results are context, never trained on, in each template's role for them (README, "Data"); a
template that does not render ``tool`` turns gets each as a user turn that starts with ``TOOL_PREFIX``.
The mapping happens before rendering: the Jinja sources, which key the teacher caches, stay as they were.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jinja2
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_ALPACA = (
    "{{ bos_token }}{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% else %}"
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}### Instruction:\n{{ m.content }}\n\n"
    "{% elif m.role == 'assistant' %}### Response:\n{{ m.content }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)
_MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] "
    "{% if loop.index0 == 1 and messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "{{ m.content }} [/INST]{% elif m.role == 'assistant' %} {{ m.content }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

# name -> (jinja source, end-of-turn string or None: the tokenizer's EOS token, the role of tool results
# or None: a user turn that starts with TOOL_PREFIX)
BUILTIN_TEMPLATES: dict[str, tuple[str, str | None, str | None]] = {
    "chatml": (_CHATML, "<|im_end|>", "tool"),
    "llama3": (_LLAMA3, "<|eot_id|>", "ipython"),
    "alpaca": (_ALPACA, None, None),
    "mistral": (_MISTRAL, None, None),
}

TOOL_PREFIX = "Tool output:\n"

# Tried in order when the tokenizer's own template does not say what ends a turn.
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class TemplateError(ValueError):
    """A template that cannot be used safely for training."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str  # Jinja
    end_of_turn: str
    tool_role: str | None = "tool"
    """The role tool results get in this template; None: a user turn that starts with ``TOOL_PREFIX``."""

    def render(
        self, tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool
    ) -> str:
        if self.tool_role != "tool":
            messages = [self._tool_turn(m) if m["role"] == "tool" else m for m in messages]
        return tokenizer.apply_chat_template(
            messages, chat_template=self.source, tokenize=False, add_generation_prompt=generation_prompt
        )

    def render_with_spans(
        self, tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str = "sample"
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character span of every assistant turn."""
        full = self.render(tokenizer, messages, generation_prompt=False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self.render(tokenizer, messages[:index], generation_prompt=True)) if index else 0
            upto = self.render(tokenizer, messages[: index + 1], generation_prompt=False)
            if not full.startswith(upto) or not upto.startswith(full[:start]):
                raise TemplateError(
                    f"{where}: template {self.name!r} does not render turn by turn (turn {index} changes "
                    "earlier text), so response tokens cannot be located by structure"
                )
            end = upto.rfind(self.end_of_turn, start)
            if end < 0:
                raise TemplateError(
                    f"{where}: template {self.name!r} renders assistant turn {index} without its end-of-turn "
                    f"{self.end_of_turn!r}: a model trained on it would never learn to stop"
                )
            spans.append((start, end + len(self.end_of_turn)))
        return full, spans

    def _tool_turn(self, message: dict) -> dict:
        if self.tool_role is None:
            return {**message, "role": "user", "content": TOOL_PREFIX + message["content"]}
        return {**message, "role": self.tool_role}


def resolve_template(
    tokenizer: PreTrainedTokenizerBase, name: str | None = None, end_of_turn: str | None = None
) -> ChatTemplate:
    """The template named in the config, else the tokenizer's own ``chat_template``."""
    if name is None:
        if not tokenizer.chat_template:
            raise TemplateError(
                f"the tokenizer has no chat_template; set data.template to one of {sorted(BUILTIN_TEMPLATES)}"
            )
        source, name = tokenizer.chat_template, "tokenizer"
        end_of_turn = end_of_turn or _detect_end_of_turn(tokenizer, source)
    elif name in BUILTIN_TEMPLATES:
        source, builtin_eot, _ = BUILTIN_TEMPLATES[name]
        end_of_turn = end_of_turn or builtin_eot or tokenizer.eos_token
    elif "{%" in name or "{{" in name:
        source, name = name, "custom"
        end_of_turn = end_of_turn or _detect_end_of_turn(tokenizer, source)
    else:
        raise TemplateError(
            f"unknown chat template {name!r}; choose one of {sorted(BUILTIN_TEMPLATES)}, "
            "a Jinja template string, or leave it unset to use the tokenizer's own"
        )
    if not end_of_turn:
        raise TemplateError(f"template {name!r}: no end-of-turn string; set data.end_of_turn")
    if name in BUILTIN_TEMPLATES:
        tool_role = BUILTIN_TEMPLATES[name][2]
    else:
        tool_role = "tool" if _renders_tool_turns(tokenizer, source) else None
    return ChatTemplate(name=name, source=source, end_of_turn=end_of_turn, tool_role=tool_role)


def _renders_tool_turns(tokenizer: PreTrainedTokenizerBase, source: str) -> bool:
    """Whether the template shows a tool turn's content (many drop unknown roles or raise on them)."""
    marker = "distill-tool-probe-7f3a"
    probe = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "call"},
        {"role": "tool", "content": marker},
        {"role": "assistant", "content": "A"},
    ]
    try:
        rendered = tokenizer.apply_chat_template(probe, chat_template=source, tokenize=False)
    except jinja2.TemplateError:  # raise_exception on a role it does not know: tool turns go as user turns
        return False
    return marker in rendered


def _detect_end_of_turn(tokenizer: PreTrainedTokenizerBase, source: str) -> str | None:
    probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    rendered = tokenizer.apply_chat_template(probe, chat_template=source, tokenize=False)
    after_answer = rendered[rendered.rfind("A") + 1 :]
    candidates = [*_KNOWN_END_OF_TURN, tokenizer.eos_token]
    found = [c for c in candidates if c and c in after_answer]
    return min(found, key=after_answer.index) if found else None


def check_stops_on_end_of_turn(
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    stop_tokens: list[str] | tuple[str, ...] = (),
    add_to_stop_tokens: bool = False,
) -> list[int]:
    """The ids the model must stop on; fail if the template ends turns with a token it does not stop on.

    A template whose end-of-turn is not a stop token trains models that never stop generating.
    """
    ids = tokenizer(template.end_of_turn, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise TemplateError(
            f"template {template.name!r}: end-of-turn {template.end_of_turn!r} is not one token of this "
            f"tokenizer (it splits into {len(ids)}); use a tokenizer that has it as a special token"
        )
    stop_ids = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(stop_tokens))]
    stop_ids = [i for i in dict.fromkeys(stop_ids) if i is not None]
    if ids[0] not in stop_ids:
        if not add_to_stop_tokens:
            raise TemplateError(
                f"template {template.name!r} ends turns with {template.end_of_turn!r} (id {ids[0]}) but the "
                f"model stops on {tokenizer.convert_ids_to_tokens(stop_ids)}: it would never stop. Choose a "
                "template whose end-of-turn is the EOS token, list it in data.stop_tokens if the model "
                "already stops on it, or set data.add_eot_to_stop_tokens: true to add it to the saved "
                "model's generation_config"
            )
        log.warning(
            "end-of-turn %r is not a stop token of the model: adding id %d to the saved generation_config",
            template.end_of_turn,
            ids[0],
        )
        stop_ids.append(ids[0])
    return stop_ids
