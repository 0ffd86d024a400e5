"""The prompts MD-SAM-AL derives from a mask (DESIGN decision 3), as pure numpy/scipy geometry.

Coordinates are mask pixel indices: x = column index, y = row index. The largest 8-connected component of a mask
gives a centre point (the maximum of its Euclidean distance transform), a uniformly drawn random point and a box;
an empty mask gives the image centre (the whole image for a box). ``mask_point_to_input`` and
``mask_box_to_input`` map them from an h x w mask to the S x S model input. Nothing of the project is imported
here (sam_lora_image_encoder_prompt.prompts_from_logits applies it to a batch of predicted logits).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy import ndimage

ArrayLike = np.ndarray  # or a torch tensor (converted on the CPU)
Point = Tuple[float, float]
Box = Tuple[float, float, float, float]

# 8-connectivity: pixels touching diagonally belong to the same component.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def _as_bool_mask(mask: ArrayLike) -> np.ndarray:
    if hasattr(mask, "detach"):  # a torch tensor, on any device
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D H x W mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _image_centre(shape: Tuple[int, int]) -> Point:
    """Centre of an H x W grid in pixel-index coordinates (x, y)."""
    height, width = shape
    return (width - 1) / 2.0, (height - 1) / 2.0


def largest_component(mask: ArrayLike) -> np.ndarray:
    """H x W bool -> H x W bool holding only the largest 8-connected foreground component.

    Ties go to the component met first in raster order. An empty mask gives an empty mask.
    """
    mask = _as_bool_mask(mask)
    labels, count = ndimage.label(mask, structure=_CONNECTIVITY)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return labels == int(np.argmax(sizes)) + 1


def center_point_from_mask(mask: ArrayLike) -> Point:
    """(x, y) of the pixel deepest inside the largest component of `mask`.

    "Deepest" is the maximum of the Euclidean distance transform; the image border counts
    as background so that a lesion cut by the border is not centred on the border. The
    first maximum in raster order wins ties. An empty mask gives the image centre.
    """
    component = largest_component(mask)
    if not component.any():
        return _image_centre(component.shape)
    distance = ndimage.distance_transform_edt(np.pad(component, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(col), float(row)


def random_point_from_mask(mask: ArrayLike, generator: np.random.Generator) -> Point:
    """(x, y) of a pixel drawn uniformly from the largest component of `mask`.

    An empty mask gives the image centre (and draws nothing from `generator`).
    """
    component = largest_component(mask)
    flat = np.flatnonzero(component)
    if flat.size == 0:
        return _image_centre(component.shape)
    row, col = np.unravel_index(int(flat[generator.integers(flat.size)]), component.shape)
    return float(col), float(row)


def box_from_mask(mask: ArrayLike) -> Box:
    """(x0, y0, x1, y1): first and last column / row of the largest component (inclusive).

    An empty mask gives the whole image.
    """
    component = largest_component(mask)
    if not component.any():
        height, width = component.shape
        return 0.0, 0.0, float(width - 1), float(height - 1)
    rows = np.flatnonzero(component.any(axis=1))
    cols = np.flatnonzero(component.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1])


def mask_point_to_input(point: Point, mask_shape: Tuple[int, int], image_size: int) -> Point:
    """Pixel index on an h x w mask -> pixel index on the S x S model input.

    The centre of mask cell `col` is input coordinate (col + 0.5) * S / w in continuous
    units; the prompt encoder adds half a pixel to pixel indices, hence the final -0.5.
    """
    scale_y, scale_x = image_size / mask_shape[0], image_size / mask_shape[1]
    return (point[0] + 0.5) * scale_x - 0.5, (point[1] + 0.5) * scale_y - 0.5


def mask_box_to_input(box: Box, mask_shape: Tuple[int, int], image_size: int) -> Box:
    """Inclusive cell bounds on an h x w mask -> first / last covered input pixel indices."""
    scale_y, scale_x = image_size / mask_shape[0], image_size / mask_shape[1]
    x0, y0, x1, y1 = box
    return x0 * scale_x, y0 * scale_y, (x1 + 1) * scale_x - 1, (y1 + 1) * scale_y - 1
