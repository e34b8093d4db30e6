"""Reading shards for training: windows, epochs, ranks, mixtures, exact resume, workers, HF packing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from utils import tiny_hf_model

from myllm.data.shards import ShardError, ShardSet
from myllm.data.source import WindowSource
from myllm.data.tokenize import tokenize_to_shards
from myllm.data.tokenizer import train_tokenizer
from myllm.data.windows import ShardSource

T = 32


def _key(w: dict[str, torch.Tensor]) -> bytes:
    return w["input_ids"].numpy().tobytes()


def _take(source, n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for w in source:
        out.append(w)
        if len(out) == n:
            break
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def test_in_order_windows_are_the_stream(shard_dir):
    src = ShardSource(shard_dir, T, shuffle=False, num_epochs=1)
    assert isinstance(src, WindowSource)
    docs = ShardSet(shard_dir).documents()
    stream = np.concatenate(docs)
    windows = list(src)
    assert len(windows) == stream.size // T == src.n_windows[0]
    starts = set(np.cumsum([0] + [d.size for d in docs]).tolist())
    for i, w in enumerate(windows):
        assert np.array_equal(w["input_ids"].numpy(), stream[i * T : (i + 1) * T])
        for t in range(1, T):
            g = i * T + t
            assert (w["position_ids"][t] == 0) == (g in starts)
            assert (w["labels"][t] == -100) == (g in starts)


def test_epochs_shuffle_and_cover(shard_dir):
    src = ShardSource(shard_dir, T, seed=3)
    n = src.n_windows[0]
    first, second = _take(src, n), _take(src, n)
    assert src.state_dict()["epochs"] == [2]
    ordered = [_key(w) for w in ShardSource(shard_dir, T, shuffle=False, num_epochs=1)]
    assert sorted(map(_key, first)) == sorted(ordered) == sorted(map(_key, second))  # each window once per epoch
    assert [_key(w) for w in first] != ordered and [_key(w) for w in first] != [_key(w) for w in second]
    assert _same(first, _take(ShardSource(shard_dir, T, seed=3), n))  # deterministic from the seed
    assert not _same(first, _take(ShardSource(shard_dir, T, seed=4), n))


def test_two_ranks_disjoint_and_covering(heldout_shard_dir):
    """(The held-out docstrings have no two equal windows, so window contents identify windows.)"""
    ranks = [list(ShardSource(heldout_shard_dir, T, rank=r, world_size=2, num_epochs=1, seed=1)) for r in range(2)]
    n = ShardSource(heldout_shard_dir, T).n_windows[0]
    keys = [set(map(_key, ws)) for ws in ranks]
    assert len(ranks[0]) == len(ranks[1]) == n // 2  # equal step counts on every rank
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == n - n % 2
    with pytest.raises(ValueError, match="rank"):
        ShardSource(heldout_shard_dir, T, rank=2, world_size=2)


def test_mixture_proportions(shard_dir, heldout_shard_dir):
    a_keys = {_key(w) for w in ShardSource(shard_dir, T, shuffle=False, num_epochs=1)}
    b_keys = {_key(w) for w in ShardSource(heldout_shard_dir, T, shuffle=False, num_epochs=1)}
    assert not a_keys & b_keys
    mix = ShardSource({shard_dir: 0.7, heldout_shard_dir: 0.3}, T, seed=5)
    windows = _take(mix, 2000)  # several epochs of each component
    from_a = sum(_key(w) in a_keys for w in windows)
    assert sum(_key(w) in b_keys for w in windows) == 2000 - from_a
    assert abs(from_a / 2000 - 0.7) < 0.02
    for k in range(0, 2000, 100):  # well mixed, not 1400 then 600
        assert 0.5 < sum(_key(w) in a_keys for w in windows[k : k + 100]) / 100 < 0.9
    state = mix.state_dict()
    assert state["counts"] == [from_a, 2000 - from_a] and state["step"] == 2000
    by_size = ShardSource([shard_dir, heldout_shard_dir], T)
    n_a, n_b = by_size.n_windows
    assert by_size.weights == pytest.approx([n_a / (n_a + n_b), n_b / (n_a + n_b)])


def test_exact_resume(shard_dir, heldout_shard_dir):
    paths = {shard_dir: 2.0, heldout_shard_dir: 1.0}
    src = ShardSource(paths, T, seed=7)
    _take(src, 37)
    state = json.loads(json.dumps(src.state_dict()))  # goes through a checkpoint as JSON
    expected = _take(src, 60)
    for workers in (0, 2):
        resumed = ShardSource(paths, T, seed=7, num_workers=workers)
        resumed.load_state_dict(state)
        assert _same(_take(resumed, 60), expected)


def test_resume_with_another_world_size(shard_dir):
    ranks = [ShardSource(shard_dir, T, rank=r, world_size=2, seed=2) for r in range(2)]
    for r in ranks:
        _take(r, 10)
    states = [r.state_dict() for r in ranks]
    assert states[0] == states[1] and states[0]["step"] == 20  # the position names no rank
    nxt = [_take(r, 5) for r in ranks]
    single = ShardSource(shard_dir, T, seed=2)
    single.load_state_dict(states[0])
    interleaved = [w for pair in zip(nxt[0], nxt[1], strict=True) for w in pair]
    assert _same(_take(single, 10), interleaved)


def test_worker_count_does_not_change_the_sequence(shard_dir):
    base = list(ShardSource(shard_dir, T, seed=9, num_epochs=2))
    for workers in (1, 2):
        src = ShardSource(shard_dir, T, seed=9, num_epochs=2, num_workers=workers)
        assert _same(list(src), base)
        assert src.state_dict()["step"] == len(base)


def test_dataloader_batches_track_position(shard_dir):
    src = ShardSource(shard_dir, T, seed=1)
    loader = DataLoader(src, batch_size=4)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    assert batches[0]["input_ids"].shape == (4, T)
    assert src.state_dict()["step"] == 12
    with pytest.raises(RuntimeError, match="pass num_workers= to the source"):
        next(iter(DataLoader(ShardSource(shard_dir, T), batch_size=2, num_workers=1)))


def test_resume_refuses_other_data(shard_dir, heldout_shard_dir):
    state = ShardSource(shard_dir, T).state_dict()
    for other in (ShardSource(shard_dir, T + 1), ShardSource(heldout_shard_dir, T), ShardSource(shard_dir, T, seed=1)):
        with pytest.raises(ValueError, match="other data"):
            other.load_state_dict(state)


def test_mixture_of_different_tokenizers(tmp_path, shard_dir, corpus_texts):
    tok = train_tokenizer(corpus_texts[:200], tmp_path / "tok", vocab_size=300)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in corpus_texts[:50]))
    tokenize_to_shards([src], tmp_path / "other", tok, progress=False)
    with pytest.raises(ShardError, match="different tokenizers"):
        ShardSource([shard_dir, tmp_path / "other"], T)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        ShardSource(tmp_path / "other", 10**7)


def test_packed_documents_do_not_see_each_other():
    """A window's position_ids make an HF model treat packed documents independently (with use_cache=False)."""
    model = tiny_hf_model("llama").eval()
    doc_a, doc_b = torch.randint(3, 128, (7,)), torch.randint(3, 128, (9,))
    tokens = torch.cat([doc_a, doc_b]).numpy()
    w = pack_window_for_test(tokens, [0, 7])
    batch = {k: v[None] for k, v in w.items()}
    with torch.no_grad():
        alone = model(input_ids=doc_b[None], use_cache=False).logits[0]
        packed = model(**batch, use_cache=False).logits[0, 7:]
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0, 7:]
        loss = model(**batch, use_cache=False).loss
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert (leaky - alone).abs().max() > 1e-3  # without restarting positions, b attends to a
    assert torch.isfinite(loss)


def pack_window_for_test(tokens, starts):
    from myllm.data.packing import pack_window

    return pack_window(tokens, np.asarray(starts))
