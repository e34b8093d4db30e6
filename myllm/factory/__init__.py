"""The factory: replace blocks inside real Hugging Face models, move trained weights, save and load the result.

``myllm.factory.replace(model, "ffn", "moe", n_experts=8, top_k=2)`` swaps blocks in place (see
:mod:`myllm.factory.engine`); the change is recorded in ``config.myllm_surgeries`` under a registered
``myllm_<base>`` model type so that ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` round-trip
(see :mod:`myllm.factory.recipe`).
"""

from myllm.factory import attention_movers, moe_movers  # noqa: F401  (register the MLA and MoE weight movers)
from myllm.factory.engine import SurgeryError, replace
from myllm.factory.export import ExportError, export
from myllm.factory.layout import SLOT_KINDS, SLOT_TABLE, Layout, LayoutError, resolve_layout, select_layers
from myllm.factory.movers import MOVERS, MoveError, Mover, register_mover
from myllm.factory.recipe import RecipeError, register_base, register_tabled_bases, surgeries

register_tabled_bases()

__all__ = [
    "MOVERS",
    "SLOT_KINDS",
    "SLOT_TABLE",
    "ExportError",
    "Layout",
    "LayoutError",
    "MoveError",
    "Mover",
    "RecipeError",
    "SurgeryError",
    "export",
    "register_base",
    "register_mover",
    "replace",
    "resolve_layout",
    "select_layers",
    "surgeries",
]
