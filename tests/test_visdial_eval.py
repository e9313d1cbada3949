"""Tests for VisDial candidate scoring (`modeling_omnifusion.evaluation.visdial_scoring`) and the evaluation driver
(`modeling_omnifusion.evaluation.visdial`)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessorPil,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from visdial_data import VISDIAL_DATA_DIR  # noqa: E402

from modeling_omnifusion.evaluation import visdial as evaluate_visdial  # noqa: E402
from modeling_omnifusion.evaluation import visdial_scoring  # noqa: E402
from modeling_omnifusion.testing.tiny import (  # noqa: E402
    IMAGE_SIZE,
    PATCH_SIZE,
    make_image,
    make_model_and_processor,
    make_tokenizer,
    vision_config,
)

BENCHMARK_VISDIAL = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "benchmark_visdial.py"


# transformers' llava-1.5-hf chat template
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def visdial_sample():
    return (
        VISDIAL_DATA_DIR / "visdial_1.0_val_sample5.json",
        VISDIAL_DATA_DIR / "visdial_1.0_val_dense_annotations_sample5.json",
    )


def _sharpen(model, scale: float = 20.0):
    """Scale the LM head so a random model's next-token distributions are peaked and candidate scores spread out."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def make_llava_and_processor(seed: int = 0):
    """A random tiny LLaVA (CLIP tower, Llama LM) with a LlavaProcessor carrying the llava-1.5 chat template."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.pad_token = tokenizer.unk_token
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision_config("clip"),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config).eval(), processor


@pytest.fixture(scope="module")
def omnifusion():
    model, processor = make_model_and_processor()
    return _sharpen(model), processor


@pytest.fixture(scope="module")
def omnifusion_mixed_tiled():
    """Two encoders with mix_sum and 1x2/2x1/2x2 tiles + global view."""
    model, processor = make_model_and_processor(
        vision=["clip", "dinov2"], adapter_type="mix_sum", image_grid_pinpoints=[[64, 32], [32, 64], [64, 64]]
    )
    return _sharpen(model), processor


@pytest.fixture(scope="module")
def llava():
    model, processor = make_llava_and_processor()
    return _sharpen(model), processor


def _real_round(visdial_sample, round_index: int = 3):
    """(messages, candidates, gt_index) of one real VisDial round, with its GT history and a generated image."""
    data, _, _ = evaluate_visdial.load_visdial(*visdial_sample, max_dialogs=1)
    dialog = data["dialogs"][0]
    question = lambda r: visdial_scoring.visdial_round_question(data["questions"][r["question"]])  # noqa: E731
    history = [(question(r), data["answers"][r["answer"]]) for r in dialog["dialog"][:round_index]]
    current = dialog["dialog"][round_index]
    messages = visdial_scoring.dialog_messages(make_image(1), dialog["caption"], history, question(current))
    candidates = [data["answers"][index] for index in current["answer_options"]]
    return messages, candidates, current["gt_index"]


def test_prompt_layout_puts_caption_then_ground_truth_history_then_question(omnifusion):
    _, processor = omnifusion
    messages = visdial_scoring.dialog_messages(
        None, "a cat on a mat", [("is it black?", "yes"), ("is it big?", "no")], "any people?"
    )
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "This is a dialog with AI assistant.\n<image><user>Describe what you can see in the picture."
        "<assistant>a cat on a mat<user>is it black?<assistant>yes<user>is it big?<assistant>no"
        "<user>any people?<assistant>"
    )
    assert visdial_scoring.visdial_round_question("is it red") == "is it red?"
    assert visdial_scoring.visdial_round_question("is it red?") == "is it red?"


def test_candidate_tokens_equal_tokenizing_prompt_and_candidate_together(omnifusion, visdial_sample):
    _, processor = omnifusion
    messages, candidates, _ = _real_round(visdial_sample)
    context = visdial_scoring.build_context(processor, messages)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = messages[0]["content"][0]["image"]
    candidate_ids = visdial_scoring.tokenize_candidates(processor.tokenizer, candidates)
    for candidate, ids in zip(candidates[:20], candidate_ids[:20]):
        joint = processor(images=[image], text=[text + candidate], return_tensors="pt")["input_ids"][0]
        assert joint.tolist() == context["input_ids"][0].tolist() + ids


@pytest.mark.parametrize(
    "kind, score",
    [("omnifusion", "mean"), ("omnifusion", "sum"), ("omnifusion_mixed_tiled", "mean"), ("llava", "mean")],
)
def test_shared_prefix_scores_and_ranking_equal_naive_full_sequences(kind, score, request, visdial_sample):
    model, processor = request.getfixturevalue(kind)
    messages, candidates, _ = _real_round(visdial_sample)
    context = visdial_scoring.build_context(processor, messages)
    candidate_ids = visdial_scoring.tokenize_candidates(processor.tokenizer, candidates)
    assert len(candidate_ids) == 100 and len({len(ids) for ids in candidate_ids}) > 3  # ragged batches

    shared = visdial_scoring.score_candidates_shared_prefix(model, context, candidate_ids, batch_size=32, score=score)
    naive = visdial_scoring.score_candidates_naive(model, context, candidate_ids, batch_size=32, score=score)
    assert shared.shape == naive.shape == (100,)
    assert shared.dtype == torch.float32
    assert torch.isfinite(shared).all()
    assert shared.std() > 0.1  # a peaked model: the scores differ, so equal rankings mean something
    assert (shared - naive).abs().max() < 1e-4
    ranks = visdial_scoring.visdial_metric.scores_to_ranks
    assert ranks(shared.double().numpy()).tolist() == ranks(naive.double().numpy()).tolist()


@pytest.mark.parametrize("kind", ["omnifusion", "llava"])
def test_naive_full_logits_as_released_equals_naive_with_logits_to_keep(kind, request, visdial_sample):
    # The released test.py runs the LM head at every position and slices the candidates' rows afterwards; the
    # default keeps only those rows. Same scores either way, so the benchmark may time the released method exactly.
    model, processor = request.getfixturevalue(kind)
    messages, candidates, _ = _real_round(visdial_sample)
    context = visdial_scoring.build_context(processor, messages)
    candidate_ids = visdial_scoring.tokenize_candidates(processor.tokenizer, candidates[:24])
    assert len({len(ids) for ids in candidate_ids}) > 2  # ragged: padding rows must not leak into the slice
    for score in ("mean", "sum"):
        kept = visdial_scoring.score_candidates_naive(model, context, candidate_ids, batch_size=10, score=score)
        full = visdial_scoring.score_candidates_naive(
            model, context, candidate_ids, batch_size=10, score=score, full_logits=True
        )
        assert kept.std() > 0.1
        torch.testing.assert_close(full, kept, rtol=0, atol=1e-5)


def test_single_token_candidates_are_scored_from_the_context_logits(omnifusion, visdial_sample):
    model, processor = omnifusion
    messages, _, _ = _real_round(visdial_sample)
    context = visdial_scoring.build_context(processor, messages)
    candidates = ["1", "It", "2", "yes it is", "circles", "0"]  # "1", "It", "2", "0" are one token each
    candidate_ids = visdial_scoring.tokenize_candidates(processor.tokenizer, candidates)
    assert sum(len(ids) == 1 for ids in candidate_ids) == 4
    for score in ("mean", "sum"):
        shared = visdial_scoring.score_candidates_shared_prefix(
            model, context, candidate_ids, batch_size=2, score=score
        )
        naive = visdial_scoring.score_candidates_naive(model, context, candidate_ids, batch_size=2, score=score)
        torch.testing.assert_close(shared, naive, rtol=0, atol=1e-4)


def test_sum_score_is_mean_times_candidate_length(omnifusion, visdial_sample):
    model, processor = omnifusion
    messages, candidates, _ = _real_round(visdial_sample, round_index=0)
    context = visdial_scoring.build_context(processor, messages)
    candidate_ids = visdial_scoring.tokenize_candidates(processor.tokenizer, candidates[:10])
    mean = visdial_scoring.score_candidates_shared_prefix(model, context, candidate_ids, score="mean")
    total = visdial_scoring.score_candidates_shared_prefix(model, context, candidate_ids, score="sum")
    lengths = torch.tensor([len(ids) for ids in candidate_ids], dtype=torch.float32)
    torch.testing.assert_close(total, mean * lengths, rtol=1e-5, atol=1e-5)


def test_evaluate_dialogs_ranks_each_round_with_ground_truth_history(omnifusion):
    model, processor = omnifusion
    data = {
        "questions": ["is it red", "how many shapes", "is it big"],
        "answers": ["yes", "no", "two circles and one square", "it is blue", "one"],
        "dialogs": [
            {
                "image_id": 7,
                "caption": "a small yellow triangle",
                "dialog": [
                    {"question": 0, "answer": 1, "gt_index": 1, "answer_options": [0, 1, 2, 3, 4]},
                    {"question": 1, "answer": 2, "gt_index": 0, "answer_options": [2, 4, 0, 1, 3]},
                    {"question": 2, "answer_options": [3, 0, 1, 4, 2]},  # a test-split last round: no answer
                ],
            }
        ],
    }
    dense = [{"image_id": 7, "round_id": 2, "gt_relevance": [0.6, 0.0, 0.2, 0.0, 1.0]}]
    image = make_image(3)
    metrics, ranks = visdial_scoring.evaluate_dialogs(model, processor, data, {7: image}, dense, progress=False)

    assert [(entry["image_id"], entry["round_id"]) for entry in ranks] == [(7, 1), (7, 2), (7, 3)]
    history = [("is it red?", "no"), ("how many shapes?", "two circles and one square")]
    all_scores = []
    for round_index, visdial_round in enumerate(data["dialogs"][0]["dialog"]):
        question = data["questions"][visdial_round["question"]] + "?"
        messages = visdial_scoring.dialog_messages(image, "a small yellow triangle", history[:round_index], question)
        candidates = [data["answers"][index] for index in visdial_round["answer_options"]]
        scores = visdial_scoring.score_candidates_shared_prefix(
            model,
            visdial_scoring.build_context(processor, messages),
            visdial_scoring.tokenize_candidates(processor.tokenizer, candidates),
        )
        all_scores.append(scores.double().numpy())
        assert ranks[round_index]["ranks"] == visdial_scoring.visdial_metric.scores_to_ranks(all_scores[-1]).tolist()
    expected = visdial_scoring.visdial_metric.visdial_metrics(
        [s.tolist() for s in all_scores[:2]], [1, 0], [[], dense[0]["gt_relevance"]]
    )
    assert metrics == expected
    assert metrics["ndcg"] is not None


def test_processor_without_chat_template_is_a_clear_error(omnifusion):
    _, processor = omnifusion
    template = processor.chat_template
    processor.chat_template = None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            visdial_scoring.build_context(processor, visdial_scoring.dialog_messages(make_image(0), "c", [], "q?"))
    finally:
        processor.chat_template = template


def test_real_annotation_files_parse(visdial_sample):
    data, split, dense = evaluate_visdial.load_visdial(*visdial_sample)
    assert split == "val2018"
    assert len(data["dialogs"]) == 5 and len(dense) == 5
    for dialog, entry in zip(data["dialogs"], dense):
        assert entry["image_id"] == dialog["image_id"]
        assert len(dialog["dialog"]) == 10 and 1 <= entry["round_id"] <= 10
        assert len(entry["gt_relevance"]) == 100
        for visdial_round in dialog["dialog"]:
            assert len(visdial_round["answer_options"]) == 100
            assert data["answers"][visdial_round["answer_options"][visdial_round["gt_index"]]]
            assert data["questions"][visdial_round["question"]]
    two, _, dense_two = evaluate_visdial.load_visdial(*visdial_sample, max_dialogs=2)
    assert [d["image_id"] for d in two["dialogs"]] == [e["image_id"] for e in dense_two]
    assert len(dense_two) == 2


def _write_images(visdial_json, images_dir: Path, max_dialogs: int):
    images_dir.mkdir()
    with open(visdial_json) as f:
        dialogs = json.load(f)["data"]["dialogs"][:max_dialogs]
    for dialog in dialogs:
        image_id = dialog["image_id"]
        make_image(image_id % 1000, size=48).save(images_dir / f"VisualDialog_val2018_{image_id:012d}.jpg")
    return [dialog["image_id"] for dialog in dialogs]


def _check_outputs(output: Path, ranks_file: Path, image_ids: list[int], model_name: str):
    results = json.loads(output.read_text())
    assert results["model"] == model_name
    metrics = results["metrics"]
    assert set(metrics) == {"r@1", "r@5", "r@10", "mrr", "mean_rank", "ndcg"}
    for key in ("r@1", "r@5", "r@10", "mrr", "ndcg"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["r@1"] <= metrics["r@5"] <= metrics["r@10"]
    assert 1.0 <= metrics["mean_rank"] <= 100.0
    assert results["settings"]["num_rounds"] == 10 * len(image_ids)
    assert results["settings"]["num_dense_rounds"] == len(image_ids)

    ranks = json.loads(ranks_file.read_text())
    assert [(entry["image_id"], entry["round_id"]) for entry in ranks] == [
        (image_id, round_id) for image_id in image_ids for round_id in range(1, 11)
    ]
    for entry in ranks:
        assert sorted(entry["ranks"]) == list(range(1, 101))
    return results


def test_script_end_to_end_on_real_annotations(tmp_path, visdial_sample, capsys):
    model, processor = make_model_and_processor(seed=1)
    model.save_pretrained(tmp_path / "omnifusion")
    processor.save_pretrained(tmp_path / "omnifusion")
    image_ids = _write_images(visdial_sample[0], tmp_path / "images", max_dialogs=2)
    output = tmp_path / "out" / "omnifusion_visdial.json"

    evaluate_visdial.main(
        [
            "--model",
            str(tmp_path / "omnifusion"),
            "--visdial_json",
            str(visdial_sample[0]),
            "--dense_json",
            str(visdial_sample[1]),
            "--images_dir",
            str(tmp_path / "images"),
            "--output",
            str(output),
            "--max_dialogs",
            "2",
            "--score",
            "sum",
            "--name",
            "OmniFusion-tiny",
        ]
    )
    results = _check_outputs(output, tmp_path / "out" / "omnifusion_visdial_ranks.json", image_ids, "OmniFusion-tiny")
    assert results["settings"]["score"] == "sum"
    assert results["settings"]["model_type"] == "omnifusion"
    printed = capsys.readouterr().out
    assert "| Model | NDCG | MRR | R@1 | R@5 | R@10 |" in printed
    assert f"| OmniFusion-tiny | {100 * results['metrics']['ndcg']:.2f} |" in printed
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


def test_script_evaluates_llava_and_plots_a_comparison(tmp_path, visdial_sample, capsys):
    model, processor = make_llava_and_processor(seed=2)
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    image_ids = _write_images(visdial_sample[0], tmp_path / "images", max_dialogs=1)
    output = tmp_path / "llava_visdial.json"
    ranks_file = tmp_path / "submission.json"
    common = ["--visdial_json", str(visdial_sample[0]), "--dense_json", str(visdial_sample[1])]
    evaluate_visdial.main(
        [
            "--model",
            str(tmp_path / "llava"),
            *common,
            "--images_dir",
            str(tmp_path / "images"),
            "--output",
            str(output),
            "--ranks_output",
            str(ranks_file),
            "--max_dialogs",
            "1",
            "--batch_size",
            "40",
        ]
    )
    results = _check_outputs(output, ranks_file, image_ids, "llava")
    assert results["settings"]["model_type"] == "llava"

    other = dict(results, model="baseline", metrics={**results["metrics"], "ndcg": None})
    (tmp_path / "baseline.json").write_text(json.dumps(other))
    chart = tmp_path / "chart.png"
    capsys.readouterr()
    evaluate_visdial.main(["--plot", str(output), str(tmp_path / "baseline.json"), "--plot_output", str(chart)])
    printed = capsys.readouterr().out
    assert "| llava |" in printed and "| baseline | n/a |" in printed
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_a_missing_metric_as_missing_and_gives_each_run_its_rounds():
    metrics = {"ndcg": 0.5, "mrr": 0.4, "r@1": 0.3, "r@5": 0.6, "r@10": 0.7}
    results = [
        {"model": "dense", "metrics": metrics, "settings": {"num_rounds": 20, "num_dense_rounds": 2}},
        {
            "model": "sparse",
            "metrics": {**metrics, "ndcg": None},
            "settings": {"num_rounds": 970, "num_dense_rounds": 0},
        },
    ]
    figure = evaluate_visdial.draw_results(results)
    axes = figure.axes[0]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == [
        "dense (20 rounds, 2 with NDCG)", "sparse (970 rounds, 0 with NDCG)"
    ]  # fmt: skip
    dense, sparse = axes.containers
    ndcg_column = [key for _, key in evaluate_visdial.TABLE_COLUMNS].index("ndcg")
    expected_heights = [100 * metrics[k] for _, k in evaluate_visdial.TABLE_COLUMNS]
    assert [bar.get_height() for bar in dense] == pytest.approx(expected_heights)
    assert len(sparse) == len(evaluate_visdial.TABLE_COLUMNS) - 1  # no bar (of height 0) for the missing NDCG
    sparse_centers = [bar.get_x() + bar.get_width() / 2 for bar in sparse]
    assert all(abs(center - ndcg_column) > 0.5 for center in sparse_centers)
    marks = [text for text in axes.texts if text.get_text() == "n/a"]
    assert len(marks) == 1 and abs(marks[0].get_position()[0] - ndcg_column) < 0.5
    assert "0.0" not in [text.get_text() for text in axes.texts]


def test_missing_image_names_the_image_id_and_expected_path(tmp_path, visdial_sample):
    model, processor = make_model_and_processor()
    model.save_pretrained(tmp_path / "omnifusion")
    processor.save_pretrained(tmp_path / "omnifusion")
    (tmp_path / "images").mkdir()
    data, _, _ = evaluate_visdial.load_visdial(visdial_sample[0], max_dialogs=1)
    image_id = data["dialogs"][0]["image_id"]
    expected = tmp_path / "images" / f"VisualDialog_val2018_{image_id:012d}.jpg"
    with pytest.raises(FileNotFoundError, match=rf"image_id {image_id}: expected {expected}"):
        evaluate_visdial.main(
            [
                "--model",
                str(tmp_path / "omnifusion"),
                "--visdial_json",
                str(visdial_sample[0]),
                "--images_dir",
                str(tmp_path / "images"),
                "--output",
                str(tmp_path / "r.json"),
                "--max_dialogs",
                "1",
            ]
        )
    assert not (tmp_path / "r.json").exists()


def test_expanded_cache_reads_the_context_without_changing_it():
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class CustomLayer(DynamicLayer):
        """A layer type the view shortcut does not know: it must be copied instead."""

    keys, values = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    cache = DynamicCache()
    cache.update(keys, values, layer_idx=0)
    cache.layers.append(CustomLayer())
    cache.update(keys + 1, values + 1, layer_idx=1)

    expanded = visdial_scoring._expand_cache(cache, 3)
    assert [layer.keys.shape for layer in expanded.layers] == [(3, 2, 5, 4)] * 2
    assert expanded.layers[0].keys.stride(0) == 0  # a view of the context
    assert expanded.layers[1].keys.data_ptr() != cache.layers[1].keys.data_ptr()  # a copy
    expanded.update(torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 4), layer_idx=0)
    expanded.update(torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 4), layer_idx=1)
    assert expanded.get_seq_length() == 7
    assert [layer.keys.shape for layer in cache.layers] == [(1, 2, 5, 4)] * 2
    torch.testing.assert_close(cache.layers[0].keys, keys)
    torch.testing.assert_close(cache.layers[1].values, values + 1)
    torch.testing.assert_close(expanded.layers[1].keys[:, :, :5], (keys + 1).expand(3, -1, -1, -1))


def _real_dialog_rounds(processor, visdial_sample, dialog_index: int = 0, num_candidates: int = 30):
    """(context_inputs, candidate_ids) of every round of one real dialog, GT history, first `num_candidates`."""
    data, _, _ = evaluate_visdial.load_visdial(*visdial_sample)
    dialog = data["dialogs"][dialog_index]
    image = make_image(dialog_index + 11)
    history, rounds = [], []
    for visdial_round in dialog["dialog"]:
        question = visdial_scoring.visdial_round_question(data["questions"][visdial_round["question"]])
        messages = visdial_scoring.dialog_messages(image, dialog["caption"], history, question)
        options = visdial_round["answer_options"][:num_candidates]
        candidates = [data["answers"][index] for index in options]
        rounds.append(
            (
                visdial_scoring.build_context(processor, messages),
                visdial_scoring.tokenize_candidates(processor.tokenizer, candidates),
            )
        )
        history.append((question, data["answers"][visdial_round["answer"]]))
    return rounds


def _assert_same_scores_and_ranking(cached, naive):
    """Equal log-likelihoods up to float32 round-off (sums of a peaked model reach a few hundred) and ranks."""
    assert cached.shape == naive.shape and cached.dtype == torch.float32
    assert torch.isfinite(cached).all()
    torch.testing.assert_close(cached, naive, rtol=1e-6, atol=1e-4)
    ranks = visdial_scoring.visdial_metric.scores_to_ranks
    assert ranks(cached.double().numpy()).tolist() == ranks(naive.double().numpy()).tolist()


@pytest.mark.parametrize(
    "kind, score, packed",
    [("omnifusion", "mean", True), ("omnifusion", "sum", False), ("llava", "sum", True), ("llava", "mean", False)],
)
def test_whole_dialog_cached_scoring_equals_naive_on_every_round(kind, score, packed, request, visdial_sample):
    model, processor = request.getfixturevalue(kind)
    rounds = _real_dialog_rounds(processor, visdial_sample, dialog_index=1)
    context_lengths = [inputs["input_ids"].shape[1] for inputs, _ in rounds]
    added = [b - a for a, b in zip(context_lengths, context_lengths[1:])]
    assert len(rounds) == 10 and len(set(added)) > 3  # rounds of different lengths
    assert any(len({len(ids) for ids in candidate_ids}) > 3 for _, candidate_ids in rounds)  # ragged candidates

    scorer = visdial_scoring.DialogScorer(model, batch_size=8, score=score, packed=packed)
    for inputs, candidate_ids in rounds:
        cached = scorer.score_round(inputs, candidate_ids)
        naive = visdial_scoring.score_candidates_naive(model, inputs, candidate_ids, batch_size=16, score=score)
        assert naive.std() > 0.1  # a peaked model: the scores differ, so equal rankings mean something
        _assert_same_scores_and_ranking(cached, naive)
    # the image, caption and history went through the model once: the tokens run add up to the last context
    assert scorer.image_encodings == 1
    assert scorer.context_tokens_run == context_lengths[-1]


def test_whole_dialog_scorer_packs_candidates_on_sdpa_and_eager(omnifusion, visdial_sample, monkeypatch):
    model, processor = omnifusion
    inputs, candidate_ids = _real_dialog_rounds(processor, visdial_sample, dialog_index=2)[4]
    naive = visdial_scoring.score_candidates_naive(model, inputs, candidate_ids, score="sum")
    packed_batches = []
    real_score_packed = visdial_scoring._score_packed
    monkeypatch.setattr(
        visdial_scoring, "_score_packed", lambda *a, **k: packed_batches.append(1) or real_score_packed(*a, **k)
    )
    attention = model.config.get_text_config()._attn_implementation
    assert attention == "sdpa"
    try:
        for implementation in ("sdpa", "eager"):
            model.set_attn_implementation(implementation)
            assert model.config.get_text_config()._attn_implementation == implementation
            cached = visdial_scoring.DialogScorer(model, batch_size=7, score="sum").score_round(inputs, candidate_ids)
            _assert_same_scores_and_ranking(cached, naive)
    finally:
        model.set_attn_implementation(attention)
    assert len(packed_batches) == 2


def test_whole_dialog_scorer_cuts_back_or_rebuilds_on_a_new_context(omnifusion):
    """Whole dialog scorer cuts back or rebuilds when a context does not extend the cached one."""
    model, processor = omnifusion
    image, other_image = make_image(5), make_image(6)
    history = [("is it red?", "no it is blue"), ("how many shapes?", "two circles and one square")]
    candidate_ids = visdial_scoring.tokenize_candidates(processor.tokenizer, ["yes", "no", "two", "it is red", "0"])
    scorer = visdial_scoring.DialogScorer(model, batch_size=3, score="mean")

    def check(image, history, question):
        inputs = visdial_scoring.build_context(
            processor, visdial_scoring.dialog_messages(image, "a small yellow triangle", history, question)
        )
        cached = scorer.score_round(inputs, candidate_ids)
        _assert_same_scores_and_ranking(cached, visdial_scoring.score_candidates_naive(model, inputs, candidate_ids))
        return inputs["input_ids"].shape[1]

    longest = check(image, history, "is it big?")
    shorter = check(image, history[:1], "how many shapes?")  # a prefix of the cached context: cut back, no rerun
    assert (scorer.image_encodings, scorer.context_tokens_run) == (1, longest + 1)
    check(image, history[:1], "is it green?")  # diverges after the first round: cut back to the common prefix
    assert scorer.image_encodings == 1 and longest + 1 < scorer.context_tokens_run < longest + 1 + shorter
    check(other_image, history[:1], "is it green?")  # another image: the cache is rebuilt with the new image
    assert scorer.image_encodings == 2


def test_evaluate_dialogs_on_dialogs_of_different_lengths_equals_naive_per_round(omnifusion):
    model, processor = omnifusion
    data = {
        "questions": ["is it red", "how many shapes are in the picture", "is it big", "any people"],
        "answers": ["yes", "no", "two circles and one square", "it is blue", "one", "0"],
        "dialogs": [
            {
                "image_id": 3,
                "caption": "a small yellow triangle on the left of a purple square",
                "dialog": [
                    {"question": 1, "answer": 2, "gt_index": 0, "answer_options": [2, 4, 0, 1, 3, 5]},
                    {"question": 0, "answer": 1, "gt_index": 3, "answer_options": [0, 5, 2, 1, 4, 3]},
                    {"question": 2, "answer": 3, "gt_index": 1, "answer_options": [1, 3, 0, 5, 2, 4]},
                    {"question": 3, "answer_options": [3, 0, 1, 4, 2, 5]},  # a test-split last round: no answer
                ],
            },
            {
                "image_id": 9,
                "caption": "two circles",
                "dialog": [{"question": 0, "answer": 0, "gt_index": 2, "answer_options": [5, 4, 0, 1, 2, 3]}],
            },
        ],
    }
    images = {3: make_image(3), 9: make_image(9)}
    vision_calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: vision_calls.append(1))
    try:
        metrics, ranks = visdial_scoring.evaluate_dialogs(model, processor, data, images, batch_size=4, progress=False)
    finally:
        hook.remove()
    assert len(vision_calls) == 2  # once per dialog, not once per round

    expected_ranks, predictions, references = [], [], []
    for dialog in data["dialogs"]:
        history = []
        for round_index, visdial_round in enumerate(dialog["dialog"]):
            question = data["questions"][visdial_round["question"]] + "?"
            messages = visdial_scoring.dialog_messages(images[dialog["image_id"]], dialog["caption"], history, question)
            candidates = [data["answers"][index] for index in visdial_round["answer_options"]]
            naive = visdial_scoring.score_candidates_naive(
                model,
                visdial_scoring.build_context(processor, messages),
                visdial_scoring.tokenize_candidates(processor.tokenizer, candidates),
            )
            expected_ranks.append(
                {
                    "image_id": dialog["image_id"],
                    "round_id": round_index + 1,
                    "ranks": visdial_scoring.visdial_metric.scores_to_ranks(naive.double().numpy()).tolist(),
                }
            )
            if "gt_index" in visdial_round:
                predictions.append(naive.double().tolist())
                references.append(visdial_round["gt_index"])
                history.append((question, data["answers"][visdial_round["answer"]]))
    assert ranks == expected_ranks
    assert metrics == visdial_scoring.visdial_metric.visdial_metrics(predictions, references, [[]] * len(references))


def test_backend_vllm_without_vllm_installed_is_a_clear_error(tmp_path, visdial_sample, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError(f"No module named {name!r}", name="vllm")
        return real_import(name, *args, **kwargs)

    model, processor = make_model_and_processor()
    model.save_pretrained(tmp_path / "omnifusion")
    processor.save_pretrained(tmp_path / "omnifusion")
    monkeypatch.setattr(builtins, "__import__", no_vllm)
    monkeypatch.delitem(sys.modules, "modeling_omnifusion.evaluation.visdial_vllm", raising=False)
    monkeypatch.delattr("modeling_omnifusion.evaluation.visdial_vllm", raising=False)
    with pytest.raises(ModuleNotFoundError, match="--backend vllm needs vLLM: `pip install vllm`"):
        evaluate_visdial.main(
            [
                "--model",
                str(tmp_path / "omnifusion"),
                "--visdial_json",
                str(visdial_sample[0]),
                "--backend",
                "vllm",
                "--images_dir",
                str(tmp_path),
                "--output",
                str(tmp_path / "r.json"),
                "--max_dialogs",
                "1",
            ]
        )
    assert not (tmp_path / "r.json").exists()


def test_tensor_parallel_on_the_hf_backend_is_refused(tmp_path, visdial_sample):
    with pytest.raises(ValueError, match="--tensor_parallel_size is a --backend vllm option"):
        evaluate_visdial.main(
            [
                "--model",
                str(tmp_path / "m"),
                "--visdial_json",
                str(visdial_sample[0]),
                "--images_dir",
                str(tmp_path),
                "--tensor_parallel_size",
                "2",
            ]
        )


def test_shards_merged_equal_one_unsharded_run(tmp_path, visdial_sample, capsys):
    model, processor = make_model_and_processor(seed=3)
    model.save_pretrained(tmp_path / "omnifusion")
    processor.save_pretrained(tmp_path / "omnifusion")
    image_ids = _write_images(visdial_sample[0], tmp_path / "images", max_dialogs=2)  # the 3rd is too long
    common = [
        "--model",
        str(tmp_path / "omnifusion"),
        "--visdial_json",
        str(visdial_sample[0]),
        "--dense_json",
        str(visdial_sample[1]),
        "--images_dir",
        str(tmp_path / "images"),
        "--max_dialogs",
        "2",
    ]
    evaluate_visdial.main([*common, "--output", str(tmp_path / "whole.json")])
    for index in (1, 0):
        evaluate_visdial.main(
            [*common, "--num_shards", "2", "--shard_index", str(index)]
            + ["--output", str(tmp_path / f"shard{index}.json")]
        )
    shard_sizes = [json.loads((tmp_path / f"shard{i}.json").read_text())["settings"]["num_dialogs"] for i in (0, 1)]
    assert shard_sizes == [1, 1]
    shards = [str(tmp_path / "shard1.json"), str(tmp_path / "shard0.json")]
    evaluate_visdial.main(["--merge", *shards, "--output", str(tmp_path / "merged.json"), "--name", "merged"])
    whole = json.loads((tmp_path / "whole.json").read_text())
    merged = _check_outputs(tmp_path / "merged.json", tmp_path / "merged_ranks.json", image_ids, "merged")
    assert merged["metrics"] == whole["metrics"]
    assert (tmp_path / "merged_ranks.json").read_text() == (tmp_path / "whole_ranks.json").read_text()
    assert f"| merged | {100 * whole['metrics']['ndcg']:.2f} |" in capsys.readouterr().out

    with pytest.raises(ValueError, match=r"each of the 2 shards exactly once, got shard indices \[0\]"):
        evaluate_visdial.main(["--merge", shards[1], "--output", str(tmp_path / "bad.json")])
    with pytest.raises(ValueError, match=r"--shard_index must be in 0..1"):
        evaluate_visdial.main([*common, "--num_shards", "2", "--shard_index", "2"])
    assert not (tmp_path / "bad.json").exists()


def test_packed_batches_keep_batch_size_and_fit_the_positions_after_the_context(omnifusion):
    model, _ = omnifusion
    limit = model.config.get_text_config().max_position_embeddings
    candidate_ids = [[1] * length for length in (3, 8, 1, 5, 5, 2, 9, 4)]
    assert visdial_scoring._packed_batches(model, 10, candidate_ids, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    batches = visdial_scoring._packed_batches(model, limit - 12, candidate_ids, 50)
    assert [row for batch in batches for row in batch] == list(range(8))
    for batch in batches:
        assert sum(len(candidate_ids[row]) - 1 for row in batch) <= 12
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7]]  # 2+7+0, 4+4+1, 8+3 tokens run


def test_candidate_trie_shares_prefixes_and_keeps_each_candidates_path():
    groups = [[5, 6, 7], [5, 6], [5, 6, 7], [5], [5, 8, 9, 1], [4, 6]]
    tokens, parents, depths, paths = visdial_scoring._candidate_trie(groups)
    # one node per distinct prefix that predicts a next token: 5, 5-6, 5-8, 5-8-9, 4
    assert tokens == [5, 6, 8, 9, 4]
    assert parents == [-1, 0, 0, 2, -1]
    assert depths == [0, 1, 1, 2, 0]
    # the duplicate shares its twin's path, the prefix candidate [5, 6] and the one-token [5] use the others' nodes
    assert paths == [[0, 1], [0], [0, 1], [], [0, 2, 3], [4]]
    tokens, parents, depths, paths = visdial_scoring._candidate_trie(groups, share_prefixes=False)
    assert tokens == [5, 6, 5, 5, 6, 5, 8, 9, 4]  # every candidate's tokens but its last, on its own
    assert parents == [-1, 0, -1, -1, 3, -1, 5, 6, -1]
    assert paths == [[0, 1], [2], [3, 4], [], [5, 6, 7], [8]]


def test_packed_mask_shows_the_context_and_each_nodes_own_prefix_only():
    parents = torch.tensor([-1, 0, 0, 2, -1])  # the trie above
    mask = visdial_scoring._packed_mask(parents, 2, cached_len=3, new_len=2, dtype=torch.float32)
    visible = mask == 0
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    expected = torch.tensor(
        [
            # cached | new context | nodes 0..4
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # new context token 0: causal
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # new context token 1
            [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # node 0 (root)
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # node 1: itself and node 0
            [1, 1, 1, 1, 1, 1, 0, 1, 0, 0],  # node 2: itself and node 0, not its sibling
            [1, 1, 1, 1, 1, 1, 0, 1, 1, 0],  # node 3: nodes 0, 2 and itself
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 1],  # node 4 (another root)
        ],
        dtype=torch.bool,
    )
    assert torch.equal(visible, expected)
    only_nodes = visdial_scoring._packed_mask(parents, 2, cached_len=3, new_len=0, dtype=torch.float32)
    assert torch.equal(only_nodes == 0, expected[2:, [0, 1, 2, 5, 6, 7, 8, 9]])


# Candidates with a common start, prefixes of each other, duplicates and one-token ones.
SHARING_CANDIDATES = [
    "yes", "yes", "yes it is", "yes it is", "yes it is red", "yes it is a red one", "no", "no it is not",
    "no it is blue", "it is", "it is blue", "i can not tell", "i can", "2", "two circles and one square", "two",
]  # fmt: skip


def _lm_head_rows(model):
    """A hook recording the rows of every LM head call (`rows`, `remove`)."""
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: rows.append(args[0].shape[:-1].numel())
    )
    return rows, handle.remove


@pytest.mark.parametrize("kind, score", [("omnifusion", "sum"), ("omnifusion", "mean"), ("llava", "sum")])
def test_prefix_sharing_equals_unshared_packing_and_naive(kind, score, request, visdial_sample):
    model, processor = request.getfixturevalue(kind)
    rounds = _real_dialog_rounds(processor, visdial_sample, dialog_index=3, num_candidates=20)[:2]
    extra = visdial_scoring.tokenize_candidates(processor.tokenizer, SHARING_CANDIDATES)
    starts = {tuple(ids[:1]) for ids in extra}
    assert len(starts) < len(extra) and any(len(ids) == 1 for ids in extra)
    assert any(a != b and a == b[: len(a)] for a in extra for b in extra)  # a candidate that is another's prefix
    assert extra[0] == extra[1] and extra[2] == extra[3]  # duplicates

    scorers = {
        (share, batch_size): visdial_scoring.DialogScorer(model, batch_size, score, share_prefixes=share)
        for share in (True, False)
        for batch_size in (3, 50)
    }
    for round_index, (inputs, options) in enumerate(rounds):
        candidate_ids = extra + options
        naive = visdial_scoring.score_candidates_naive(model, inputs, candidate_ids, batch_size=16, score=score)
        distinct = [row for row, ids in enumerate(candidate_ids) if ids not in candidate_ids[:row]]
        lm_head_rows = {}
        results = {}
        for (share, batch_size), scorer in scorers.items():
            rows, remove = _lm_head_rows(model)
            try:
                results[share, batch_size] = scorer.score_round(inputs, candidate_ids)
            finally:
                remove()
            lm_head_rows[share, batch_size] = sum(rows)
            # duplicates tie, and naive's round-off may order a tie either way: rankings compared on distinct ones
            _assert_same_scores_and_ranking(results[share, batch_size][distinct], naive[distinct])
            torch.testing.assert_close(results[share, batch_size], naive, rtol=1e-6, atol=1e-4)
            assert scorer.cache.get_seq_length() == inputs["input_ids"].shape[1]  # the nodes are not kept
            # the LM head runs once per trie node (+1: the context's last token) and nowhere else
            context_len = inputs["input_ids"].shape[1]
            batches = visdial_scoring._packed_batches(model, context_len, candidate_ids, batch_size, share)
            assert all(len(rows) <= batch_size for rows in batches)
            tries = [visdial_scoring._candidate_trie([candidate_ids[r] for r in rows], share) for rows in batches]
            nodes = sum(len(tokens) for tokens, *_ in tries)
            assert lm_head_rows[share, batch_size] == nodes + 1
        torch.testing.assert_close(results[True, 50], results[False, 50], rtol=1e-6, atol=1e-4)
        assert results[True, 50][0] == results[True, 50][1]  # duplicates: one path, one score
        assert results[True, 50][2] == results[True, 50][3]
        assert lm_head_rows[True, 50] < lm_head_rows[False, 50] - 10


def test_later_rounds_run_the_new_context_tokens_in_the_first_candidate_forward(omnifusion, visdial_sample):
    model, processor = omnifusion
    rounds = _real_dialog_rounds(processor, visdial_sample, dialog_index=2, num_candidates=12)[:3]
    scorer = visdial_scoring.DialogScorer(model, batch_size=5, score="sum")
    for round_index, (inputs, candidate_ids) in enumerate(rounds):
        rows, remove = _lm_head_rows(model)
        try:
            cached = scorer.score_round(inputs, candidate_ids)
        finally:
            remove()
        naive = visdial_scoring.score_candidates_naive(model, inputs, candidate_ids, score="sum")
        _assert_same_scores_and_ranking(cached, naive)
        batches = visdial_scoring._packed_batches(model, inputs["input_ids"].shape[1], candidate_ids, 5, True)
        # round 1 encodes the image in a forward of its own; later rounds need no forward besides the batches'
        assert len(rows) == len(batches) + (round_index == 0)
        assert scorer.cache.get_seq_length() == inputs["input_ids"].shape[1]


def test_prefix_shared_batches_fit_max_position_embeddings(omnifusion, visdial_sample):
    model, processor = omnifusion
    rounds = _real_dialog_rounds(processor, visdial_sample, dialog_index=4, num_candidates=1)[:2]
    text_config = model.config.get_text_config()
    limit = text_config.max_position_embeddings
    candidate_ids = visdial_scoring.tokenize_candidates(processor.tokenizer, SHARING_CANDIDATES)
    candidate_ids = [ids for ids in candidate_ids if len(ids) <= 5]  # their positions fit the limit set below
    assert max(len(ids) for ids in candidate_ids) > 2
    text_config.max_position_embeddings = rounds[-1][0]["input_ids"].shape[1] + 4
    try:
        scorer = visdial_scoring.DialogScorer(model, batch_size=50, score="sum")
        for round_index, (inputs, _) in enumerate(rounds):
            context_len = inputs["input_ids"].shape[1]
            batches = visdial_scoring._packed_batches(model, context_len, candidate_ids, 50, share_prefixes=True)
            room = text_config.max_position_embeddings - context_len
            nodes = [len(visdial_scoring._candidate_trie([candidate_ids[r] for r in rows])[0]) for rows in batches]
            assert max(nodes) <= room
            if round_index == len(rounds) - 1:
                assert len(batches) > 1  # cut by the positions left after the context, not by batch_size
            cached = scorer.score_round(inputs, candidate_ids)
            naive = visdial_scoring.score_candidates_naive(model, inputs, candidate_ids, score="sum")
            _assert_same_scores_and_ranking(cached, naive)
    finally:
        text_config.max_position_embeddings = limit


def test_prefix_shared_batches_count_only_the_new_prefixes(omnifusion):
    model, _ = omnifusion
    limit = model.config.get_text_config().max_position_embeddings
    candidate_ids = [[1, 2, 3], [7, 8], [1, 2, 4], [1, 5], [7], [1, 2, 3, 9, 9]]
    # taken in token order: [1,2,3] [1,2,3,9,9] [1,2,4] [1,5] [7] [7,8], adding the nodes 1 and 1-2, then 1-2-3 and
    # 1-2-3-9, then none, none, none (a one-token candidate), then 7: 5 nodes for 10 tokens unshared
    assert visdial_scoring._packed_batches(model, 10, candidate_ids, 4, True) == [[0, 5, 2, 3], [4, 1]]
    assert visdial_scoring._packed_batches(model, limit - 5, candidate_ids, 50, True) == [[0, 5, 2, 3, 4, 1]]
    assert visdial_scoring._packed_batches(model, limit - 4, candidate_ids, 50, True) == [[0, 5, 2, 3, 4], [1]]
    # without sharing: in order, every token but the last
    assert visdial_scoring._packed_batches(model, limit - 5, candidate_ids, 50) == [[0, 1, 2], [3, 4, 5]]


def _load_script(path: Path):
    """A script of examples/ imported as a module from its file (examples are programs, not an installed package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_scores_the_sample_answer_options_with_mistral_ids(capsys):
    """Benchmark scores the real answer options of the sample with the mistral tokenizer."""
    benchmark_visdial = _load_script(BENCHMARK_VISDIAL)

    data = json.loads(benchmark_visdial.VISDIAL_SAMPLE.read_text())["data"]
    dialog = data["dialogs"][1]
    args = benchmark_visdial.BenchmarkArguments(rounds=3, candidates=100, dialog_index=1)
    config = benchmark_visdial.build_model().config
    rounds = benchmark_visdial.build_rounds(config, args, benchmark_visdial.np.random.default_rng(0))
    tokenizer = benchmark_visdial.mistral_tokenizer()
    assert tokenizer.vocab_size() == config.text_config.vocab_size == 32000
    for (inputs, candidate_ids), visdial_round in zip(rounds, dialog["dialog"]):
        options = [data["answers"][index] for index in visdial_round["answer_options"]]
        assert [tokenizer.decode(ids) for ids in candidate_ids] == options
        question = visdial_scoring.visdial_round_question(data["questions"][visdial_round["question"]])
        assert tokenizer.decode(inputs["input_ids"][0, -len(tokenizer.encode(question)) - 1 : -1].tolist()) == question
    # real options share prefixes, so sharing packs fewer positions
    model = benchmark_visdial.build_model()
    assert benchmark_visdial.packed_positions(model, rounds, 50, True) < 0.9 * benchmark_visdial.packed_positions(
        model, rounds, 50, False
    )
    with pytest.raises(ValueError, match=r"--dialog_index must be in 0\.\.96"):
        benchmark_visdial.build_rounds(config, benchmark_visdial.BenchmarkArguments(dialog_index=97), None)
    with pytest.raises(ValueError, match=r"--candidates 101: the VisDial rounds have 100 answer options"):
        benchmark_visdial.build_rounds(config, benchmark_visdial.BenchmarkArguments(candidates=101), None)
    with pytest.raises(FileNotFoundError, match="--visdial_json"):
        benchmark_visdial.build_rounds(config, benchmark_visdial.BenchmarkArguments(visdial_json="missing.json"), None)
