"""What serving engines (vLLM's Transformers backend) read from a processor with video: token and frame counts per
video size, `video_grid_thw` beside the replacement offsets, the model ignoring it, and `vllm_inputs` with videos."""

import pytest
import torch

from modeling_omnifusion.testing.tiny import make_image, make_video, make_video_model_and_processor


@pytest.fixture(scope="module")
def tiny():
    return make_video_model_and_processor(video_adapter="separate")


def test_counts_per_video_size_are_positions_and_frames(tiny):
    _, processor = tiny
    counts = processor._get_num_multimodal_tokens(video_sizes=[[4, 32, 32], [2, 64, 48]], image_sizes=[[32, 32]])
    assert counts["num_video_tokens"] == [16, 8]  # 4 pooled positions per frame
    assert counts["num_video_patches"] == [4, 2]
    assert counts["num_image_tokens"] == [processor.num_image_tokens]
    assert "num_video_patches" not in processor._get_num_multimodal_tokens(image_sizes=[[32, 32]])


def test_grid_per_video_only_beside_the_replacement_offsets(tiny):
    model, processor = tiny
    videos = [make_video(0, 10), make_video(1, 2)]
    served = processor(text="<video>a<video>", videos=videos, return_text_replacement_offsets=True, return_tensors="pt")
    assert served["video_grid_thw"].tolist() == [[4, 1, 1], [2, 1, 1]]
    assert served["pixel_values_videos"].shape[0] == 6
    plain = processor(text="<video>a<video>", videos=videos, return_tensors="pt")
    assert "video_grid_thw" not in plain and torch.equal(plain["input_ids"], served["input_ids"])
    with torch.no_grad():
        with_grid = model.get_video_features(served["pixel_values_videos"], video_grid_thw=served["video_grid_thw"])
        without = model.get_video_features(served["pixel_values_videos"])
    assert torch.equal(with_grid.pooler_output, without.pooler_output)


def test_vllm_inputs_carry_sampled_frames_and_check_counts(tiny):
    _, processor = tiny
    text = "<image><video>Both?"
    prompt = processor.vllm_inputs(text, images=[make_image(0)], videos=[make_video(0, 10)])
    assert prompt["prompt"] == text and len(prompt["multi_modal_data"]["image"]) == 1
    (frames,) = prompt["multi_modal_data"]["video"]
    assert frames.shape == (4, 32, 32, 3) and (frames == make_video(0, 10)[[0, 2, 5, 7]]).all()
    with pytest.raises(ValueError, match="video"):
        processor.vllm_inputs("<video><video>Hi", videos=[make_video(0, 3)])
    with pytest.raises(ValueError, match="video"):
        processor.vllm_inputs("<video>Hi")
    assert processor.vllm_inputs("Hi") == {"prompt": "Hi"}
