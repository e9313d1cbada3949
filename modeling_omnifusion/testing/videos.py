"""
Synthetic videos for tests and the video demo: a shape that moves left, right, up or down, appears or vanishes
(`motion_clip`), and an MP4 writer with PyAV (`write_video`).
"""

import numpy as np

MOTIONS = ("left", "right", "up", "down", "appearing", "vanishing")


def motion_clip(
    motion: str, seed: int = 0, frames: int = 8, size: int = 32, shape_size: int = 8, distance: int | None = None
) -> np.ndarray:
    """
    `[frames, size, size, 3]` uint8: a square of a random colour on a random dark background, moving `motion`
    ("left", "right", "up", "down": from near one edge to near the other, the off-axis position random) or in place
    ("appearing": absent in the first half of the frames, present after; "vanishing": the reverse). Any single frame
    of a moving clip shows the square at a position every direction passes through.

    With `distance`, the square moves `distance` pixels instead, and its first position (both coordinates, and the
    place where it appears or vanishes) is drawn uniformly from `[distance, size - shape_size - distance]` for every
    motion: the first frame is then drawn from one distribution for "left", "right", "up", "down" and "vanishing",
    so it tells only "appearing" (no square) from the rest.
    """
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {list(MOTIONS)}, got {motion!r}")
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 60, 3)
    colour = rng.integers(150, 256, 3)
    travel = size - shape_size
    if distance is None:
        start, end = int(rng.integers(0, 3)), travel - int(rng.integers(0, 3))
        across = int(rng.integers(0, travel + 1))
    else:
        if not 0 < distance <= travel // 2:
            raise ValueError(f"distance must be in [1, {travel // 2}] for size {size}, got {distance}")
        first, across = (int(value) for value in rng.integers(distance, travel - distance + 1, 2))
        start, end = (first, first + distance) if motion in ("right", "down") else (first - distance, first)
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
            if index == 0:
                left = int(rng.integers(0, travel + 1)) if distance is None else first
            top = across
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
