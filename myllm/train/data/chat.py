"""Chat rendering for SFT: the tokenizer's chat template (ChatML by default) and the assistant-token mask.

Loss is taken only on assistant tokens: each assistant message's content and its end-of-turn token
(``<|im_end|>`` in ChatML), not the role header and not the newline the template puts between turns.

Two ways to find the assistant tokens, which agree on ChatML (tested):

* templates with ``{% generation %}`` markers (like :data:`CHATML_TEMPLATE`): transformers'
  ``apply_chat_template(..., return_assistant_tokens_mask=True)``;
* any other template: :func:`assistant_char_spans` renders growing prefixes of the conversation to find
  where each assistant turn starts (after the generation prompt) and ends, and the tokenizer's offset mapping
  turns those character spans into tokens.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def resolve_template(tokenizer: Any, template: str | None) -> str:
    """The template to render with: the given one, else the tokenizer's, else ChatML (whose markers must be
    single tokens of the vocabulary, or the model would learn them as character soup)."""
    if template is not None:
        return template
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_TOKENS if t not in vocab]
    if missing:
        raise ValueError(
            f"the tokenizer has no chat template and lacks the ChatML tokens {missing}; add them as special "
            "tokens or set data.chat_template"
        )
    return CHATML_TEMPLATE


def render(tokenizer: Any, messages: list[Message], template: str, *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(tokenizer: Any, messages: list[Message], template: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the assistant turns in the full rendering.

    A turn starts after the generation prompt rendered for the messages before it and ends where the
    rendering of the messages up to it ends, minus trailing whitespace (the separator between turns).
    Raises ``ValueError`` when the template does not render conversations as growing prefixes.
    """
    full = render(tokenizer, messages, template)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], template, add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], template)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError(
                "the chat template does not render a conversation as growing prefixes, so assistant tokens cannot "
                "be located; add {% generation %} markers to it"
            )
        spans.append((len(before), len(upto.rstrip())))
    return spans


def encode_chat(tokenizer: Any, messages: list[Message], template: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask of the assistant tokens (same length)."""
    if "{% generation %}" in template or "{%- generation %}" in template:
        out = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), list(out["assistant_masks"])
    text = render(tokenizer, messages, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = assistant_char_spans(tokenizer, messages, template)
    mask = [int(any(s < e_span and e > s_span for s_span, e_span in spans)) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask
