"""myllm: model surgery for decoder-only LLMs.

Importing myllm registers its blocks, the ``myllm`` model type and the ``myllm_<base>`` types of surgically
changed HF models (``myllm_llama``, ...) with transformers' ``AutoConfig`` and ``AutoModelForCausalLM``; it
changes nothing else in transformers.
"""

__version__ = "0.1.0"

from myllm import blocks, factory, surgery  # noqa: E402
from myllm.models import MyLLMConfig, MyLLMForCausalLM  # noqa: E402

__all__ = ["MyLLMConfig", "MyLLMForCausalLM", "blocks", "factory", "surgery", "__version__"]
