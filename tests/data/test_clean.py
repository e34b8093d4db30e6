"""``myllm data clean``: normalisation, filters, exact and near dedup, bad lines, atomic output, CLI."""

from __future__ import annotations

import json

import pytest
from data_helpers import write_jsonl

from myllm.cli import main
from myllm.data.clean import REASONS, CleanConfig, char_ratios, clean_jsonl
from myllm.data.io import JsonlError


def _records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture
def dirty(tmp_path, corpus_texts):
    base = [t for t in corpus_texts if len(t) > 300][:50]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(base)]
    lines += [json.dumps({"text": base[0], "id": "exact"})]  # exact duplicate
    lines += [json.dumps({"text": base[1].replace(" the ", " a ", 1), "id": "near"})]  # near duplicate
    lines += [
        json.dumps({"text": "ＦＵＬＬ　ｗｉｄｔｈ ｔｅｘｔ ｉｓ ｎｏｒｍａｌｉｓｅｄ ｂｙ ＮＦＫＣ", "id": "nfkc"})
    ]
    lines += [json.dumps({"text": "too short"})]
    lines += [json.dumps({"text": "!!!! #### .... ???? ~~~~ ---- ++++ ;;;; ::::"})]  # low alpha ratio
    lines += [json.dumps({"text": "version 1234567890 1234567890 1234567890 release"})]  # digits
    lines += ["{not json", json.dumps({"body": "no text field"}), json.dumps([1, 2]), json.dumps({"text": 5}), ""]
    path = tmp_path / "dirty.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, len(base)


def test_clean_report_and_output(tmp_path, dirty):
    path, n_base = dirty
    out = tmp_path / "out" / "clean.jsonl"
    report = clean_jsonl([path], out, CleanConfig(min_chars=20))
    kept = _records(out)
    assert report["dropped"] == {
        **dict.fromkeys(REASONS, 0),
        "bad_json": 1,
        "no_text": 3,
        "too_short": 1,
        "low_alpha_ratio": 1,
        "high_digit_ratio": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
    }
    assert report["read"] == report["kept"] + sum(report["dropped"].values())
    assert report["kept"] == len(kept) == n_base + 1
    assert [r["id"] for r in kept[:n_base]] == list(range(n_base))  # order and other fields kept
    assert kept[-1] == {"text": "FULL width text is normalised by NFKC", "id": "nfkc"}
    bad = {(b["line"], b["error"].split(" ")[0]) for b in report["bad_lines"]}
    n = n_base + 6
    assert bad == {(n + 1, "invalid"), (n + 2, "no"), (n + 3, "expected"), (n + 4, "field")}
    assert all(b["file"] == str(path) for b in report["bad_lines"])
    assert json.loads((tmp_path / "out" / "clean.jsonl.report.json").read_text())["kept"] == report["kept"]


def test_switches_off(tmp_path, dirty):
    path, n_base = dirty
    cfg = CleanConfig(
        min_chars=0, min_alpha_ratio=0, max_digit_ratio=1, exact_dedup=False, near_dedup=False, normalize=None
    )
    report = clean_jsonl(path, tmp_path / "all.jsonl", cfg)
    assert report["kept"] == n_base + 6 and report["lsh"] is None
    assert _records(tmp_path / "all.jsonl")[n_base + 2]["text"].startswith("ＦＵＬＬ")


def test_char_ratios():
    assert char_ratios("abc 123") == (0.5, 0.5)
    assert char_ratios("  \n") == (0.0, 0.0)
    assert char_ratios("数据清洗")[0] == 1.0  # CJK characters are letters


def test_strict_and_atomic(tmp_path, dirty):
    path, _ = dirty
    out = tmp_path / "clean.jsonl"
    out.write_text("previous contents\n")
    with pytest.raises(JsonlError, match=r"dirty\.jsonl:\d+: invalid JSON"):
        clean_jsonl([path], out, CleanConfig(strict=True))
    assert out.read_text() == "previous contents\n"  # a failed run leaves the output as it was
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_bad_input(tmp_path, dirty):
    path, _ = dirty
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        clean_jsonl([tmp_path / "empty.jsonl"], tmp_path / "o.jsonl")
    with pytest.raises(FileNotFoundError):
        clean_jsonl([tmp_path / "missing.jsonl"], tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="also an input"):
        clean_jsonl([path], path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="not writable|existing file"):
        clean_jsonl([path], tmp_path / "afile" / "o.jsonl")
    with pytest.raises(ValueError, match="near_threshold"):
        CleanConfig(near_threshold=1.0)
    assert not (tmp_path / "o.jsonl").exists()


def test_cli(tmp_path, corpus_texts, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", corpus_texts[:40] + corpus_texts[:5])
    assert main(["data", "clean", str(src), "-o", str(tmp_path / "out.jsonl"), "--no-near-dedup"]) == 0
    assert "exact_duplicate 5" in capsys.readouterr().out
    assert len(_records(tmp_path / "out.jsonl")) == len(set(corpus_texts[:40]))
    assert main(["data", "clean", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
