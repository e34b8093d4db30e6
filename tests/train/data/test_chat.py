"""SFT rendering: ChatML by default, loss only on assistant tokens, two mask methods that agree."""

from __future__ import annotations

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from train_helpers import make_conversations

from myllm.train.data import IGNORE, chat_examples
from myllm.train.data.chat import CHATML_TEMPLATE, encode_chat, render, resolve_template

PLAIN_CHATML = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def test_default_template_is_chatml(tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None  # a tokenizer without a template of its own gets ChatML
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the model"}]
    tpl = resolve_template(tok, None)
    assert tpl == CHATML_TEMPLATE
    assert render(tok, conv, tpl) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nthe model<|im_end|>\n"


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, PLAIN_CHATML], ids=["generation-markers", "char-spans"])
def test_only_assistant_content_and_end_token_are_targets(tok, template):
    for conv in make_conversations(20, seed=5):
        ids, mask = encode_chat(tok, conv, template)
        assert len(ids) == len(mask)
        targets = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
        assert targets == "".join(m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant")


def test_both_mask_methods_agree_token_for_token(tok):
    for conv in make_conversations(20, seed=6):
        assert encode_chat(tok, conv, CHATML_TEMPLATE) == encode_chat(tok, conv, PLAIN_CHATML)


def test_examples_put_ignore_outside_assistant_turns(tok):
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
    ]
    ((ids, labels),) = chat_examples(tok, [conv], None)
    kept = [t for t in labels if t != IGNORE]
    assert tok.decode(kept) == "ok<|im_end|>"
    assert labels[: len(labels) - len(kept) - 1] == [IGNORE] * (len(labels) - len(kept) - 1)


def test_tokenizer_template_is_preferred_and_a_non_prefix_template_is_refused(tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = PLAIN_CHATML
    assert resolve_template(tok, None) == PLAIN_CHATML
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    counting = "{{ messages|length }}" + PLAIN_CHATML  # the header changes as the conversation grows
    with pytest.raises(ValueError, match="growing prefixes"):
        encode_chat(tok, conv, counting)


def test_chatml_needs_its_tokens(tmp_path):
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["plain text only"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    with pytest.raises(ValueError, match=r"lacks the ChatML tokens \['<\|im_start\|>', '<\|im_end\|>'\]"):
        resolve_template(tok, None)
