"""The demo's sizes: one :class:`Preset` for the full run (minutes on 2 CPU cores) and one for ``--quick`` (CI).

A preset decides everything that shapes the numbers in the report: the corpus, the tokenizer's vocabulary,
the dense model, the training steps of each phase and the MoE it is upcycled to. The run configurations the
training loop receives (:class:`myllm.train.RunConfig`) are built from it here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from myllm.train import RunConfig, parse_config


@dataclass(frozen=True)
class Preset:
    """Sizes and steps of one demo run.

    ``pretrain_steps`` train the dense model from scratch; the dense copy and the upcycled MoE then each train
    ``continue_steps`` more on the same windows with the same schedule. One optimizer step sees
    ``micro_batch_size * seq_len`` tokens.
    """

    name: str
    corpus_package: str | None  # a stdlib package to read (None: the whole standard library)
    heldout_fraction: float
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    seq_len: int
    micro_batch_size: int
    pretrain_steps: int
    pretrain_lr: float
    continue_steps: int
    continue_lr: float
    warmup_steps: int
    n_experts: int
    top_k: int
    eval_docs: int | None  # held-out documents scored for perplexity (None: all)
    new_tokens: int
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_steps(self, pretrain: int | None = None, continued: int | None = None) -> Preset:
        """A copy with other step counts (warmup shortened to fit)."""
        p = pretrain if pretrain is not None else self.pretrain_steps
        c = continued if continued is not None else self.continue_steps
        if p < 1 or c < 1:
            raise ValueError(f"step counts must be >= 1, got pretrain={p}, continue={c}")
        return replace(self, pretrain_steps=p, continue_steps=c, warmup_steps=min(self.warmup_steps, p, c))

    def model_config(self, vocab_size: int) -> dict[str, Any]:
        """The dense MyLLM as an inline HF config for the training loop (``model: {config: ...}``)."""
        return {
            "model_type": "myllm",
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.seq_len,
            "tie_word_embeddings": True,
            "attention": "sdpa",
            "ffn": "dense",
            "norm": "rmsnorm",
        }

    def run_config(
        self, output_dir: Path, model: dict[str, Any], shards: Path, *, phase: str, progress: bool = True
    ) -> RunConfig:
        """The training loop's run for ``phase`` ``"pretrain"`` or ``"continue"`` (dense and MoE alike).

        The continued phase reads the shards in another order than pretraining (another data seed), the same
        for the dense and the MoE model, so both see the same windows in the same order.
        """
        steps, lr = (
            (self.pretrain_steps, self.pretrain_lr) if phase == "pretrain" else (self.continue_steps, self.continue_lr)
        )
        raw = {
            "output_dir": str(output_dir),
            "model": model,
            "data": {"kind": "shards", "path": str(shards), "seq_len": self.seq_len},
            "optimizer": {"lr": lr, "weight_decay": 0.1},
            "schedule": {"kind": "cosine", "warmup_steps": self.warmup_steps, "min_lr_ratio": 0.1},
            "train": {
                "max_steps": steps,
                "micro_batch_size": self.micro_batch_size,
                "grad_clip": 1.0,
                "seed": self.seed if phase == "pretrain" else self.seed + 1,
            },
            "checkpoint": {"resume": "never"},
            "logging": {"every": 1, "progress": progress},
        }
        return parse_config(raw, source=f"demo {phase} run")


FULL = Preset(
    name="full",
    corpus_package=None,
    heldout_fraction=0.05,
    vocab_size=2048,
    hidden_size=192,
    intermediate_size=512,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    seq_len=256,
    micro_batch_size=8,
    pretrain_steps=200,
    pretrain_lr=2e-3,
    continue_steps=60,
    continue_lr=1e-3,
    warmup_steps=20,
    n_experts=8,
    top_k=2,
    eval_docs=None,
    new_tokens=48,
)

QUICK = Preset(
    name="quick",
    corpus_package="email",
    heldout_fraction=0.1,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    seq_len=128,
    micro_batch_size=8,
    pretrain_steps=40,
    pretrain_lr=3e-3,
    continue_steps=15,
    continue_lr=1e-3,
    warmup_steps=5,
    n_experts=4,
    top_k=2,
    eval_docs=40,
    new_tokens=24,
)

PRESETS = {p.name: p for p in (FULL, QUICK)}
