"""`visdial_val` in lmms-eval gives the same metrics as `omnifusion-evaluate-visdial` on the same data."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

from modeling_omnifusion.evaluation import visdial as evaluate_visdial
from modeling_omnifusion.evaluation.lmms import TASKS_DIR
from modeling_omnifusion.evaluation.lmms.model import OmniFusionLMMs
from modeling_omnifusion.testing.tiny import make_image

VISDIAL_SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "visdial"
METRICS = ("r@1", "r@5", "r@10", "mrr", "mean_rank", "ndcg")
MAX_DIALOGS = 2  # 20 rounds of 100 candidates, 2 of them with dense relevance


@pytest.fixture(scope="module")
def visdial_folder(tmp_path_factory):
    """The repository's VisDial sample (5 dialogs) under the task's default names, with generated images."""
    root = tmp_path_factory.mktemp("work")
    folder = root / "visdial"
    (folder / "VisualDialog_val2018").mkdir(parents=True)
    shutil.copy(VISDIAL_SAMPLE / "visdial_1.0_val_sample5.json", folder / "visdial_1.0_val.json")
    shutil.copy(
        VISDIAL_SAMPLE / "visdial_1.0_val_dense_annotations_sample5.json",
        folder / "visdial_1.0_val_dense_annotations.json",
    )
    for dialog in json.loads((folder / "visdial_1.0_val.json").read_text())["data"]["dialogs"]:
        image_id = dialog["image_id"]
        make_image(image_id % 1000, size=48).save(
            folder / "VisualDialog_val2018" / f"VisualDialog_val2018_{image_id:012d}.jpg"
        )
    return root


def _project_metrics(model_dir, folder: Path, score: str, output: Path) -> dict:
    evaluate_visdial.main(
        [
            "--model", str(model_dir),
            "--visdial_json", str(folder / "visdial_1.0_val.json"),
            "--dense_json", str(folder / "visdial_1.0_val_dense_annotations.json"),
            "--images_dir", str(folder / "VisualDialog_val2018"),
            "--output", str(output),
            "--score", score,
            "--batch_size", "50",
            "--max_dialogs", str(MAX_DIALOGS),
            "--dtype", "float32",
            "--device", "cpu",
        ]
    )  # fmt: skip
    return json.loads(output.read_text())["metrics"]


def _lmms_metrics(results, task="visdial_val") -> dict:
    return {key.split(",")[0]: value for key, value in results["results"][task].items() if "," in key}


@pytest.mark.parametrize("score", ["mean", "sum"])
def test_visdial_task_metrics_equal_the_projects_evaluator(
    score, tiny_model_dir, visdial_folder, monkeypatch, tmp_path
):
    monkeypatch.chdir(visdial_folder)
    config = TaskManager(include_path=str(TASKS_DIR))._get_config("visdial_val")
    config["dataset_kwargs"] = dict(config["dataset_kwargs"], score=score, max_dialogs=MAX_DIALOGS)
    model = OmniFusionLMMs(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", candidate_batch_size=50)
    results = simple_evaluate(model=model, tasks=[config], task_manager=TaskManager(include_path=str(TASKS_DIR)))
    lmms = _lmms_metrics(results)
    project = _project_metrics(tiny_model_dir, visdial_folder / "visdial", score, tmp_path / "project.json")
    assert {name: lmms[name] for name in METRICS} == project
    assert project["ndcg"] is not None and 0.0 < project["mrr"] <= 1.0


def test_visdial_task_runs_from_the_command_line_with_the_tasks_arguments(tiny_model_dir, visdial_folder, tmp_path):
    """The documented command, with the task's arguments in a YAML of the user's (in a folder of its own, given as
    `--include_path`) that includes the shipped one."""
    user_tasks = tmp_path / "my_tasks"
    user_tasks.mkdir()
    (user_tasks / "visdial_val.yaml").write_text(
        f"include: {TASKS_DIR / 'visdial_val.yaml'}\n"
        "dataset_kwargs:\n"
        f"  visdial_json: {visdial_folder / 'visdial' / 'visdial_1.0_val.json'}\n"
        f"  images_dir: {visdial_folder / 'visdial' / 'VisualDialog_val2018'}\n"
        "  max_dialogs: 1\n"
    )
    lmms_eval = Path(sys.executable).with_name("lmms-eval")
    command = [
        str(lmms_eval), "--model", "omnifusion",
        "--model_args", f"pretrained={tiny_model_dir},dtype=float32,device=cpu",
        "--include_path", str(user_tasks), "--tasks", "visdial_val", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    # lmms-eval 0.7.3 exits with 0 after an error too: the results file is the proof
    results_files = list((tmp_path / "out").rglob("*_results.json"))
    assert result.returncode == 0 and len(results_files) == 1, result.stderr[-3000:]
    metrics = _lmms_metrics(json.loads(results_files[0].read_text()))
    assert metrics["ndcg"] is None  # no dense annotations given
    assert 1.0 <= metrics["mean_rank"] <= 100.0
    assert "visdial_val" in result.stdout and "mrr" in result.stdout
