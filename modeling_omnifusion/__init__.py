"""OmniFusion as a native Hugging Face Transformers model. Importing this package registers it with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .audio_omnifusion import add_sound
from .configuration_omnifusion import OmniFusionConfig
from .modeling_omnifusion import OmniFusionForCausalLM, OmniFusionModel, OmniFusionPreTrainedModel
from .processing.processing_omnifusion import OmniFusionProcessor

AutoConfig.register("omnifusion", OmniFusionConfig, exist_ok=True)
AutoModel.register(OmniFusionConfig, OmniFusionModel, exist_ok=True)
AutoModelForCausalLM.register(OmniFusionConfig, OmniFusionForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(OmniFusionConfig, OmniFusionForCausalLM, exist_ok=True)
AutoProcessor.register(OmniFusionConfig, OmniFusionProcessor, exist_ok=True)

# Saving writes the remote code and the `auto_map` entries, so a saved folder loads without this package.
OmniFusionConfig.register_for_auto_class()
OmniFusionModel.register_for_auto_class("AutoModel")
OmniFusionForCausalLM.register_for_auto_class("AutoModelForImageTextToText")
OmniFusionProcessor.register_for_auto_class()

__all__ = [
    "add_sound",
    "OmniFusionConfig",
    "OmniFusionForCausalLM",
    "OmniFusionModel",
    "OmniFusionPreTrainedModel",
    "OmniFusionProcessor",
]
