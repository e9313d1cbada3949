"""The CTC warm start of the audio adapter (`modeling_omnifusion.training.audio_alignment`) on a tiny model."""

import pytest
import torch

from modeling_omnifusion.processing.audio_inputs_omnifusion import num_audio_positions, num_mel_frames
from modeling_omnifusion.testing.tiny import make_audio_model_and_processor, make_clip, make_model_and_processor
from modeling_omnifusion.training.audio_alignment import align_audio_adapter, audio_positions


@pytest.fixture(scope="module")
def tiny():
    return make_audio_model_and_processor(seed=3)


def test_positions_are_what_the_adapter_reads(tiny):
    model, processor = tiny
    clips = [make_clip(1, 0.3), make_clip(2, 0.9), make_clip(3, 0.6)]
    positions = audio_positions(model, processor, clips, batch_size=2)
    features = processor.feature_extractor(
        clips, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model.get_audio_features(features["input_features"], features["attention_mask"]).pooler_output
        adapted = model.model.audio_adapter(torch.cat(positions))
    hop = processor.feature_extractor.hop_length
    assert [len(row) for row in positions] == [
        num_audio_positions(num_mel_frames(len(clip), hop), model.config.audio_pool_stride) for clip in clips
    ]
    assert len(positions[0]) < len(positions[2]) < len(positions[1])
    torch.testing.assert_close(adapted, expected)


def test_alignment_trains_the_audio_adapter_alone(tiny):
    model, processor = make_audio_model_and_processor(seed=3)
    # Clips told apart by their positions alone (a random one-layer encoder barely tells tones apart).
    generator = torch.Generator().manual_seed(0)
    positions = [torch.randn(20, model.config.audio_config.d_model, generator=generator) for _ in range(4)]
    texts = ["one two", "three", "two one", "four"]
    before = {name: weight.detach().clone() for name, weight in model.named_parameters()}
    alignment = align_audio_adapter(
        model, processor.tokenizer, positions, texts, steps=60, batch_size=4, learning_rate=1e-2, warmup_steps=5
    )
    losses = alignment.losses
    assert len(losses) == 60
    assert losses[-1] < 0.01 * losses[0]
    changed = {name for name, weight in model.named_parameters() if not torch.equal(weight, before[name])}
    assert changed and all(name.startswith("model.audio_adapter.") for name in changed)
    assert all(weight.grad is None for weight in model.parameters())
    # Separable clips, loss near zero: the adapter alone reads every training clip back (and changes no weight).
    after = {name: weight.detach().clone() for name, weight in model.named_parameters()}
    assert alignment.transcribe(model, processor.tokenizer, positions) == texts
    assert all(torch.equal(weight, dict(model.named_parameters())[name]) for name, weight in after.items())


@pytest.mark.parametrize("input_dropout", [0.0, 0.3])
def test_the_same_seed_aligns_the_same_way(input_dropout):
    def run(seed=7):
        model, processor = make_audio_model_and_processor(seed=3)
        positions = audio_positions(model, processor, [make_clip(seed, 0.8) for seed in range(3)])
        texts = ["one", "two", "three"]
        return align_audio_adapter(
            model, processor.tokenizer, positions, texts, steps=5, seed=seed, input_dropout=input_dropout
        ).losses

    assert run() == run()
    if input_dropout:  # the masks follow the seed: another seed draws other masks (and batches)
        assert run(seed=8) != run()


def test_input_dropout_changes_what_the_adapter_reads():
    def final_weights(input_dropout):
        model, processor = make_audio_model_and_processor(seed=3)
        generator = torch.Generator().manual_seed(0)
        positions = [torch.randn(12, model.config.audio_config.d_model, generator=generator) for _ in range(2)]
        align_audio_adapter(
            model, processor.tokenizer, positions, ["one", "two"], steps=3, batch_size=2, input_dropout=input_dropout
        )
        return [weight.detach().clone() for weight in model.model.audio_adapter.parameters()]

    plain, dropped = final_weights(0.0), final_weights(0.5)
    assert not all(torch.equal(a, b) for a, b in zip(plain, dropped))


@pytest.mark.parametrize("input_dropout", [-0.1, 1.0])
def test_input_dropout_out_of_range_is_refused(tiny, input_dropout):
    model, processor = tiny
    positions = [torch.zeros(5, model.config.audio_config.d_model)]
    with pytest.raises(ValueError, match=r"input_dropout must be in \[0, 1\), got"):
        align_audio_adapter(model, processor.tokenizer, positions, ["one"], steps=1, input_dropout=input_dropout)


@pytest.mark.parametrize(
    "texts, lengths, message",
    [
        (["one"], [5, 5], "positions has 2 clips but transcripts has 1"),
        (["one", ""], [5, 5], "transcript 1 ('') has no tokens"),
        (["one", "one two three four five six seven eight"], [5, 2], "clip 1 has 2 audio positions, fewer than"),
    ],
)
def test_bad_clips_are_named(tiny, texts, lengths, message):
    model, processor = tiny
    width = model.config.audio_config.d_model
    positions = [torch.zeros(length, width) for length in lengths]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        align_audio_adapter(model, processor.tokenizer, positions, texts, steps=1)


def test_a_model_without_sound_is_refused():
    model, processor = make_model_and_processor()
    with pytest.raises(ValueError, match="no audio encoder"):
        audio_positions(model, processor, [make_clip(0, 0.5)])
    with pytest.raises(ValueError, match="no audio adapter"):
        align_audio_adapter(model, processor.tokenizer, [torch.zeros(4, 8)], ["one"], steps=1)
