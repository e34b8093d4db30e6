"""The project's own Hugging Face causal LM, assembled from registry blocks.

Importing this package registers model_type ``"myllm"`` with ``transformers.AutoConfig`` and
``transformers.AutoModelForCausalLM`` (``exist_ok=True``); nothing else in transformers is changed.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from myllm.models import moe_convert  # noqa: F401  (registers qwen2_moe, qwen3_moe, mixtral)
from myllm.models.configuration import MyLLMConfig
from myllm.models.convert import HF_CONVERTERS, HFConverter, register_hf_converter
from myllm.models.modeling import MyLLMDecoderLayer, MyLLMForCausalLM, MyLLMModel, MyLLMPreTrainedModel

AutoConfig.register(MyLLMConfig.model_type, MyLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MyLLMConfig, MyLLMForCausalLM, exist_ok=True)

from myllm.models import deepseek  # noqa: E402,F401  (registers the deepseek_v3 converter)

__all__ = [
    "HF_CONVERTERS",
    "HFConverter",
    "register_hf_converter",
    "MyLLMConfig",
    "MyLLMDecoderLayer",
    "MyLLMForCausalLM",
    "MyLLMModel",
    "MyLLMPreTrainedModel",
]
