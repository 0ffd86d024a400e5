"""Positional encodings: sine (backbone neck) and random Fourier features (prompt encoder)."""

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding of a feature map's grid (DETR style), normalised to [0, scale].

    The first half of the channels encodes y, the second half x; within each half the
    channels alternate sin, cos of the same frequency. The encoding depends only on the
    feature map size, so it is cached per (H, W).
    """

    def __init__(
        self,
        num_pos_feats: int,
        temperature: int = 10000,
        normalize: bool = True,
        scale: Optional[float] = None,
        # accepted for config compatibility (CUDA-graph warm-up in upstream); not needed here
        warmup_cache: bool = True,
        image_size: int = 1024,
        strides: Tuple[int, ...] = (4, 8, 16, 32),
    ) -> None:
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("scale is only meaningful with normalize=True")
        self.num_pos_feats = num_pos_feats // 2  # channels per axis
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._cache: Dict[Tuple[int, int], torch.Tensor] = {}

    def _axis_encoding(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: ... -> ... x num_pos_feats (sin, cos interleaved)."""
        pair_index = torch.arange(self.num_pos_feats // 2, dtype=torch.float32, device=positions.device)
        # one frequency per (sin, cos) pair
        freqs = self.temperature ** (2 * pair_index / self.num_pos_feats)
        angles = positions[..., None] / freqs
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)

    @torch.no_grad()
    def _grid_encoding(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """-> C x H x W (C = 2 * num_pos_feats)."""
        ys = torch.arange(1, h + 1, dtype=torch.float32, device=device)
        xs = torch.arange(1, w + 1, dtype=torch.float32, device=device)
        if self.normalize:
            eps = 1e-6
            ys = ys / (ys[-1:] + eps) * self.scale
            xs = xs / (xs[-1:] + eps) * self.scale
        enc_y = self._axis_encoding(ys)[:, None, :].expand(h, w, -1)
        enc_x = self._axis_encoding(xs)[None, :, :].expand(h, w, -1)
        return torch.cat((enc_y, enc_x), dim=-1).permute(2, 0, 1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x C x H x W -> B x (2*num_pos_feats) x H x W."""
        key = (x.shape[-2], x.shape[-1])
        if key not in self._cache:
            self._cache[key] = self._grid_encoding(*key, device=x.device)
        pe = self._cache[key].to(x.device)
        return pe[None].expand(x.shape[0], -1, -1, -1)


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of (x, y) in [0, 1]^2 (SAM's prompt/image positional encoding)."""

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords: ... x 2 in [0, 1] -> ... x (2*num_pos_feats)."""
        projected = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        projected = (2 * math.pi) * projected
        return torch.cat([projected.sin(), projected.cos()], dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an H x W grid -> C x H x W."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """coords_input: B x N x 2 pixel (x, y) in an image of size (H, W) -> B x N x C."""
        h, w = image_size
        coords = torch.stack([coords_input[..., 0] / w, coords_input[..., 1] / h], dim=-1)
        return self._encode(coords.float())
