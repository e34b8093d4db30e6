"""myllm: model surgery for decoder-only LLMs.

Importing myllm registers its blocks and the ``myllm`` model type with transformers' ``AutoConfig`` and
``AutoModelForCausalLM``; it changes nothing else in transformers.
"""

from myllm import blocks
from myllm.models import MyLLMConfig, MyLLMForCausalLM

__version__ = "0.1.0"

__all__ = ["MyLLMConfig", "MyLLMForCausalLM", "blocks", "__version__"]
