"""
`omnifusion-evaluate-visdial --backend vllm` (`modeling_omnifusion.evaluation`) against the HF backend on the same
tiny model (vLLM tier, not the main run).

Needs `vllm` (vllm-cpu on CPU) in the environment; the model's LM has head_dim 32, the smallest vLLM's CPU attention
accepts. One engine serves the module (it takes about a minute to start on a small CPU machine).
"""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("vllm", reason="the vLLM tier runs these tests in a venv with vllm-cpu")

from modeling_omnifusion import OmniFusionForCausalLM  # noqa: E402
from modeling_omnifusion.evaluation import visdial as evaluate_visdial  # noqa: E402
from modeling_omnifusion.evaluation import visdial_scoring, visdial_vllm  # noqa: E402
from modeling_omnifusion.testing.tiny import make_config, make_image, make_processor  # noqa: E402

QUESTIONS = ["is it red", "how many shapes are in the picture", "is it big", "any people", "what colour is the sky"]
ANSWERS = [
    "yes",
    "no",
    "two circles and one square",
    "it is blue",
    "one",
    "0",
    "a small yellow triangle",
    "the quick brown fox",
    "it is green",
    "there are two circles",
]


def visdial_file(path: Path) -> dict:
    """A VisDial-format file: two dialogs of different lengths (4 and 2 rounds), ragged questions and candidates."""
    dialogs = [
        {
            "image_id": 11,
            "caption": "a small yellow triangle on the left of a purple square",
            "dialog": [
                {"question": 1, "answer": 2, "gt_index": 0, "answer_options": [2, 4, 0, 1, 3, 5, 6, 7]},
                {"question": 0, "answer": 1, "gt_index": 3, "answer_options": [0, 5, 2, 1, 4, 3, 8, 9]},
                {"question": 2, "answer": 3, "gt_index": 1, "answer_options": [1, 3, 0, 5, 2, 4, 9, 6]},
                {"question": 4, "answer": 8, "gt_index": 2, "answer_options": [7, 6, 8, 0, 1, 2, 3, 4]},
            ],
        },
        {
            "image_id": 12,
            "caption": "two circles",
            "dialog": [
                {"question": 3, "answer": 1, "gt_index": 4, "answer_options": [5, 4, 0, 9, 1, 2, 3, 7]},
                {"question": 1, "answer": 9, "gt_index": 0, "answer_options": [9, 2, 4, 0, 1, 3, 6, 8]},
            ],
        },
    ]
    data = {"questions": QUESTIONS, "answers": ANSWERS, "dialogs": dialogs}
    path.write_text(json.dumps({"version": "1.0", "split": "val2018", "data": data}))
    return data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny OmniFusion (LM head_dim 32, peaked LM head), its data files and images, and one vLLM engine."""
    root = tmp_path_factory.mktemp("visdial_vllm")
    torch.manual_seed(0)
    processor = make_processor()
    config = make_config(processor, adapter_type="mlp")
    text = config.text_config
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 2, 1, 32
    model = OmniFusionForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked next-token distributions: candidate scores spread out
    folder = root / "omnifusion-hd32"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    data = visdial_file(root / "visdial.json")
    dense = [{"image_id": 11, "round_id": 3, "gt_relevance": [0.2, 1.0, 0.0, 0.6, 0.0, 0.0, 0.4, 0.0]}]
    (root / "dense.json").write_text(json.dumps(dense))
    (root / "images").mkdir()
    for dialog in data["dialogs"]:
        image_id = dialog["image_id"]
        make_image(image_id, size=48).save(root / "images" / f"VisualDialog_val2018_{image_id:012d}.png")
    # max_num_batched_tokens <= the tiny LM's 512 positions: vLLM runs a step's tokens as one flat sequence, and
    # OmniFusion's input check (main) refuses a forward longer than max_position_embeddings, vLLM's or not
    llm = visdial_vllm.make_engine(
        str(folder), dtype="float32", max_model_len=512, enforce_eager=True, max_num_batched_tokens=512
    )
    yield {
        "root": root,
        "folder": folder,
        "model": model,
        "processor": processor,
        "data": data,
        "dense": dense,
        "llm": llm,
    }
    del llm


def _png_path(root, image_id):
    path = root / "images" / f"VisualDialog_val2018_{image_id:012d}.png"
    if not path.is_file():
        raise FileNotFoundError(f"No image for VisDial image_id {image_id}: expected {path}")
    return path


def _jpeg_free_loader(root):
    """The images as saved (PNG: no JPEG loss, so both backends see the same pixels)."""
    from PIL import Image

    def load(image_id):
        with Image.open(_png_path(root, image_id)) as image:
            return image.convert("RGB")

    return load


class _Recorder:
    """Wraps a scorer factory and keeps every round's scores."""

    def __init__(self, factory):
        self.factory, self.scores = factory, []

    def __call__(self, dialog):
        scorer = self.factory(dialog)
        recorder = self

        class Scorer:
            def score_round(self, *args):
                scores = scorer.score_round(*args)
                recorder.scores.append(scores)
                return scores

        return Scorer()


@pytest.mark.parametrize("score", ["sum", "mean"])
def test_vllm_backend_scores_and_ranks_equal_the_hf_backend(setup, score):
    model, processor, data, dense = setup["model"], setup["processor"], setup["data"], setup["dense"]
    images = _jpeg_free_loader(setup["root"])
    hf = _Recorder(lambda dialog: visdial_scoring.DialogScorer(model, batch_size=3, score=score))
    vllm = _Recorder(lambda dialog: visdial_vllm.VLLMDialogScorer(setup["llm"], processor, score))
    hf_metrics, hf_ranks = visdial_scoring.evaluate_dialogs(
        model, processor, data, images, dense, score, progress=False, scorer_factory=hf
    )
    vllm_metrics, vllm_ranks = visdial_scoring.evaluate_dialogs(
        None, processor, data, images, dense, score, progress=False, scorer_factory=vllm
    )
    assert len(hf.scores) == len(vllm.scores) == 6
    for hf_scores, vllm_scores in zip(hf.scores, vllm.scores):
        assert vllm_scores.dtype == torch.float32 and vllm_scores.shape == hf_scores.shape == (8,)
        assert hf_scores.std() > 0.1  # the scores differ, so equal rankings mean something
        torch.testing.assert_close(vllm_scores, hf_scores, rtol=0, atol=1e-3)
    assert vllm_ranks == hf_ranks
    assert vllm_metrics == hf_metrics and vllm_metrics["ndcg"] is not None


def test_script_backend_vllm_writes_the_same_ranks_as_the_hf_backend(setup, monkeypatch, tmp_path):
    root = setup["root"]
    # JPEG-free images for both runs; the script's engine is the module's (same arguments checked)
    monkeypatch.setattr(evaluate_visdial, "image_loader", lambda directory, split: _jpeg_free_loader(root))
    # the up-front check that every image is there looks for those PNG files too
    monkeypatch.setattr(evaluate_visdial, "image_path", lambda directory, split, image_id: _png_path(root, image_id))
    engine_calls = []

    def make_engine(model, **kwargs):
        engine_calls.append((model, kwargs))
        return setup["llm"]

    monkeypatch.setattr(visdial_vllm, "make_engine", make_engine)
    common = [
        "--model",
        str(setup["folder"]),
        "--visdial_json",
        str(root / "visdial.json"),
        "--dense_json",
        str(root / "dense.json"),
        "--images_dir",
        str(root / "images"),
        "--score",
        "sum",
    ]
    evaluate_visdial.main([*common, "--output", str(tmp_path / "hf.json")])
    evaluate_visdial.main(
        [
            *common,
            "--backend",
            "vllm",
            "--max_model_len",
            "512",
            "--enforce_eager",
            "True",
            "--dtype",
            "float32",
            "--output",
            str(tmp_path / "vllm.json"),
        ]
    )
    assert engine_calls == [
        (str(setup["folder"]), dict(dtype="float32", max_model_len=512, tensor_parallel_size=1, enforce_eager=True))
    ]
    hf, vllm = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("hf", "vllm"))
    assert vllm["settings"]["backend"] == "vllm" and hf["settings"]["backend"] == "hf"
    assert vllm["settings"]["model_type"] == "omnifusion"
    assert vllm["metrics"] == hf["metrics"]
    assert (tmp_path / "vllm_ranks.json").read_text() == (tmp_path / "hf_ranks.json").read_text()


class _NoEngine:
    def generate(self, *args, **kwargs):
        raise AssertionError("the engine must not run")


def test_image_count_mismatch_is_refused_before_the_engine_runs(setup):
    processor = setup["processor"]
    scorer = visdial_vllm.VLLMDialogScorer(_NoEngine(), processor, "sum", where="image 7")
    candidate_ids = visdial_scoring.tokenize_candidates(processor.tokenizer, ["yes", "no"])
    two_images = visdial_scoring.dialog_messages(make_image(1), "c", [], "q?")
    two_images[0]["content"].insert(0, {"type": "image", "image": make_image(2)})
    no_image = visdial_scoring.dialog_messages(make_image(1), "c", [], "q?")
    no_image[0]["content"] = no_image[0]["content"][1:]
    context = visdial_scoring.build_context(processor, visdial_scoring.dialog_messages(make_image(1), "c", [], "q?"))
    for messages, images in ((two_images, 2), (no_image, 0)):
        with pytest.raises(ValueError, match=rf"image 7: .*got {images} image\(s\) .*before the vLLM engine runs"):
            scorer.score_round(context, candidate_ids, messages)


def test_prompt_tokenized_differently_from_hf_is_an_error(setup):
    """A tokenizer that adds BOS to the rendered template (as a converted release once did) is caught."""
    processor = setup["processor"]
    messages = visdial_scoring.dialog_messages(make_image(1), "c", [], "q?")
    context = visdial_scoring.build_context(processor, messages)
    candidate_ids = visdial_scoring.tokenize_candidates(processor.tokenizer, ["yes", "no"])

    class BosEngine:
        def generate(self, prompts, params, use_tqdm=False):
            outputs = setup["llm"].generate(prompts, params, use_tqdm=use_tqdm)
            for output in outputs:
                output.prompt_token_ids = [processor.tokenizer.bos_token_id, *output.prompt_token_ids]
            return outputs

    scorer = visdial_vllm.VLLMDialogScorer(BosEngine(), processor, "sum", where="image 7")
    expected = r"image 7: vLLM tokenized the prompt differently .*first difference at token 0"
    with pytest.raises(ValueError, match=expected):
        scorer.score_round(context, candidate_ids, messages)
