"""The encoder-mixing adapters (report variants 2 and 3) against references written from the report, and the config
checks for several encoders."""

import pytest
import torch
import torch.nn.functional as F

from modeling_omnifusion import OmniFusionConfig
from modeling_omnifusion.adapters_omnifusion import OmniFusionMixConcatAdapter, OmniFusionMixSumAdapter
from modeling_omnifusion.testing.tiny import make_image, make_model_and_processor, make_processor, vision_config


def encode(processor, images):
    return processor(images=images, text="<image>" * len(images) + "What?", return_tensors="pt")


def tower_hidden_states(model, pixel_values):
    """Every hidden state of every encoder, run directly on its own pixels (patch tokens only)."""
    out = []
    for index, (tower, vision) in enumerate(zip(model.model.vision_tower, model.config.vision_configs)):
        pixels = pixel_values[:, index, :, : vision.image_size, : vision.image_size]
        out.append([h[:, 1:] for h in tower(pixels, output_hidden_states=True).hidden_states])
    return out


def reference_projection_and_summation(adapter, hidden_states):
    """Report variant 3 as written: per layer LayerNorm then its own Linear, a trainable linear combination across
    layers per encoder, the encoders' sequences summed with the shorter right-padded with zero vectors, GELU, Linear."""
    per_encoder = []
    for mix, layers in zip(adapter.encoder_mixes, hidden_states):
        combined = torch.zeros(())
        for index, states in enumerate(layers):
            norm, linear = mix.layer_norms[index], mix.layer_projections[index]
            normed = F.layer_norm(states, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            combined = combined + mix.layer_weights[index] * (normed @ linear.weight.T + linear.bias)
        per_encoder.append(combined)
    length = max(sequence.shape[1] for sequence in per_encoder)
    total = torch.zeros(per_encoder[0].shape[0], length, per_encoder[0].shape[2])
    for sequence in per_encoder:
        total[:, : sequence.shape[1]] += sequence
    return F.gelu(total) @ adapter.linear.weight.T + adapter.linear.bias


@pytest.fixture(scope="module")
def mix_sum():
    return make_model_and_processor(vision=["clip", "dinov2"], adapter_type="mix_sum", vision_sizes=[32, 24])


def test_mix_sum_equals_the_reports_projection_and_summation(mix_sum):
    model, processor = mix_sum
    adapter = model.model.adapter
    assert isinstance(adapter, OmniFusionMixSumAdapter)
    with torch.no_grad():  # non-uniform coefficients, so a mean over layers would not pass
        for mix in adapter.encoder_mixes:
            mix.layer_weights.copy_(torch.randn_like(mix.layer_weights))
        pixel_values = encode(processor, [make_image(0), make_image(1, size=40)])["pixel_values"]
        ours = model.get_image_features(pixel_values).pooler_output
        reference = reference_projection_and_summation(adapter, tower_hidden_states(model, pixel_values))
    # CLIP 32 px gives 16 patches, DINOv2 24 px gives 9, zero-padded to 16.
    assert ours.shape == (2, 16, model.config.text_config.hidden_size) == reference.shape
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_mix_sum_has_norm_linear_and_coefficient_per_encoder_layer(mix_sum):
    """Mix sum has a norm a linear and a coefficient per hidden state of each encoder."""
    model, _ = mix_sum
    for mix, vision in zip(model.model.adapter.encoder_mixes, model.config.vision_configs):
        layers = vision.num_hidden_layers + 1  # the embedding output and every layer
        assert len(mix.layer_norms) == len(mix.layer_projections) == mix.layer_weights.numel() == layers
        assert mix.layer_projections[0].weight.shape == (model.config.mix_adapter_width, vision.hidden_size)
    assert model.model.adapter.linear.weight.shape == (
        model.config.text_config.hidden_size,
        model.config.mix_adapter_width,
    )


def test_mix_concat_equals_the_reports_embedding_concatenation():
    model, processor = make_model_and_processor(
        vision=["clip", "dinov2"], adapter_type="mix_concat", vision_sizes=[32, 24], adapter_dropout=0.0
    )
    adapter = model.model.adapter
    assert isinstance(adapter, OmniFusionMixConcatAdapter)
    config = model.config
    width = config.mix_adapter_width
    layer = torch.nn.TransformerEncoderLayer(
        width, config.adapter_num_heads, config.adapter_ffn_dim, dropout=0.0, batch_first=True, norm_first=False
    ).eval()
    layer.load_state_dict(adapter.transformer_layer.state_dict())
    with torch.no_grad():
        pixel_values = encode(processor, [make_image(2)])["pixel_values"]
        penultimate = [layers[-2] for layers in tower_hidden_states(model, pixel_values)]
        projected = [F.linear(h, p.weight, p.bias) for h, p in zip(penultimate, adapter.encoder_projections)]
        reference = adapter.linear(layer(torch.cat(projected, dim=1)))
        ours = model.get_image_features(pixel_values).pooler_output
    assert config.num_image_tokens == 16 + 9 == ours.shape[1]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_image_positions_per_view_are_computed_from_every_encoder():
    processor = make_processor()
    encoders = [vision_config("clip"), vision_config("dinov2", image_size=24)]
    common = dict(text_config={"model_type": "mistral", "hidden_size": 64}, **processor.special_token_ids)
    assert OmniFusionConfig(vision_config=encoders, adapter_type="mix_sum", **common).num_image_tokens == 16
    assert OmniFusionConfig(vision_config=encoders, adapter_type="mix_concat", **common).num_image_tokens == 25
    full = OmniFusionConfig(
        vision_config=encoders, adapter_type="mix_concat", vision_feature_select_strategy="full", **common
    )
    assert full.num_image_tokens == 17 + 10


def test_vision_config_list_is_stored_as_first_plus_others(tmp_path, mix_sum):
    """A list of vision configs is stored as the first plus the others and round trips."""
    model, _ = mix_sum
    config = model.config
    assert config.vision_config.model_type == "clip_vision_model"
    assert [v.model_type for v in config.additional_vision_configs] == ["dinov2"]
    assert [v.model_type for v in config.vision_configs] == ["clip_vision_model", "dinov2"]
    config.save_pretrained(tmp_path)
    loaded = OmniFusionConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.additional_vision_configs[0].image_size == 24
    assert isinstance(model.model.vision_tower, torch.nn.ModuleList) and len(model.model.vision_tower) == 2


def test_single_encoder_config_and_weights_keep_the_released_layout():
    model, _ = make_model_and_processor()
    assert model.config.additional_vision_configs is None and len(model.config.vision_configs) == 1
    names = [name for name, _ in model.named_parameters()]
    assert "model.vision_tower.embeddings.patch_embedding.weight" in names
    assert not any(name.startswith("model.vision_tower.0.") for name in names)


def test_an_old_config_without_the_new_fields_loads_unchanged(tmp_path):
    model, _ = make_model_and_processor()
    saved = model.config.to_dict()
    for field in ("additional_vision_configs", "image_grid_pinpoints", "image_global_view_position"):
        saved.pop(field)
    loaded = OmniFusionConfig.from_dict(saved)
    assert loaded.vision_configs[0].to_dict() == model.config.vision_config.to_dict()
    assert loaded.num_image_tokens == 16 and loaded.image_grid_pinpoints is None


def test_several_encoders_with_single_encoder_adapter_is_refused():
    """Several encoders with a single encoder adapter is a value error naming both."""
    encoders = [vision_config("clip"), vision_config("dinov2", image_size=24)]
    with pytest.raises(
        ValueError, match=r"vision_config\[0\] \(clip_vision_model, 32px\).*vision_config\[1\] \(dinov2, 24px\)"
    ):
        OmniFusionConfig(vision_config=encoders, adapter_type="transformer")


def test_tiles_over_encoders_of_different_sizes_are_a_value_error_naming_both():
    encoders = [vision_config("clip"), vision_config("dinov2", image_size=24)]
    with pytest.raises(ValueError, match=r"tile size.*clip_vision_model, 32px.*dinov2, 24px"):
        OmniFusionConfig(vision_config=encoders, adapter_type="mix_sum", image_grid_pinpoints=[[64, 64]])


@pytest.mark.parametrize("pinpoints", [[[64, 40]], [], [[64]], [[64, 0]]])
def test_bad_grid_pinpoints_are_value_errors(pinpoints):
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        OmniFusionConfig(vision_config=vision_config("clip"), image_grid_pinpoints=pinpoints)


def test_an_adapter_returning_another_count_than_the_config_is_a_value_error(mix_sum):
    model, processor = mix_sum
    pixel_values = encode(processor, [make_image(0)])["pixel_values"]
    original = model.model.adapter.forward
    model.model.adapter.forward = lambda features: original(features)[:, :-1]
    try:
        with pytest.raises(ValueError, match="15 positions per view .* num_image_tokens=16"):
            model.get_image_features(pixel_values)
    finally:
        model.model.adapter.forward = original


def test_pixel_values_not_laid_out_for_several_encoders_are_a_value_error(mix_sum):
    model, _ = mix_sum
    with pytest.raises(ValueError, match=r"pixel_values for 2 vision encoders must be \[num_views, 2, 3"):
        model.get_image_features(torch.zeros(1, 3, 32, 32))
