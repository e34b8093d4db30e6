"""Training: one loop for pretraining, SFT and distillation, with LoRA, on plain PyTorch or DeepSpeed.

Entry points::

    from myllm.train import RunConfig, Trainer, load_config, train

    result = train("run.yaml")                      # or train(RunConfig(...)); returns a TrainResult
    result.final_dir                                # plain HF model + tokenizer (from_pretrained loads it)

    trainer = Trainer(load_config("run.yaml", overrides=["train.max_steps=50"]))
    records = trainer.fit(steps=10)                 # logged metrics of those steps
    trainer.save_checkpoint(); trainer.export()

The command line does the same: ``myllm train run.yaml --set train.max_steps=50``.
"""

from myllm.train.config import ConfigError, RunConfig, load_config, parse_config
from myllm.train.core import Trainer, TrainModule, TrainResult, train
from myllm.train.metrics import read_metrics

__all__ = [
    "ConfigError",
    "RunConfig",
    "TrainModule",
    "TrainResult",
    "Trainer",
    "load_config",
    "parse_config",
    "read_metrics",
    "train",
]
