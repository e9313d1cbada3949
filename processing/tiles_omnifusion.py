"""Tiling ("anyres") of an image into views: its best-fit canvas cut into tiles, plus the global view."""

import numpy as np
from transformers.image_processing_utils import select_best_resolution
from transformers.image_transforms import to_pil_image
from transformers.image_utils import PILImageResampling


def fit_to_canvas(image, canvas_height: int, canvas_width: int) -> np.ndarray:
    """A PIL `image` resized (aspect kept, bicubic) to fit the canvas, centred on black padding: `[H, W, 3]` uint8."""
    scale = min(canvas_height / image.height, canvas_width / image.width)
    height = min(canvas_height, max(1, int(np.ceil(image.height * scale))))
    width = min(canvas_width, max(1, int(np.ceil(image.width * scale))))
    canvas = np.zeros((canvas_height, canvas_width, 3), dtype=np.uint8)
    top, left = (canvas_height - height) // 2, (canvas_width - width) // 2
    resized = image.resize((width, height), PILImageResampling.BICUBIC)
    canvas[top : top + height, left : left + width] = np.asarray(resized)
    return canvas


def tile_views(image, pinpoints: list[list[int]], tile: int, global_view_position: str) -> list[np.ndarray]:
    """
    The views of one tiled image (`[tile, tile, 3]` uint8 each): its best-fit canvas cut into `tile` x `tile` tiles in
    row-major order, and the whole image resized to one tile (the global view) first or last.
    """
    image = to_pil_image(image).convert("RGB")
    canvas_height, canvas_width = select_best_resolution((image.height, image.width), pinpoints)
    canvas = fit_to_canvas(image, canvas_height, canvas_width)
    tiles = [
        canvas[top : top + tile, left : left + tile]
        for top in range(0, canvas_height, tile)
        for left in range(0, canvas_width, tile)
    ]
    global_view = np.asarray(image.resize((tile, tile), PILImageResampling.BICUBIC))
    return [global_view, *tiles] if global_view_position == "first" else [*tiles, global_view]


def num_tile_views(height: int, width: int, pinpoints: list[list[int]], tile: int) -> int:
    """How many views `tile_views` makes of a `height` x `width` image: the canvas's tiles plus the global view."""
    canvas_height, canvas_width = select_best_resolution((height, width), pinpoints)
    return (canvas_height // tile) * (canvas_width // tile) + 1


def image_processor_output_size(image_processor) -> int:
    """The square side an image processor outputs (its crop size when it crops, else its resize size)."""
    size = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
    size = dict(size or {})
    return size.get("height") or size.get("shortest_edge") or size.get("longest_edge")


__all__ = ["fit_to_canvas", "image_processor_output_size", "num_tile_views", "tile_views"]
