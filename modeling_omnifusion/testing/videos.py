"""
Synthetic videos for tests and the video demo: a shape that moves left, right, up or down, appears or vanishes
(`motion_clip`), and an MP4 writer with PyAV (`write_video`).
"""

import numpy as np

MOTIONS = ("left", "right", "up", "down", "appearing", "vanishing")


def motion_clip(motion: str, seed: int = 0, frames: int = 8, size: int = 32, shape_size: int = 8) -> np.ndarray:
    """
    `[frames, size, size, 3]` uint8: a square of a random colour on a random dark background, moving `motion`
    ("left", "right", "up", "down": from near one edge to near the other, the off-axis position random) or in place
    ("appearing": absent in the first half of the frames, present after; "vanishing": the reverse). Any single frame
    of a moving clip shows the square at a position every direction passes through.
    """
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {list(MOTIONS)}, got {motion!r}")
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 60, 3)
    colour = rng.integers(150, 256, 3)
    travel = size - shape_size
    start, end = int(rng.integers(0, 3)), travel - int(rng.integers(0, 3))
    across = int(rng.integers(0, travel + 1))
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = background
    for index in range(frames):
        step = start + (end - start) * index / max(frames - 1, 1)
        position = int(round(step if motion in ("right", "down") else start + end - step))
        if motion in ("left", "right"):
            top, left = across, position
        elif motion in ("up", "down"):
            top, left = position, across
        else:
            top, left = across, int(rng.integers(0, travel + 1)) if index == 0 else left
            visible = (index >= frames // 2) == (motion == "appearing")
            if not visible:
                continue
        video[index, top : top + shape_size, left : left + shape_size] = colour
    return video


def write_video(path, frames: np.ndarray, fps: int = 8, codec: str = "mpeg4") -> str:
    """`frames` (`[frames, H, W, 3]` uint8, even H and W) written as a video file with PyAV; returns the path."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


__all__ = ["MOTIONS", "motion_clip", "write_video"]
