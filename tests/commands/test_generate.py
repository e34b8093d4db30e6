"""``myllm generate``: equals the Python API, caches from the registry, bad input."""

from __future__ import annotations

from myllm.cli import main
from myllm.generation import generate_text


def test_greedy_generation_matches_the_api_with_both_caches(capsys, lm_model, lm_tokenizer, lm_model_dir):
    expected = generate_text(lm_model, lm_tokenizer, "Return the", max_new_tokens=8, do_sample=False)[0]
    for cache in ("dynamic", "static"):
        argv = ["generate", str(lm_model_dir), "-p", "Return the", "--greedy", "--max-new-tokens", "8"]
        assert main([*argv, "--cache", cache]) == 0
        assert capsys.readouterr().out == f"Return the{expected}\n"


def test_sampling_is_seeded(capsys, lm_model_dir):
    argv = ["generate", str(lm_model_dir), "-p", "The", "--max-new-tokens", "12", "--temperature", "1.3"]
    runs = []
    for seed in ("1", "1", "2"):
        assert main([*argv, "--seed", seed]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] != runs[2]


def test_bad_input(tmp_path, capsys, lm_model_dir):
    assert main(["generate", str(lm_model_dir), "-p", "x", "--cache", "paged"]) == 2
    assert "registered cache blocks: dynamic" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "-p", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["generate", str(lm_model_dir), "-p", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
