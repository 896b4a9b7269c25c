"""MDLM (kuleshov-group OWT release): native DiT implementation and its backbone adapter.

Importing registers the adapter and, unless transformers already knows ``model_type="mdlm"``, the
``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` entries.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .adapter import MDLMBackbone, loglinear_sigma, subs_log_probs
from .configuration import MDLMConfig, tiny_config
from .modeling import MDLM, MDLMPreTrainedModel, build_tiny_model, reinit_zero_layers_for_tests


def _register_auto_classes() -> None:
    try:
        AutoConfig.register(MDLMConfig.model_type, MDLMConfig)
    except ValueError:  # already registered (by transformers itself or an earlier import): keep theirs
        return
    AutoModel.register(MDLMConfig, MDLM)
    AutoModelForMaskedLM.register(MDLMConfig, MDLM)


_register_auto_classes()

__all__ = [
    "MDLM",
    "MDLMBackbone",
    "MDLMConfig",
    "MDLMPreTrainedModel",
    "build_tiny_model",
    "loglinear_sigma",
    "reinit_zero_layers_for_tests",
    "subs_log_probs",
    "tiny_config",
]
