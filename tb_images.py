"""Pictures for TensorBoard: a prediction over its image, the selected images, and why they were selected
(the masks mask_difference compared; for the embedding strategies, where the chosen images sit: ``embedding_projection``).

Images come in as the datasets give them (3 x H x W, ImageNet-normalised) and go out as 3 x H x W floats in
[0, 1], ready for ``SummaryWriter.add_image``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from datasets_skin import PIXEL_MEAN, PIXEL_STD


def overlay(image: torch.Tensor, gt: Optional[torch.Tensor], pred: Optional[torch.Tensor]) -> torch.Tensor:
    """3 x H x W normalised image -> 3 x H x W in [0, 1]; prediction tinted red, ground-truth outline green."""
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    img = (image.cpu().float() * std + mean).clamp(0, 1)
    if pred is not None:
        p = pred.cpu().bool()
        img[0][p] = 0.5 * img[0][p] + 0.5
        img[1][p] *= 0.5
        img[2][p] *= 0.5
    if gt is not None:
        g = gt.cpu().float()[None, None]
        inner = -F.max_pool2d(-g, 3, stride=1, padding=1)  # erosion
        edge = (g - inner)[0, 0].bool()
        img[:, edge] = torch.tensor([0.0, 1.0, 0.0]).view(3, 1)
    return img


def captioned(tile: torch.Tensor, caption: str, point: Optional[torch.Tensor] = None) -> torch.Tensor:
    """3 x H x W in [0, 1] -> 3 x (H + 12) x W: a caption strip above; ``point`` (x, y) drawn as a yellow dot."""
    height, width = tile.shape[-2:]
    canvas = Image.new("RGB", (width, height + 12))
    canvas.paste(Image.fromarray(to_png_array(tile)), (0, 12))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 0), caption, fill="white")
    if point is not None:
        x, y, r = float(point[0]), float(point[1]) + 12, max(2, width // 64)
        draw.ellipse([x - r, y - r, x + r, y + r], fill="yellow", outline="black")
    return from_png_array(np.array(canvas))


def why_selected_image(images: torch.Tensor, no_prompt: torch.Tensor, center: torch.Tensor, random: torch.Tensor,
                       center_points: torch.Tensor, random_points: torch.Tensor, scores: Sequence[float],
                       threshold: float) -> torch.Tensor:
    """One row per selected image: the image and its score, then the three masks mask_difference compared
    (probabilities B x K x h x w of decoder 1 unprompted; decoder 2 at the centre point; decoder 1 at the random
    point; a pixel is in a mask where some channel exceeds ``threshold``), tinted red over the image, each with its
    prompt point (B x 2, x/y in input pixels)."""
    rows = []
    for i, image in enumerate(images):
        tiles = [captioned(overlay(image, None, None), f"score {scores[i]:.3f}")]
        for name, probs, point in (("no prompt", no_prompt, None), ("centre point", center, center_points[i]),
                                   ("random point", random, random_points[i])):
            mask = F.interpolate(probs[i:i + 1].float(), size=image.shape[-2:], mode="bilinear",
                                 align_corners=False)[0].amax(0) > threshold
            tiles.append(captioned(overlay(image, None, mask), name, point))
        rows.append(torch.cat(tiles, dim=2))
    return torch.cat(rows, dim=1)


def principal_plane(vectors: np.ndarray) -> Tuple[np.ndarray, List[float]]:
    """N x D vectors -> (N x 2 coordinates on their first two principal components, the fraction of the variance
    each explains); scikit-learn's PCA (exact SVD, deterministic). Missing components (fewer than 3 vectors, or
    D < 2) are zeros."""
    from sklearn.decomposition import PCA  # imported when first drawn: it adds seconds to every trainer start

    components = min(2, len(vectors) - 1, vectors.shape[1])
    coordinates = np.zeros((len(vectors), 2))
    explained = [0.0, 0.0]
    if components >= 1:
        pca = PCA(n_components=components, svd_solver="full").fit(vectors)
        coordinates[:, :components] = pca.transform(vectors)
        explained[:components] = [float(v) for v in pca.explained_variance_ratio_]
    return coordinates, explained


def embedding_projection(pool: np.ndarray, labeled: np.ndarray, chosen: Sequence[int], title: str) -> torch.Tensor:
    """Where this epoch's picks sit: N x D pool and M x D labeled embedding vectors on the pool and labeled
    vectors' first two principal components; pool grey, labeled blue, the chosen pool positions red, numbered in
    the order chosen. -> 3 x H x W in [0, 1]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # (as PCA: only embedding strategies draw this)
    from matplotlib.figure import Figure

    coordinates, explained = principal_plane(np.concatenate([pool, labeled]).astype(np.float64))
    on_pool, on_labeled = coordinates[:len(pool)], coordinates[len(pool):]
    picks = on_pool[list(chosen)]
    figure = Figure(figsize=(5, 4.2), dpi=80)
    figure.subplots_adjust(left=0.16, right=0.97, bottom=0.13, top=0.92)  # fixed margins: tight_layout costs ~0.5 s
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter(*on_pool.T, s=10, color="0.6", label=f"pool ({len(pool)})")
    if len(labeled):
        axes.scatter(*on_labeled.T, s=14, color="tab:blue", label=f"labeled ({len(labeled)})")
    axes.scatter(*picks.reshape(-1, 2).T, s=60, facecolors="none", edgecolors="tab:red", linewidths=1.5,
                 label=f"chosen now ({len(picks)})")
    for order, (x, y) in enumerate(picks, start=1):
        axes.annotate(str(order), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color="tab:red")
    axes.set_xlabel(f"PC 1 ({100 * explained[0]:.0f}% of the variance)")
    axes.set_ylabel(f"PC 2 ({100 * explained[1]:.0f}%)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="best")
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return from_png_array(rgba[..., :3].copy())


def image_grid(tiles: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tiles of one size (3 x H x W) side by side in one row."""
    from torchvision.utils import make_grid  # here: torchvision adds ~2 s to importing the strategies

    return make_grid(list(tiles), nrow=len(tiles))


def selected_grid(samples: Sequence[dict]) -> torch.Tensor:
    """The selected images (dataset samples) with their masks' outlines."""
    return image_grid([overlay(s["image"], s["label"], None) for s in samples])


def prediction_grid(samples: Sequence[dict], logits: torch.Tensor) -> torch.Tensor:
    """Validation images with the prediction (B x (C+1) x h x w logits, upsampled; argmax) tinted over the
    ground-truth outline."""
    images = torch.stack([s["image"] for s in samples])
    pred = F.interpolate(logits.float().cpu(), size=images.shape[-2:], mode="bilinear",
                         align_corners=False).argmax(1) > 0
    return image_grid([overlay(s["image"], s["label"] > 0, p) for s, p in zip(samples, pred)])


def to_png_array(picture: torch.Tensor) -> np.ndarray:
    """3 x H x W in [0, 1] -> H x W x 3 uint8 (to keep a picture as a PNG)."""
    return (picture.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def from_png_array(array: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W in [0, 1]."""
    return torch.from_numpy(np.asarray(array, np.uint8)).permute(2, 0, 1).float() / 255
