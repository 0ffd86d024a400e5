"""Image encoder = Hiera trunk + FPN neck."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class FpnNeck(nn.Module):
    """Feature pyramid neck: 1x1 lateral convs to ``d_model`` channels, plus top-down fusion
    (upsample the coarser level by 2 and add) on the levels in ``fpn_top_down_levels``.
    No output convs. Also returns a positional encoding per level."""

    def __init__(
        self,
        position_encoding: nn.Module,
        d_model: int,
        backbone_channel_list: Sequence[int],
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        fpn_interp_model: str = "bilinear",
        fuse_type: str = "sum",
        fpn_top_down_levels: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        self.position_encoding = position_encoding
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        # convs[j] handles the j-th coarsest level (channel list is low to high resolution)
        self.convs = nn.ModuleList()
        for channels in self.backbone_channel_list:
            lateral = nn.Sequential()
            lateral.add_module(
                "conv", nn.Conv2d(channels, d_model, kernel_size=kernel_size, stride=stride, padding=padding)
            )
            self.convs.append(lateral)
        self.fpn_interp_model = fpn_interp_model
        self.fuse_type = fuse_type
        levels = range(len(self.convs)) if fpn_top_down_levels is None else fpn_top_down_levels
        self.fpn_top_down_levels = list(levels)

    def fuse(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        """Trunk features (high to low resolution) -> B x d_model x H_i x W_i, same order."""
        if len(xs) != len(self.convs):
            raise ValueError(f"expected {len(self.convs)} feature levels, got {len(xs)}")
        n = len(xs) - 1
        out: List[Optional[torch.Tensor]] = [None] * len(xs)
        coarser = None
        for level in range(n, -1, -1):  # coarsest first
            lateral = self.convs[n - level](xs[level])
            if coarser is not None and level in self.fpn_top_down_levels:
                top_down = F.interpolate(
                    coarser.to(dtype=torch.float32),
                    scale_factor=2.0,
                    mode=self.fpn_interp_model,
                    align_corners=None if self.fpn_interp_model == "nearest" else False,
                    antialias=False,
                )
                coarser = lateral + top_down
                if self.fuse_type == "avg":
                    coarser = coarser / 2
            else:
                coarser = lateral
            out[level] = coarser
        return out

    def forward(self, xs: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """-> (features, positional encodings), both high to low resolution."""
        features = self.fuse(xs)
        positions = [self.position_encoding(f).to(f.dtype) for f in features]
        return features, positions


class ImageEncoder(nn.Module):
    """Trunk + neck. ``scalp`` drops that many of the lowest-resolution levels from the output."""

    def __init__(self, trunk: nn.Module, neck: FpnNeck, scalp: int = 0) -> None:
        super().__init__()
        if list(trunk.channel_list) != list(neck.backbone_channel_list):
            raise ValueError(
                f"trunk channels {trunk.channel_list} do not match neck backbone_channel_list "
                f"{neck.backbone_channel_list}"
            )
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def _keep(self, levels: List[torch.Tensor]) -> List[torch.Tensor]:
        return levels[: len(levels) - self.scalp]

    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """images: B x 3 x S x S -> kept FPN levels, high to low resolution (no positional encodings)."""
        return self._keep(self.neck.fuse(self.trunk(images)))

    def forward(self, images: torch.Tensor) -> Dict[str, object]:
        """Upstream's output dict: vision_features (lowest kept level), vision_pos_enc, backbone_fpn."""
        features, positions = self.neck(self.trunk(images))
        features, positions = self._keep(features), self._keep(positions)
        return {"vision_features": features[-1], "vision_pos_enc": positions, "backbone_fpn": features}
