"""OmniFusionForCausalLM: image merge, input-only markers, generate(), gradients, attention and dtype options."""

import copy

import pytest
import torch

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM
from modeling_omnifusion.adapters_omnifusion import OmniFusionMLPAdapter, OmniFusionTransformerAdapter
from modeling_omnifusion.modeling_omnifusion import OmniFusionTokenEmbedding
from modeling_omnifusion.testing.tiny import chat, make_image, make_model_and_processor


@pytest.fixture(scope="module")
def tiny():
    return make_model_and_processor(adapter_dropout=0.0)


def encode(processor, messages_batch):
    return processor.apply_chat_template(
        messages_batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def count_tower_calls(model):
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_default_config_is_the_released_architecture():
    config = OmniFusionConfig()
    assert config.vision_config.model_type == "clip_vision_model" and config.vision_config.image_size == 336
    assert config.text_config.model_type == "mistral"
    assert config.num_image_tokens == 576
    assert (config.adapter_type, config.adapter_num_heads, config.adapter_ffn_dim) == ("transformer", 4, 2048)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")


def test_config_round_trips_through_json(tmp_path, tiny):
    model, _ = tiny
    model.config.save_pretrained(tmp_path)
    loaded = OmniFusionConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == model.config.to_dict()


def test_duplicate_special_ids_are_rejected():
    with pytest.raises(ValueError, match="distinct"):
        OmniFusionConfig(image_token_id=5, user_token_id=5)


@pytest.mark.parametrize(
    "vision, strategy, expected_tokens",
    [
        ("clip", "default", 16),
        ("clip", "full", 17),
        ("siglip", "default", 16),
        ("dinov2", "default", 16),
        ("dinov2", "full", 17),
    ],
)
def test_vision_towers_and_feature_selection(vision, strategy, expected_tokens):
    model, processor = make_model_and_processor(vision=vision, vision_feature_select_strategy=strategy)
    assert model.config.num_image_tokens == expected_tokens == processor.num_image_tokens
    inputs = encode(processor, chat("What?", images=[make_image(0)]))
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    assert len(features) == 1 and features[0].shape == (expected_tokens, model.config.text_config.hidden_size)
    assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.parametrize("adapter_type", ["transformer", "mlp", "linear"])
def test_adapter_types(adapter_type):
    model, processor = make_model_and_processor(adapter_type=adapter_type)
    names = {name for name, _ in model.model.adapter.named_parameters()}
    expected = {
        "transformer": {
            "transformer_layer.self_attn.in_proj_weight",
            "transformer_layer.linear1.weight",
            "linear.weight",
        },
        "mlp": {"linear_1.weight", "linear_2.weight"},
        "linear": {"linear.weight", "linear.bias"},
    }[adapter_type]
    assert expected <= names
    inputs = encode(processor, chat("What?", images=[make_image(0)]))
    assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("training", [False, True])
def test_transformer_adapter_matches_torch_post_norm_encoder_layer(training):
    model, _ = make_model_and_processor(adapter_dropout=0.0 if training else 0.1)
    ours = model.model.adapter.transformer_layer.train(training)
    config = model.config
    reference = torch.nn.TransformerEncoderLayer(
        d_model=config.vision_config.hidden_size,
        nhead=config.adapter_num_heads,
        dim_feedforward=config.adapter_ffn_dim,
        dropout=config.adapter_dropout,
        batch_first=True,
        norm_first=False,
    ).train(training)
    reference.load_state_dict(ours.state_dict(), strict=True)
    features = torch.randn(3, 16, config.vision_config.hidden_size)
    torch.testing.assert_close(ours(features), reference(features), atol=1e-5, rtol=1e-5)
    assert isinstance(model.model.adapter, OmniFusionTransformerAdapter)
    assert isinstance(make_model_and_processor(adapter_type="mlp")[0].model.adapter, OmniFusionMLPAdapter)


def test_markers_are_input_only(tiny):
    model, processor = tiny
    vocab = model.config.text_config.vocab_size
    assert model.lm_head.out_features == vocab
    assert all(token_id >= vocab for token_id in processor.special_token_ids.values())
    inputs = encode(processor, chat("What?", images=[make_image(0)]))
    output = model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=0, temperature=5.0)
    assert (output[:, inputs["input_ids"].shape[1] :] < vocab).all()


def test_input_embeddings_embed_every_processor_id(tiny):
    model, processor = tiny
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, OmniFusionTokenEmbedding)
    ids = torch.tensor([list(processor.special_token_ids.values()) + [0, 5, 7]])
    out = embeddings(ids)
    table = embeddings.special_embeddings.weight
    assert torch.equal(out[0, :5], table[:5])
    assert torch.equal(out[0, 5:], embeddings.weight[[0, 5, 7]])
    assert (
        embeddings.special_embeddings.num_embeddings == 5
        and embeddings.num_embeddings == model.config.text_config.vocab_size
    )


def test_inputs_embeds_path_equals_input_ids_path(tiny):
    model, processor = tiny
    inputs = encode(processor, chat("What colour?", images=[make_image(0)]))
    with torch.no_grad():
        by_ids = model(**inputs).logits
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        by_embeds = model(
            inputs_embeds=embeds, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"]
        ).logits
    torch.testing.assert_close(by_ids, by_embeds)


def test_image_placeholder_count_mismatch_is_a_value_error(tiny):
    model, processor = tiny
    inputs = encode(processor, chat("What?", images=[make_image(0)]))
    two_images = torch.cat([inputs["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="16 placeholder positions .* 32 image feature vectors"):
        model(input_ids=inputs["input_ids"], pixel_values=two_images)


def test_images_change_the_output_and_are_used_in_order(tiny):
    model, processor = tiny
    images = [make_image(1), make_image(2)]
    with torch.no_grad():
        forward = encode(processor, chat("Compare.", images=images))
        swapped = encode(processor, chat("Compare.", images=images[::-1]))
        assert not torch.allclose(model(**forward).logits, model(**swapped).logits)


def test_cached_and_uncached_greedy_generation_are_equal(tiny):
    model, processor = tiny
    inputs = encode(processor, chat("What colour?", images=[make_image(3)]))
    cached = model.generate(**inputs, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_left_padded_batch_equals_rows_one_by_one(tiny):
    model, processor = tiny
    chats = [
        chat("What colour is it?", images=[make_image(4)]),
        [{"role": "user", "content": "Text only, and a longer question than the others."}],
        chat("Two?", images=[make_image(5), make_image(6)]),
    ]
    batch = encode(processor, chats)
    assert (batch["attention_mask"] == 0).any()
    batched = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for row, messages in enumerate(chats):
        single = encode(processor, messages)
        alone = model.generate(**single, max_new_tokens=6, do_sample=False)[:, single["input_ids"].shape[1] :]
        assert torch.equal(batched[row], alone[0]), f"row {row}"


def test_beam_search_keeps_the_order_of_two_images_in_one_sample(tiny):
    model, processor = tiny
    chats = [chat("Which first?", images=[make_image(7), make_image(8)]), chat("One.", images=[make_image(9)])]
    batch = encode(processor, chats)
    kwargs = dict(
        max_new_tokens=6,
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
    swapped = encode(processor, [chat("Which first?", images=[make_image(8), make_image(7)])])
    assert not torch.allclose(model.generate(**swapped, **kwargs).sequences_scores, batched.sequences_scores[:2])


@pytest.mark.parametrize(
    "options",
    [dict(do_sample=False), dict(do_sample=True, top_k=5), dict(num_beams=3), dict(do_sample=False, use_cache=False)],
    ids=["greedy", "sampling", "beam", "no-cache"],
)
def test_each_image_is_encoded_exactly_once_per_generate_call(tiny, options):
    model, processor = tiny
    batch = encode(processor, [chat("A?", images=[make_image(0), make_image(1)]), chat("B?", images=[make_image(2)])])
    calls, handle = count_tower_calls(model)
    try:
        model.generate(**batch, max_new_tokens=4, **options)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_gradients_reach_exactly_the_parameters_meant_to_train():
    model, processor = make_model_and_processor()
    model.train()
    model.requires_grad_(False)
    model.model.adapter.requires_grad_(True)
    markers = model.get_input_embeddings().special_embeddings
    markers.requires_grad_(True)
    messages = chat("What?", images=[make_image(0)]) + [{"role": "assistant", "content": "A circle."}]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] >= model.config.text_config.vocab_size, -100)
    model(**inputs, labels=labels).loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == expected
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in trained)
    used_rows = markers.weight.grad.abs().sum(-1) > 0
    # image_start, image_end, user and assistant are in the input; the image placeholder row is always overwritten.
    assert used_rows.tolist() == [False, True, True, True, True]


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model, processor = make_model_and_processor(adapter_dropout=0.0)
        model.train()
        model.model.vision_tower.requires_grad_(False)
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.language_model.gradient_checkpointing
        inputs = encode(processor, chat("What?", images=[make_image(0)]))
        model(**inputs, labels=inputs["input_ids"].clamp(max=model.config.text_config.vocab_size - 1)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_sdpa_and_eager_attention_agree(tiny):
    model, processor = tiny
    inputs = encode(processor, chat("What colour?", images=[make_image(0)]))
    assert model.config.text_config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(**inputs).logits
        model.set_attn_implementation("eager")
        try:
            eager = model(**inputs).logits
        finally:
            model.set_attn_implementation("sdpa")
    torch.testing.assert_close(sdpa, eager, atol=1e-4, rtol=1e-4)


def test_bfloat16_model_accepts_float32_pixels(tiny):
    model, processor = tiny
    inputs = encode(processor, chat("What?", images=[make_image(0)]))
    bf16 = OmniFusionForCausalLM(model.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(model.state_dict())
    assert inputs["pixel_values"].dtype == torch.float32
    with torch.no_grad():
        logits = bf16(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    output = bf16.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_device_map_loading_gives_identical_logits(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    inputs = encode(processor, chat("What?", images=[make_image(0)]))
    offloaded = dict(device_map="auto", max_memory={"cpu": "150KB"}, offload_folder=str(tmp_path / "offload"))
    for options in (dict(device_map="cpu"), offloaded):
        loaded = OmniFusionForCausalLM.from_pretrained(tmp_path, **options).eval()
        if options is offloaded:
            assert "disk" in set(loaded.hf_device_map.values()), loaded.hf_device_map
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_base_model_returns_tuple_with_hidden_states_first(tiny):
    model, processor = tiny
    inputs = encode(processor, chat("What?", images=[make_image(0)]))
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    out = model.model(inputs_embeds=embeds, position_ids=None, use_cache=False, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (*inputs["input_ids"].shape, model.config.text_config.hidden_size)


# What transformers' GenerationTesterMixin checks (its tests/generation/test_utils.py is not in the sdist the
# transformers-common CI tier runs), on OmniFusion with images.


def test_greedy_generate_dict_outputs_have_one_entry_per_step(tiny):
    model, processor = tiny
    chats = [chat("A?", images=[make_image(0)]), chat("Longer question B?", images=[make_image(1)])]
    inputs = encode(processor, chats)
    batch, prompt = inputs["input_ids"].shape
    config = model.config.text_config
    model.set_attn_implementation("eager")
    try:
        out = model.generate(
            **inputs,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            output_hidden_states=True,
            output_attentions=True,
        )
    finally:
        model.set_attn_implementation("sdpa")
    assert out.sequences.shape == (batch, prompt + 3)
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == len(out.attentions) == 3
    assert all(step.shape == (batch, config.vocab_size) for step in out.scores + out.logits)
    assert torch.equal(torch.stack(out.logits).argmax(-1).T, out.sequences[:, prompt:])
    for step, length in enumerate([prompt, 1, 1]):
        assert len(out.hidden_states[step]) == config.num_hidden_layers + 1
        assert out.hidden_states[step][-1].shape == (batch, length, config.hidden_size)
        assert len(out.attentions[step]) == config.num_hidden_layers
        assert out.attentions[step][0].shape == (batch, config.num_attention_heads, length, prompt + step)
    assert out.cache.get_seq_length() == prompt + 2


def test_sampling_with_num_return_sequences_gives_each_copy_its_images(tiny):
    model, processor = tiny
    inputs = encode(processor, [chat("A?", images=[make_image(2)]), chat("B?", images=[make_image(3), make_image(4)])])
    greedy = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    # top_k=1 sampling is greedy, so every returned copy must equal its prompt's greedy output
    sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=1, num_return_sequences=3)
    assert torch.equal(sampled, greedy.repeat_interleave(3, dim=0))
    free = model.generate(**inputs, max_new_tokens=5, do_sample=True, temperature=2.0, num_return_sequences=3)
    assert free.shape == (6, inputs["input_ids"].shape[1] + 5)


def test_generate_from_inputs_embeds_equals_generate_from_input_ids(tiny):
    model, processor = tiny
    inputs = encode(processor, chat("What colour?", images=[make_image(5)]))
    prompt = inputs["input_ids"].shape[1]
    by_ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    common = dict(
        pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"], max_new_tokens=5, do_sample=False
    )
    only_embeds = model.generate(inputs_embeds=embeds, **common)
    assert torch.equal(only_embeds, by_ids[:, prompt:])
    both = model.generate(input_ids=inputs["input_ids"], inputs_embeds=embeds, **common)
    assert torch.equal(both, by_ids)


def test_generate_continues_from_a_returned_cache(tiny):
    model, processor = tiny
    inputs = encode(processor, chat("What colour?", images=[make_image(6)]))
    at_once = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    first = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    mask = torch.ones_like(first.sequences)
    # with the images passed again (as transformers' own continuation test does: they are already in the cache) or not
    for images in (dict(pixel_values=inputs["pixel_values"]), {}):
        cache = copy.deepcopy(first.cache)
        continued = model.generate(
            input_ids=first.sequences,
            attention_mask=mask,
            cache=cache,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            **images,
        )
        assert torch.equal(continued, at_once)
    # without a cache, images with no placeholder left are still an error
    with pytest.raises(ValueError, match="0 placeholder positions"):
        model(input_ids=first.sequences[:, -3:], pixel_values=inputs["pixel_values"])


@pytest.mark.parametrize(
    "options",
    [dict(prompt_lookup_num_tokens=2), dict(cache_implementation="static")],
    ids=["prompt-lookup", "static-cache"],
)
def test_other_decoding_paths_match_greedy(tiny, options):
    model, processor = tiny
    inputs = encode(processor, [chat("What colour is the shape?", images=[make_image(7)])])
    greedy = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    other = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, **options)
    assert torch.equal(other, greedy)


def test_assisted_decoding_matches_greedy(tiny):
    model, processor = tiny
    inputs = encode(processor, [chat("What colour is the shape?", images=[make_image(8)])])
    greedy = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assisted = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, assistant_model=model)
    assert torch.equal(assisted, greedy)


def test_logits_to_keep_returns_the_last_logits(tiny):
    model, processor = tiny
    inputs = encode(processor, chat("What?", images=[make_image(0)]))
    with torch.no_grad():
        full = model(**inputs).logits
        last = model(**inputs, logits_to_keep=1).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last, full[:, -1:])


# Defects transformers' common tests found (see tests/transformers_common).


def test_past_key_values_is_a_deprecated_name_for_cache(tiny):
    from transformers import DynamicCache

    model, processor = tiny
    inputs = encode(processor, chat("What?", images=[make_image(0)]))
    for module in (model, model.model):
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
            old = module(**inputs, past_key_values=DynamicCache(config=model.config.text_config), use_cache=True)
        new = module(**inputs, cache=DynamicCache(config=model.config.text_config), use_cache=True)
        assert old.cache.get_seq_length() == new.cache.get_seq_length() == inputs["input_ids"].shape[1]


def test_get_image_features_hidden_states_and_tuple_output(tiny):
    """Get image features gives every hidden state on request and a tuple without return dict."""
    model, processor = tiny
    pixel_values = encode(processor, chat("What?", images=[make_image(0)]))["pixel_values"]
    layers = model.config.vision_config.num_hidden_layers
    with torch.no_grad():
        default = model.get_image_features(pixel_values)
        everything = model.get_image_features(pixel_values, output_hidden_states=True)
        as_tuple = model.get_image_features(pixel_values, return_dict=False)
    # only the layer the adapter reads (-2) is kept by default; all of them when asked
    assert [h is None for h in default.hidden_states] == [True] * (layers - 1) + [False, True]
    assert len(everything.hidden_states) == layers + 1 and all(h is not None for h in everything.hidden_states)
    torch.testing.assert_close(everything.hidden_states[-2], default.hidden_states[-2])
    torch.testing.assert_close(everything.pooler_output, default.pooler_output)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], default.last_hidden_state)


def test_set_input_embeddings_keeps_the_given_module_and_the_markers():
    model, processor = make_model_and_processor(adapter_dropout=0.0)
    inputs = encode(processor, chat("What?", images=[make_image(0)]))
    with torch.no_grad():
        reference = model(**inputs).logits
    old = model.get_input_embeddings()
    calls = []

    class CountingEmbedding(torch.nn.Embedding):
        def forward(self, input_ids):
            calls.append(input_ids)
            return super().forward(input_ids)

    new = CountingEmbedding(old.num_embeddings, old.embedding_dim)
    new.weight = old.weight
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new and model.model.get_input_embeddings() is new
    assert new.special_embeddings is old.special_embeddings
    assert "model.language_model.embed_tokens.special_embeddings.weight" in model.state_dict()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert calls and all((ids < old.num_embeddings).all() for ids in calls)
    torch.testing.assert_close(logits, reference)


def test_set_attn_implementation_switches_the_top_level_config_and_the_adapter(tiny):
    model, processor = tiny
    inputs = encode(processor, chat("What?", images=[make_image(0)]))
    adapter_attention = model.model.adapter.transformer_layer.self_attn
    with torch.no_grad():
        sdpa = model.model.adapter(torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0)))
        model.set_attn_implementation("eager")
        try:
            configs = [model.config, model.config.text_config, model.config.vision_config, adapter_attention.config]
            assert [c._attn_implementation for c in configs] == ["eager"] * 4
            eager = model.model.adapter(torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0)))
            model(**inputs)
        finally:
            model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_tied_lm_head_is_sharded_with_the_embedding():
    model, _ = make_model_and_processor(tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.tp_plan["lm_head"] == "colwise_gather_output"
    assert "model.language_model.embed_tokens" in model.tp_plan
