"""How weights move: upcycling, expert insertion, freezing (pure transforms plus their live-model wrappers).

``myllm.surgery.add_experts(model, n_new=2)`` grows MoE layers for SFT; ``myllm.surgery.freeze`` /
``unfreeze`` select parameters by slot kind, layer, name pattern or expert rows and print a report.
"""

from myllm.surgery.experts import add_experts, freeze_recorded_experts, grow_experts, grow_rows, moe_parts
from myllm.surgery.freeze import TrainableReport, freeze, freeze_rows, frozen_rows, trainable_report, unfreeze
from myllm.surgery.upcycle import expert_as_dense, split_permutation, upcycle_dense

__all__ = [
    "TrainableReport",
    "add_experts",
    "freeze_recorded_experts",
    "expert_as_dense",
    "freeze",
    "freeze_rows",
    "frozen_rows",
    "grow_experts",
    "grow_rows",
    "moe_parts",
    "split_permutation",
    "trainable_report",
    "unfreeze",
    "upcycle_dense",
]
