"""``myllm demo``: the whole library on a laptop, with no download.

Builds a corpus from the Python standard library's docstrings, trains a byte-level BPE tokenizer, pretrains a
small dense MyLLM with the training loop, upcycles a copy to a mixture of experts with ``factory.replace``
(logits unchanged), continues training both at equal steps, compares held-out perplexity and bits per byte,
saves and reloads the MoE with ``transformers.AutoModelForCausalLM``, generates, and writes ``report.md``,
``results.json`` and PNG plots.

Usage::

    from myllm.demo import QUICK, run_demo
    results = run_demo("runs/demo", preset=QUICK)
"""

from myllm.demo.pipeline import check_out_dir, run_demo
from myllm.demo.presets import FULL, PRESETS, QUICK, Preset

__all__ = ["FULL", "PRESETS", "QUICK", "Preset", "check_out_dir", "run_demo"]
