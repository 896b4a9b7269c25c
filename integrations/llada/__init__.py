"""Dense LLaDA (LLaDA-8B): native transformers-5 model, config and backbone adapter.

Importing this package registers the ``llada`` model type with transformers' Auto classes
(``AutoConfig``, ``AutoModel``, ``AutoModelForMaskedLM``) and the adapter with bilevel_dlm.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .adapter import LLaDABackbone
from .configuration import LLaDAConfig, tiny_config
from .modeling import LLaDAModel, LLaDAModelLM

AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
AutoModelForMaskedLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)

__all__ = ["LLaDABackbone", "LLaDAConfig", "LLaDAModel", "LLaDAModelLM", "tiny_config"]
