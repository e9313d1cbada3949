"""The `lmms_eval.models` entry point's payload: model id `omnifusion`, a chat model (`model.OmniFusionLMMs`)."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest("omnifusion", chat_class_path="modeling_omnifusion.evaluation.lmms.model.OmniFusionLMMs")
