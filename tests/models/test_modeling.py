"""MyLLMForCausalLM behaviour: loss, gradient accumulation, logits_to_keep, embeddings, checkpointing, caches,
padding, packing, saving and loading, attention switching, DeepNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import DynamicCache, StaticCache
from utils import TINY_MYLLM, assert_close, max_abs_diff, tiny_myllm

from myllm import MyLLMConfig, MyLLMForCausalLM
from myllm.blocks.attention import EagerAttention, SdpaAttention


def ids(b=2, t=9, seed=0):
    return torch.randint(0, TINY_MYLLM["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ loss
def test_labels_are_shifted_exactly_once_and_minus_100_is_ignored():
    model = tiny_myllm()
    x = ids()
    labels = x.clone()
    labels[0, :4] = -100
    out = model(x, labels=labels)
    logits = out.logits.float()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(out.loss, expected, atol=1e-6)
    # non-vacuity: without the shift (or shifted twice) the loss is different
    unshifted = F.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1), ignore_index=-100)
    twice = F.cross_entropy(logits[:, :-2].reshape(-1, 128), labels[:, 2:].reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - unshifted.item()) > 1e-3 and abs(out.loss.item() - twice.item()) > 1e-3


def test_num_items_in_batch_makes_accumulated_gradients_equal_the_full_batch():
    """Two micro-batches with different numbers of loss tokens: sum(loss_i) with num_items_in_batch = total
    tokens gives the full batch's token-mean loss and gradients; the mean of means does not."""
    model = tiny_myllm().train()
    x = ids(4, 8)
    labels = x.clone()
    labels[:2, :6] = -100  # the first micro-batch has far fewer loss tokens
    n_items = (labels[:, 1:] != -100).sum()

    model.zero_grad()
    full = model(x, labels=labels).loss
    full.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    accumulated = 0.0
    for sl in (slice(0, 2), slice(2, 4)):
        loss = model(x[sl], labels=labels[sl], num_items_in_batch=n_items).loss
        loss.backward()
        accumulated += loss.item()
    assert accumulated == pytest.approx(full.item(), rel=1e-5)
    for p, g in zip(model.parameters(), full_grads, strict=True):
        assert_close(p.grad, g, atol=1e-6)

    mean_of_means = sum(model(x[sl], labels=labels[sl]).loss.item() for sl in (slice(0, 2), slice(2, 4))) / 2
    assert abs(mean_of_means - full.item()) > 1e-3  # the check can fail


def test_logits_to_keep():
    model = tiny_myllm()
    x = ids()
    full = model(x).logits
    assert_close(model(x, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)
    assert_close(model(x, logits_to_keep=3).logits, full[:, -3:], atol=1e-6)
    keep = torch.tensor([0, 4])
    assert_close(model(x, logits_to_keep=keep).logits, full[:, keep], atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_or_untied_embeddings_survive_save_and_load(tied, tmp_path):
    model = tiny_myllm(tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.model.embed_tokens.padding_idx is None  # the seed's NaN bug: no padding_idx
    model.save_pretrained(tmp_path)
    back, info = MyLLMForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    x = ids()
    assert torch.equal(back(x).logits, model(x).logits)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_myllm(attention_dropout=0.0).train()
    x = ids()
    loss = model(x, labels=x).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    loss_ckpt = model(x, labels=x).loss
    loss_ckpt.backward()
    assert_close(loss_ckpt, loss, atol=1e-6)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert_close(p.grad, g, atol=1e-6)


# ------------------------------------------------------------------------------------------- save/load
def test_save_pretrained_safetensors_round_trip_with_mixed_layers(tmp_path):
    model = tiny_myllm(
        num_hidden_layers=3,
        attention={"name": "sdpa", "qkv_bias": True},
        layer_overrides={
            "1": {"attention": "eager", "norm": "layernorm"},
            "2": {"ffn": {"name": "dense", "gated": False}},
        },
    )
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(back, MyLLMForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert [type(layer.self_attn) for layer in back.model.layers] == [SdpaAttention, EagerAttention, SdpaAttention]
    assert not hasattr(back.model.layers[2].mlp, "gate_proj")
    x = ids()
    assert torch.equal(back(x).logits, model(x).logits)


def test_a_checkpoint_with_a_missing_block_does_not_load_silently(tmp_path):
    """A checkpoint whose blocks are not registered fails loudly (it never falls back to random weights)."""
    model = tiny_myllm()
    model.save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"name": "dense"', '"name": "moe_not_installed"')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="moe_not_installed.*available ffn blocks"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------- attention switching
def test_set_attn_implementation_swaps_kernels_keeps_weights_and_is_saved(tmp_path):
    model = tiny_myllm(layer_overrides={"0": {"attention": "eager"}})
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    before = model(x, attention_mask=mask).logits
    params = dict(model.named_parameters())
    model.model.layers[1].self_attn.q_proj.weight.requires_grad_(False)
    model.set_attn_implementation("eager")
    assert all(isinstance(layer.self_attn, EagerAttention) for layer in model.model.layers)
    assert model.config._attn_implementation == "eager" and model.config.attention["name"] == "eager"
    assert all(p is params[name] for name, p in model.named_parameters())  # the very same parameters
    assert not model.model.layers[1].self_attn.q_proj.weight.requires_grad
    assert not any(t.is_meta for t in model.buffers())
    after = model(x, attention_mask=mask).logits
    real = mask.bool()
    assert_close(after[real], before[real], atol=1e-5)
    # attention weights are recorded from the new modules
    out = model(x, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 9, 9)

    model.save_pretrained(tmp_path)
    assert MyLLMForCausalLM.from_pretrained(tmp_path).config.attention["name"] == "eager"
    sdpa = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert all(isinstance(layer.self_attn, SdpaAttention) for layer in sdpa.model.layers)
    assert_close(sdpa(x, attention_mask=mask).logits[real], before[real], atol=1e-5)


def test_set_attn_implementation_with_a_bad_name_changes_nothing():
    model = tiny_myllm()
    blocks_before = [layer.self_attn for layer in model.model.layers]
    with pytest.raises(ValueError, match="valid: eager, sdpa"):
        model.set_attn_implementation("flash_attention_2")
    assert [layer.self_attn for layer in model.model.layers] == blocks_before
    assert model.config.attention == {"name": "sdpa"}


def test_hidden_states_output():
    model = tiny_myllm()
    out = model(ids(), output_hidden_states=True)
    assert len(out.hidden_states) == 3  # embeddings + one per layer
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(ids()))


# -------------------------------------------------------------------------------------- caches, generate
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_generate_with_dynamic_and_static_caches_from_the_registry(attention):
    model = tiny_myllm(attention=attention)
    x = ids(2, 5)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    no_cache = model.generate(x, use_cache=False, **kw).sequences
    dyn = model.generate(x, **kw)
    static = model.generate(x, cache_implementation="static", **kw)
    assert isinstance(dyn.cache, DynamicCache) and isinstance(static.cache, StaticCache)
    assert torch.equal(dyn.sequences, no_cache) and torch.equal(static.sequences, no_cache)
    # the config's kv_cache spec is the default
    static_model = tiny_myllm(attention=attention, kv_cache={"name": "static", "max_cache_len": 64})
    out = static_model.generate(x, **kw)
    assert isinstance(out.cache, StaticCache) and out.cache.layers[0].max_cache_len >= 64
    assert torch.equal(out.sequences, no_cache)


def test_forward_builds_the_configured_cache_block():
    model = tiny_myllm(kv_cache={"name": "static", "max_cache_len": 32})
    out = model(ids(1, 4), use_cache=True)
    assert isinstance(out.cache, StaticCache) and out.cache.get_seq_length() == 4


def test_left_padded_generation_matches_each_unpadded_prompt():
    model = tiny_myllm()
    a, b = ids(1, 7, seed=1), ids(1, 4, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 7), torch.cat([torch.zeros(1, 3), torch.ones(1, 4)], 1)]).long()
    kw = dict(max_new_tokens=5, do_sample=False)
    together = model.generate(batch, attention_mask=mask, **kw)
    assert torch.equal(together[0, 7:], model.generate(a, **kw)[0, 7:])
    assert torch.equal(together[1, 7:], model.generate(b, **kw)[0, 4:])


def test_left_padded_forward_equals_the_unpadded_sequence():
    model = tiny_myllm()
    x = ids(1, 6)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 2), torch.ones(1, 6)], 1).long()
    assert_close(model(padded, attention_mask=mask).logits[:, 2:], model(x).logits, atol=1e-5)
    assert max_abs_diff(model(padded).logits[:, 2:], model(x).logits) > 1e-4  # without the mask, pads are seen


# ------------------------------------------------------------------------------------- padding, packing
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_fully_padded_rows_give_no_nan_in_forward_or_backward(attention):
    model = tiny_myllm(attention=attention).train()
    x = ids(3, 6)
    mask = torch.ones_like(x)
    mask[1] = 0  # a row that is all padding
    mask[2, :4] = 0
    labels = x.masked_fill(mask == 0, -100)
    out = model(x, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_packed_documents_do_not_attend_to_each_other():
    model = tiny_myllm()
    doc_a, doc_b = ids(1, 5, seed=3), ids(1, 4, seed=4)
    packed = torch.cat([doc_a, doc_b], 1)
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None]
    logits = model(packed, position_ids=positions).logits
    assert_close(logits[:, :5], model(doc_a).logits, atol=1e-5)
    assert_close(logits[:, 5:], model(doc_b).logits, atol=1e-5)
    # non-vacuity: with one running position sequence, the second document sees the first
    running = model(packed).logits[:, 5:]
    assert max_abs_diff(running, model(doc_b).logits) > 1e-4


# ------------------------------------------------------------------------------------------- DeepNorm
def test_deepnorm_model_is_post_norm_with_scaled_skip_and_beta_init(tmp_path):
    n = 4
    model = tiny_myllm(num_hidden_layers=n, norm="deepnorm")
    layer = model.model.layers[0]
    alpha = (2 * n) ** 0.25
    assert layer.residual_alpha == pytest.approx(alpha)
    assert isinstance(model.model.norm, torch.nn.Identity)  # post-norm layers end normalised

    # the wiring: x = LN1(alpha x + attn(x)); x = LN2(alpha x + ffn(x))
    h = torch.randn(2, 5, 32)
    pos = torch.arange(5)[None]
    cos_sin = model.model.rotary_emb(h, pos)
    attn = layer.self_attn(h, position_embeddings=cos_sin)[0]
    mid = layer.input_layernorm(alpha * h + attn)
    expected = layer.post_attention_layernorm(alpha * mid + layer.mlp(mid))
    assert_close(layer(h, position_embeddings=cos_sin), expected, atol=1e-6)

    # beta-scaled xavier on ffn, v and o; q keeps the normal init
    fresh = MyLLMForCausalLM(
        MyLLMConfig(
            **{
                **TINY_MYLLM,
                "num_hidden_layers": n,
                "hidden_size": 256,
                "num_attention_heads": 4,
                "intermediate_size": 512,
            },
            norm="deepnorm",
        )
    )
    beta = (8 * n) ** -0.25
    lay = fresh.model.layers[1]
    assert lay.mlp.down_proj.weight.std().item() == pytest.approx(beta * (2 / (512 + 256)) ** 0.5, rel=0.05)
    assert lay.self_attn.v_proj.weight.std().item() == pytest.approx(beta * (2 / (256 + 128)) ** 0.5, rel=0.05)
    assert lay.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)

    # loading does not re-initialise the weights
    model.save_pretrained(tmp_path)
    back = MyLLMForCausalLM.from_pretrained(tmp_path)
    x = ids()
    assert torch.equal(back(x).logits, model(x).logits)


def test_a_layer_with_its_own_rope_computes_it_itself():
    """A per-layer override with another head_dim cannot take the model's (cos, sin): that layer applies its own."""
    model = tiny_myllm(layer_overrides={"1": {"attention": {"name": "sdpa", "head_dim": 16}}})
    assert model.model.shares_rope(model.model.layers[0].self_attn)
    assert not model.model.shares_rope(model.model.layers[1].self_attn)
    x = ids(1, 7)
    full = model(x).logits
    first = model(x[:, :4], use_cache=True)
    rest = model(x[:, 4:], cache=first.cache, use_cache=True).logits
    assert_close(torch.cat([first.logits, rest], 1), full, atol=1e-5)


def test_forward_needs_exactly_one_of_input_ids_and_inputs_embeds():
    model = tiny_myllm()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    x = ids()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(x, inputs_embeds=model.model.embed_tokens(x))
    assert_close(model(inputs_embeds=model.model.embed_tokens(x)).logits, model(x).logits, atol=0)
