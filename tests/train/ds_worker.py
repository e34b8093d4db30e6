"""Worker for the DeepSpeed tests (run by them in a child process, under torchrun for multi-rank runs).

    python ds_worker.py OUT_DIR CONFIG [CONFIG ...]

Trains each run config in turn in this one process, then writes per rank ``<i>-rank<r>.json`` (logged records,
final directory) and ``<i>-rank<r>.safetensors`` (the full parameters this rank holds, gathered under ZeRO-3).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from myllm.train import Trainer, load_config


def full_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter (gathered: collective under ZeRO-3) and persistent buffer as this rank holds it."""
    import deepspeed

    out = {}
    for name, p in trainer.module.named_parameters():
        ctx = deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext()
        with ctx:
            out[name] = p.detach().cpu().clone().contiguous()
    return out | persistent_buffers(trainer)


def persistent_buffers(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Persistent buffers (e.g. MoE routers' ``e_score_correction_bias``), never partitioned by ZeRO."""
    return {
        f"{prefix}.{name}": b.detach().cpu().clone().contiguous()
        for prefix, module in trainer.module.named_modules()
        for name, b in module.named_buffers(recurse=False)
        if name not in module._non_persistent_buffers_set
    }


def main(out_dir: str, *configs: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    for i, path in enumerate(configs):
        trainer = Trainer(load_config(path))
        records = trainer.fit()
        params = (
            full_parameters(trainer)
            if trainer.cfg.engine.kind == "deepspeed"
            else dict(trainer.module.named_parameters()) | persistent_buffers(trainer)
        )
        save_file(
            {k: v.detach().contiguous() for k, v in params.items()}, str(out / f"{i}-rank{trainer.rank}.safetensors")
        )
        result = trainer.export()
        info = {
            "records": records,
            "final_dir": str(result.final_dir) if result.final_dir else None,
            "start_step": records[0]["step"] - 1 if records else trainer.step,
            "world_size": trainer.world_size,
        }
        (out / f"{i}-rank{trainer.rank}.json").write_text(json.dumps(info))
        trainer.engine.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
