"""Mixed encoders and tiles through the generation and training contracts, and the processor's tile layout."""

import numpy as np
import pytest
import torch
from transformers.image_processing_utils import select_best_resolution

from modeling_omnifusion.processing.processing_omnifusion import num_tile_views, tile_views
from modeling_omnifusion.testing.tiny import chat, make_image, make_model_and_processor

PINPOINTS = [[64, 32], [32, 64], [64, 64]]
VARIANTS = {
    "mix_sum": dict(vision=["clip", "dinov2"], adapter_type="mix_sum", vision_sizes=[32, 24]),
    "mix_concat": dict(vision=["clip", "dinov2"], adapter_type="mix_concat", vision_sizes=[32, 24]),
    "tiles": dict(image_grid_pinpoints=PINPOINTS),
    "mix_sum+tiles": dict(vision=["clip", "dinov2"], adapter_type="mix_sum", image_grid_pinpoints=PINPOINTS),
}


def wide_image(seed: int):
    return make_image(seed, size=70).resize((70, 30))


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return make_model_and_processor(adapter_dropout=0.0, **VARIANTS[request.param])


def encode(processor, messages_batch):
    return processor.apply_chat_template(
        messages_batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def towers(model):
    tower = model.model.vision_tower
    return list(tower) if isinstance(tower, torch.nn.ModuleList) else [tower]


def test_cached_and_uncached_greedy_generation_are_equal(variant):
    model, processor = variant
    inputs = encode(processor, chat("What colour?", images=[make_image(3, size=45)]))
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_left_padded_batch_mixing_image_sizes_equals_rows_one_by_one(variant):
    model, processor = variant
    chats = [
        chat("What colour is it?", images=[make_image(4, size=45)]),
        [{"role": "user", "content": "Text only, and a longer question than the others."}],
        chat("Two?", images=[wide_image(5), make_image(6)]),
    ]
    batch = encode(processor, chats)
    assert (batch["attention_mask"] == 0).any()
    batched = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for row, messages in enumerate(chats):
        single = encode(processor, messages)
        alone = model.generate(**single, max_new_tokens=6, do_sample=False)[0, single["input_ids"].shape[1] :]
        # a row that ends with EOS alone is padded in the batch until every row is done
        assert torch.equal(batched[row, : len(alone)], alone), f"row {row}"
        assert (batched[row, len(alone) :] == model.generation_config.pad_token_id).all(), f"row {row}"


def test_beam_search_rows_equal_rows_alone_and_keep_image_order(variant):
    model, processor = variant
    chats = [chat("Which first?", images=[make_image(7, size=45), wide_image(8)]), chat("One.", images=[make_image(9)])]
    batch = encode(processor, chats)
    kwargs = dict(
        max_new_tokens=5,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    batched = model.generate(**batch, **kwargs)
    for row, messages in enumerate(chats):
        single = encode(processor, messages)
        alone = model.generate(**single, **kwargs)
        new = alone.sequences[:, single["input_ids"].shape[1] :]
        assert torch.equal(batched.sequences[2 * row : 2 * row + 2, batch["input_ids"].shape[1] :], new), f"row {row}"
        torch.testing.assert_close(batched.sequences_scores[2 * row : 2 * row + 2], alone.sequences_scores)
    swapped = encode(processor, [chat("Which first?", images=[wide_image(8), make_image(7, size=45)])])
    assert not torch.allclose(model.generate(**swapped, **kwargs).sequences_scores, batched.sequences_scores[:2])


@pytest.mark.parametrize("options", [dict(do_sample=False), dict(num_beams=3)], ids=["greedy", "beam"])
def test_every_encoder_runs_once_per_generate_call(variant, options):
    model, processor = variant
    batch = encode(
        processor, [chat("A?", images=[make_image(0, size=45), wide_image(1)]), chat("B?", images=[make_image(2)])]
    )
    calls = {index: [] for index in range(len(towers(model)))}
    handles = [
        tower.register_forward_hook(lambda *args, i=i: calls[i].append(args[1][0].shape[0]))
        for i, tower in enumerate(towers(model))
    ]
    try:
        model.generate(**batch, max_new_tokens=4, **options)
    finally:
        for handle in handles:
            handle.remove()
    num_views = batch["pixel_values"].shape[0]
    assert all(sizes == [num_views] for sizes in calls.values()), calls


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_gradients_reach_exactly_the_parameters_each_stage_trains(stage):
    model, processor = make_model_and_processor(**VARIANTS["mix_sum+tiles"])
    model.train()
    model.requires_grad_(False)
    trained_modules = [model.model.adapter, model.get_input_embeddings().special_embeddings]
    if stage == "stage2":
        trained_modules += [model.model.language_model, model.lm_head]
    for module in trained_modules:
        module.requires_grad_(True)
    messages = chat("What?", images=[make_image(0, size=45)]) + [{"role": "assistant", "content": "A circle."}]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] >= model.config.text_config.vocab_size, -100)
    model(**inputs, labels=labels).loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == expected
    assert not any(name.startswith("model.vision_tower") for name in trained)
    for index, vision in enumerate(model.config.vision_configs):
        for layer in range(vision.num_hidden_layers + 1):
            assert f"model.adapter.encoder_mixes.{index}.layer_projections.{layer}.weight" in trained
            assert f"model.adapter.encoder_mixes.{index}.layer_norms.{layer}.weight" in trained
        assert f"model.adapter.encoder_mixes.{index}.layer_weights" in trained
    mix = model.model.adapter.encoder_mixes[0]
    assert (mix.layer_weights.grad != 0).all()


def test_best_fit_resolution_follows_llava_next():
    """transformers' `select_best_resolution` takes `(height, width)` and `[height, width]` pinpoints."""
    assert select_best_resolution((30, 70), PINPOINTS) == (32, 64)
    assert select_best_resolution((70, 30), PINPOINTS) == (64, 32)
    assert select_best_resolution((45, 45), PINPOINTS) == (64, 64)
    # equal kept pixels: the smaller canvas wastes less; equal canvases: the first one
    assert select_best_resolution((20, 20), [[64, 64], [32, 32]]) == (32, 32)
    assert select_best_resolution((100, 100), [[64, 32], [32, 64]]) == (64, 32)
    # so thin that no canvas keeps a pixel: the least padding
    assert select_best_resolution((1, 5000), [[32, 32], [16, 16]]) == (16, 16)


def test_tile_view_count_is_the_canvas_tiles_plus_the_global_view():
    assert num_tile_views(30, 70, PINPOINTS, 32) == 3
    assert num_tile_views(70, 30, PINPOINTS, 32) == 3
    assert num_tile_views(45, 45, PINPOINTS, 32) == 5


def test_tiles_are_the_canvas_in_row_major_order_with_the_global_view_first_or_last():
    image = make_image(11, size=64)
    first = tile_views(image, [[64, 64]], 32, "first")
    last = tile_views(image, [[64, 64]], 32, "last")
    array = np.asarray(image)
    quadrants = [array[:32, :32], array[:32, 32:], array[32:, :32], array[32:, 32:]]
    assert len(first) == 5 and all(np.array_equal(np.asarray(t), q) for t, q in zip(first[1:], quadrants))
    assert np.array_equal(np.asarray(first[0]), np.asarray(image.resize((32, 32), 3)))
    assert [np.asarray(v).tobytes() for v in last] == [np.asarray(v).tobytes() for v in first[1:] + first[:1]]


def test_wide_image_is_resized_keeping_its_aspect_and_padded_black():
    image = make_image(12, size=70).resize((70, 30))
    views = tile_views(image, PINPOINTS, 32, "first")
    assert len(views) == 3  # 1x2 tiles and the global view
    canvas = np.concatenate([np.asarray(views[1]), np.asarray(views[2])], axis=1)
    assert canvas.shape == (32, 64, 3)
    # 70x30 scaled by 64/70 is 64x28: two black rows above and below
    assert (canvas[:2] == 0).all() and (canvas[-2:] == 0).all() and canvas[2:-2].any()


def test_processor_counts_positions_per_image_from_its_size(variant):
    model, processor = variant
    images = [make_image(0, size=45), wide_image(1), make_image(2)]
    inputs = processor(images=images, text=["<image>A", "<image><image>B"], return_tensors="pt")
    ids = inputs["input_ids"]
    starts = (ids == processor.image_start_token_id).nonzero()[:, 1]
    ends = (ids == processor.image_end_token_id).nonzero()[:, 1]
    block_lengths = (ends - starts + 1).tolist()
    sizes = [[image.height, image.width] for image in images]
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes)
    assert [length - 2 for length in block_lengths] == expected["num_image_tokens"]  # markers aside
    views = expected["num_image_patches"]
    assert inputs["pixel_values"].shape[0] == sum(views)
    per_view = model.config.num_image_tokens
    assert [length - 2 for length in block_lengths] == [count * per_view for count in views]
    if model.config.image_grid_pinpoints:
        assert views == [5, 3, 3]  # a 32 px square fits 1x2 tiles with the least padding
    else:
        assert views == [1, 1, 1]


def test_each_encoder_gets_its_own_normalisation():
    model, processor = make_model_and_processor(**VARIANTS["mix_sum"])
    image = make_image(13, size=40)
    pixel_values = processor(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 2, 3, 32, 32)
    clip = torch.as_tensor(processor.image_processor(image, return_tensors="np")["pixel_values"])
    dinov2 = torch.as_tensor(processor.extra_encoder_preprocessors[0](image, return_tensors="np")["pixel_values"])
    assert dinov2.shape[-2:] == (24, 24)
    assert torch.equal(pixel_values[:, 0], clip) and torch.equal(pixel_values[:, 1, :, :24, :24], dinov2)
    assert (pixel_values[:, 1, :, 24:] == 0).all() and not torch.allclose(pixel_values[:, 0, :, :24, :24], dinov2)


@torch.no_grad()
def test_image_features_split_by_num_image_patches_give_each_image_its_own_block(variant):
    """vLLM's Transformers backend encodes the views of several images in one call and splits `pooler_output` into
    images by the processor's `num_image_patches`; each part must be that image's features alone."""
    model, processor = variant
    images = [make_image(4, size=64), wide_image(5), make_image(6)]
    pixel_values = processor.prepare_images(images, return_tensors="pt")["pixel_values"]
    counts = processor._get_num_multimodal_tokens(image_sizes=[(i.height, i.width) for i in images])
    features = model.get_image_features(pixel_values).pooler_output
    assert isinstance(features, torch.Tensor) and len(features) == sum(counts["num_image_patches"])
    for image, part, block in zip(images, features.split(counts["num_image_patches"]), counts["num_image_tokens"]):
        assert part.flatten(0, 1).shape[0] == block  # the block's <image> positions
        alone = model.get_image_features(processor.prepare_images([image], return_tensors="pt")["pixel_values"])
        torch.testing.assert_close(part, alone.pooler_output, atol=1e-5, rtol=1e-5)
