"""The model id `omnifusion` resolves through the `lmms_eval.models` entry point of a plain install."""

import subprocess
import sys
from importlib.metadata import entry_points

from lmms_eval.api.model import lmms
from lmms_eval.models import get_model, get_model_manifest

from modeling_omnifusion.evaluation.lmms import TASKS_DIR
from modeling_omnifusion.evaluation.lmms.model import OmniFusionLMMs

TASK_FILES = {
    "gqa_local.yaml",
    "ok_vqa_val2014_local.yaml",
    "pope_local.yaml",
    "scienceqa_img_local.yaml",
    "textvqa_val_local.yaml",
    "visdial_val.yaml",
}


def test_entry_point_registers_omnifusion_as_a_chat_model():
    (entry_point,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "omnifusion"]
    manifest = entry_point.load()
    assert manifest.model_id == "omnifusion"
    assert manifest.chat_class_path == "modeling_omnifusion.evaluation.lmms.model.OmniFusionLMMs"
    assert get_model_manifest("omnifusion") == manifest
    model_class = get_model("omnifusion")
    assert model_class is OmniFusionLMMs
    assert issubclass(model_class, lmms) and model_class.is_simple is False


def test_lmms_eval_lists_the_model_in_a_fresh_process():
    code = "from lmms_eval.models import list_available_models; print('omnifusion' in list_available_models())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "True"


def test_task_configs_are_installed_with_the_package():
    assert {path.name for path in TASKS_DIR.glob("*.yaml")} == TASK_FILES
    printed = subprocess.run(
        [sys.executable, "-m", "modeling_omnifusion.evaluation.lmms"], capture_output=True, text=True, check=True
    )
    assert printed.stdout.strip() == str(TASKS_DIR)
