"""Synthetic ISIC-like dermoscopy images and masks: the --demo data and the tests' data.

``make_synthetic_isic`` writes a small data set in the README layout (``datasets_skin`` reads it like real
ISIC-2017 data); ``synthetic_lesion_image`` draws one image: skin texture and tone, an irregular (sometimes
multi-lobed, tiny, low-contrast or border-cut) lesion with pigment network, hairs, illumination fall-off and
sometimes the dark corners of the dermoscope.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from datasets_skin import MASK_SUFFIX, SPLIT_FOLDERS, PathLike
from safe_io import atomic_folder, atomic_path, remove_stale_temps
from utils import crash_point


_SKIN_TONES = np.array(
    [[214, 180, 160], [226, 194, 172], [190, 160, 142], [236, 212, 200], [222, 186, 176], [184, 152, 132],
     [218, 196, 180], [176, 136, 110]], np.float32)
_LESION_TONES = np.array(
    [[170, 104, 62], [140, 80, 46], [104, 60, 38], [72, 44, 34], [168, 100, 88], [120, 96, 96], [186, 124, 78]],
    np.float32)
_LESION_WEIGHTS = np.array([0.2, 0.2, 0.15, 0.1, 0.1, 0.07, 0.18])
_HAIR_TONES = np.array([[40, 28, 22], [70, 50, 38], [25, 20, 20], [110, 80, 60]], np.float32)
_SPLIT_SEED = {"Training": 0, "Validation": 1, "Test": 2}


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-ish noise varying over about ``cells`` blobs across the longer side (bicubic upsampling)."""
    height, width = shape
    grid_w = max(2, cells)
    grid_h = max(2, round(cells * height / width))
    coarse = rng.standard_normal((grid_h, grid_w)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BICUBIC))


def _blur(values: np.ndarray, sigma: float) -> np.ndarray:
    return gaussian_filter(values, sigma) if sigma > 0 else values


def _lesion_shape(rng: np.random.Generator, shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Irregular (sometimes multi-lobed, tiny or border-touching) lesion: (mask bool H x W, depth H x W).

    ``depth`` is 1 at a lobe's centre, 0 on the outline and negative outside; it drives the darker core and the
    soft edge. ``mask`` is ``depth > 0``.
    """
    height, width = shape
    short = min(height, width)
    kind = rng.random()
    if kind < 0.12:
        radius = short * rng.uniform(0.025, 0.06)  # tiny
    elif kind < 0.85:
        radius = short * rng.uniform(0.12, 0.28)
    else:
        radius = short * rng.uniform(0.3, 0.42)  # large, usually reaches the border
    if kind >= 0.12 and rng.random() < 0.2:  # centre near an edge so the lesion is cut by the border
        edge = rng.integers(4)
        cy = rng.uniform(0.0, 0.15) * height if edge == 0 else rng.uniform(0.85, 1.0) * height if edge == 1 else rng.uniform(0.2, 0.8) * height
        cx = rng.uniform(0.0, 0.15) * width if edge == 2 else rng.uniform(0.85, 1.0) * width if edge == 3 else rng.uniform(0.2, 0.8) * width
    else:
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    lobes = 1 if radius < short * 0.07 or rng.random() < 0.65 else int(rng.integers(2, 4))

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    border_noise = _smooth_noise(rng, shape, max(4, int(width / max(radius, 1.0) * 3)))
    depth = np.zeros(shape, np.float32)
    for lobe in range(lobes):
        scale = 1.0 if lobe == 0 else rng.uniform(0.45, 0.8)
        r0 = radius * scale
        angle = rng.uniform(0, 2 * np.pi)
        oy = 0.0 if lobe == 0 else np.sin(angle) * radius * rng.uniform(0.7, 1.1)
        ox = 0.0 if lobe == 0 else np.cos(angle) * radius * rng.uniform(0.7, 1.1)
        tilt = rng.uniform(0, np.pi)
        aspect = rng.uniform(0.65, 1.0)
        dy, dx = yy - (cy + oy), xx - (cx + ox)
        u = dx * np.cos(tilt) + dy * np.sin(tilt)
        v = (-dx * np.sin(tilt) + dy * np.cos(tilt)) / aspect
        rho = np.hypot(u, v)
        theta = np.arctan2(v, u)
        boundary = np.ones_like(theta)
        for k in range(2, 7):  # low-order harmonics make the outline irregular
            boundary += rng.normal(0, 0.13 / k ** 0.7) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        boundary = r0 * np.clip(boundary, 0.5, 1.6) * (1 + 0.08 * border_noise)
        depth = np.maximum(depth, 1.0 - rho / np.maximum(boundary, 1e-3))
    mask = depth > 0
    if not mask.any():  # never happens with the ranges above; guarantees a lesion pixel regardless
        mask[int(np.clip(cy, 0, height - 1)), int(np.clip(cx, 0, width - 1))] = True
    return mask, depth


def _draw_hairs(rng: np.random.Generator, shape: Tuple[int, int], count: int) -> np.ndarray:
    """Alpha layer (H x W float32) of ``count`` thin curved hairs."""
    height, width = shape
    layer = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    thickness = max(1, round(width / 300))
    for _ in range(count):
        start = np.array([rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height])
        direction = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.3, 0.9) * max(height, width)
        end = start + length * np.array([np.cos(direction), np.sin(direction)])
        bend = (start + end) / 2 + rng.normal(0, 0.12 * length, 2)
        t = np.linspace(0, 1, 24)[:, None]
        points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t ** 2 * end
        draw.line([tuple(p) for p in points], fill=int(rng.uniform(150, 240)), width=thickness)
    return np.asarray(layer, np.float32) / 255.0


def synthetic_lesion_image(rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """One dermoscopy-like RGB image (uint8 H x W x 3) and its 0/255 lesion mask (uint8 H x W)."""
    shape = (height, width)
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] + rng.normal(0, 4, 3)
    image = np.broadcast_to(skin, (height, width, 3)).astype(np.float32).copy()
    # Skin texture: broad blotches, finer mottling and pore-scale grain, slightly tinted.
    for cells, amplitude in ((6, 7.0), (max(8, width // 10), 4.0), (max(16, width // 3), 3.0)):
        noise = _smooth_noise(rng, shape, cells)
        image += amplitude * noise[..., None] * np.array([1.0, 0.9, 0.85], np.float32)
    # Faint freckles outside the ground truth, as on real backgrounds.
    if rng.random() < 0.4:
        freckles = np.clip(_smooth_noise(rng, shape, max(12, width // 12)) - 1.6, 0, None)
        image -= 25 * freckles[..., None] * np.array([0.6, 0.8, 1.0], np.float32)

    mask, depth = _lesion_shape(rng, shape)
    core = np.clip(depth, 0, 1)
    lesion = _LESION_TONES[rng.choice(len(_LESION_TONES), p=_LESION_WEIGHTS)] + rng.normal(0, 8, 3)
    contrast = rng.uniform(0.35, 0.6) if rng.random() < 0.25 else rng.uniform(0.85, 1.0)
    lesion_colour = lesion[None, None, :] * (1 - 0.5 * core[..., None] * rng.uniform(0.3, 1.0))
    # Pigment network / globules: mid-scale mottling plus dots, stronger towards the core.
    pigment = 0.12 * _smooth_noise(rng, shape, max(8, width // 14)) + 0.08 * _smooth_noise(rng, shape, max(20, width // 5))
    lesion_colour = lesion_colour * (1 + pigment[..., None] * (0.5 + core[..., None]))
    # The pigment fades over a band straddling the outline (half strength on the outline itself).
    fade = rng.uniform(0.03, 0.1)
    alpha = contrast / (1 + np.exp(-np.clip(depth / fade, -30, 30)))
    image = image * (1 - alpha[..., None]) + lesion_colour * alpha[..., None]

    if rng.random() < 0.6:
        hairs = _blur(_draw_hairs(rng, shape, int(rng.integers(1, 9))), 0.5)
        hair = _HAIR_TONES[rng.integers(len(_HAIR_TONES))]
        image = image * (1 - hairs[..., None]) + hair * hairs[..., None]

    # Illumination fall-off around an off-centre optical axis; sometimes the dark corners of the dermoscope.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
    radius = np.hypot((yy - cy) / (height / 2), (xx - cx) / (width / 2)) / np.sqrt(2)
    image *= (1 - rng.uniform(0.05, 0.22) * radius ** 2)[..., None]
    if rng.random() < 0.25:
        ring = np.clip((radius - rng.uniform(0.78, 0.9)) / 0.04, 0, 1)
        image = image * (1 - 0.9 * ring[..., None]) + 15 * ring[..., None]
    image += rng.normal(0, 2.0, image.shape).astype(np.float32)  # sensor noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def _save(image: np.ndarray, path: Path, **kwargs) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, **kwargs)


def make_synthetic_isic(
    root: PathLike, n_train: int = 20, n_val: int = 8, n_test: int = 0, size: int = 256, seed: int = 0
) -> Path:
    """Write a small ISIC-like dataset in the README layout under ``root``; returns ``root``.

    Images are ``size`` pixels wide and 0.66-0.8 times as high (like ISIC photos, so resizing and original-size
    metrics are exercised), saved as JPEG; masks are 0/255 PNGs named ``<image>_segmentation.png``. Names are
    ``ISIC_<7 digits>``, continuing across splits. The same seed gives the same files (each image depends only on
    the seed, its split and its position). ``n_test=0`` writes no Test folders. Files are written one by one: a
    caller that must never leave half a data set writes into ``safe_io.atomic_folder`` (as the demo does).
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}.")
    root = Path(root)
    first_id = 0
    for split, count in (("Training", n_train), ("Validation", n_val), ("Test", n_test)):
        if count <= 0:
            continue
        image_dir, mask_dir = (root / folder for folder in SPLIT_FOLDERS[split][0])
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, _SPLIT_SEED[split], i])
            height = int(round(size * rng.uniform(0.66, 0.8)))
            image, mask = synthetic_lesion_image(rng, height, size)
            name = f"ISIC_{first_id + i:07d}"
            _save(image, image_dir / f"{name}.jpg", quality=92)
            _save(mask, mask_dir / f"{name}{MASK_SUFFIX}")
            crash_point("synthetic_data", first_id + i + 1)  # test hook: a kill after this many pairs
        first_id += count
    return root


def ensure_synthetic_isic(root: PathLike, **kwargs) -> bool:
    """``make_synthetic_isic(root, **kwargs)`` unless ``root`` holds a data set already, written into a temporary
    folder renamed to ``root`` when complete, so that a process killed meanwhile leaves no half data set (the
    temporary folder such a kill left is removed here). Returns whether it wrote one; OSError when it cannot."""
    root = Path(root)
    remove_stale_temps(root.parent, root.name)
    if (root / "Training_Data").is_dir():
        return False
    with atomic_folder(root) as tmp:
        make_synthetic_isic(tmp, **kwargs)
    return True
