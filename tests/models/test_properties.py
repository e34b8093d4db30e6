"""Property tests over model sizes and sequence lengths (hypothesis): caches, padding and fully padded rows."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from utils import assert_close, tiny_myllm

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def model_kwargs(draw):
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 6, 8]))
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "hidden_size": draw(st.sampled_from([12, 16, 24])),
        "intermediate_size": draw(st.sampled_from([20, 32])),
        "num_hidden_layers": draw(st.integers(1, 2)),
        "attention": draw(st.sampled_from(["eager", "sdpa"])),
        "attention_dropout": 0.0,
    }


def _ids(b, t, seed):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(
    kw=model_kwargs(),
    prompt=st.integers(1, 6),
    steps=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    cache=st.sampled_from(["dynamic", "static"]),
    seed=st.integers(0, 2**16),
)
def test_incremental_decoding_with_a_cache_equals_a_full_forward(kw, prompt, steps, cache, seed):
    cache_spec = {"name": cache, "max_cache_len": 32} if cache == "static" else {"name": cache}
    model = tiny_myllm(seed=seed, kv_cache=cache_spec, **kw)
    total = prompt + sum(steps)
    x = _ids(2, total, seed)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        out = model(x[:, :prompt], use_cache=True)
        pieces, past = [out.logits], out.cache
        start = prompt
        for n in steps:
            out = model(x[:, start : start + n], cache=past, use_cache=True)
            pieces.append(out.logits)
            past, start = out.cache, start + n
    assert_close(torch.cat(pieces, 1), full, atol=2e-5)


@SETTINGS
@given(kw=model_kwargs(), lengths=st.lists(st.integers(1, 7), min_size=2, max_size=3), seed=st.integers(0, 2**16))
def test_a_left_padded_batch_equals_the_unpadded_sequences(kw, lengths, seed):
    model = tiny_myllm(seed=seed, **kw)
    seqs = [_ids(1, n, seed + i) for i, n in enumerate(lengths)]
    width = max(lengths)
    batch = torch.cat([torch.cat([torch.zeros(1, width - s.shape[1], dtype=torch.long), s], 1) for s in seqs])
    mask = torch.stack([(torch.arange(width) >= width - s.shape[1]).long() for s in seqs])
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        for row, s in enumerate(seqs):
            assert_close(padded[row, width - s.shape[1] :], model(s).logits[0], atol=2e-5)


@SETTINGS
@given(
    kw=model_kwargs(),
    t=st.integers(1, 6),
    empty_rows=st.lists(st.booleans(), min_size=2, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_fully_padded_rows_never_give_nan(kw, t, empty_rows, seed):
    model = tiny_myllm(seed=seed, **kw).train()
    x = _ids(len(empty_rows), t, seed)
    mask = torch.ones_like(x)
    for row, empty in enumerate(empty_rows):
        if empty:
            mask[row] = 0
    labels = x.masked_fill(mask == 0, -100)
    labels[0, -1] = x[0, -1]  # keep at least one loss token so the loss itself is defined
    mask[0, -1] = 1
    out = model(x, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
