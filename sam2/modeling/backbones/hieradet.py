"""Hiera: a hierarchical vision transformer (https://arxiv.org/abs/2306.00989), SAM2 flavour.

Four stages of transformer blocks. The first block of stages 2..4 halves the resolution by
max-pooling its queries ("q-pooling") and doubles the width; most blocks attend inside local
windows, a few ("global_att_blocks") attend over the whole feature map. The trunk returns the
output of every stage (high to low resolution).
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sam2.modeling.sam2_utils import MLP, DropPath, attention


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Cut B x H x W x C into (B * num_windows) x ws x ws x C windows, zero-padding H and W
    up to a multiple of the window size. Returns the windows and the padded (Hp, Wp)."""
    b, h, w, c = x.shape
    pad_h = -h % window_size
    pad_w = -w % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: windows -> B x H x W x C, padding removed."""
    hp, wp = padded_hw
    h, w = hw
    rows, cols = hp // window_size, wp // window_size
    b = windows.shape[0] // (rows * cols)
    x = windows.reshape(b, rows, cols, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :]
    return x


def pool_channels_last(x: torch.Tensor, pool: Optional[nn.Module]) -> torch.Tensor:
    """Apply a 2-D pooling module to a B x H x W x C tensor."""
    if pool is None:
        return x
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Strided convolution turning B x 3 x H x W pixels into B x H/4 x W/4 x C tokens."""

    def __init__(
        self,
        kernel_size: Tuple[int, int] = (7, 7),
        stride: Tuple[int, int] = (4, 4),
        padding: Tuple[int, int] = (3, 3),
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention whose queries may be pooled (resolution change).

    ``qkv`` projects ``dim`` -> ``3 * dim_out`` with q, k, v stacked in that order.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.dim = dim
        self.dim_out = dim_out
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x H x W x dim -> B x H' x W' x dim_out (H' = H / q_stride when pooling)."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)  # each B x HW x heads x C
        if self.q_pool is not None:
            q = pool_channels_last(q.reshape(b, h, w, -1), self.q_pool)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block: (windowed) attention + MLP, optional q-pooling."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_layer: str = "LayerNorm",
        q_stride: Optional[Tuple[int, int]] = None,
        act_layer: type = nn.GELU,
        window_size: int = 0,
    ) -> None:
        super().__init__()
        norm_cls = getattr(nn, norm_layer) if isinstance(norm_layer, str) else norm_layer
        self.dim = dim
        self.dim_out = dim_out
        self.window_size = window_size  # 0 = global attention
        self.q_stride = q_stride
        self.pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride, ceil_mode=False) if q_stride else None

        self.norm1 = norm_cls(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads=num_heads, q_pool=self.pool)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_cls(dim_out, eps=1e-6)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2, activation=act_layer)
        if dim != dim_out:
            # the residual path changes width (and resolution) with the block
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x H x W x dim -> B x H' x W' x dim_out."""
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = pool_channels_last(self.proj(x), self.pool)

        if self.window_size > 0:
            windows, _ = window_partition(x, self.window_size)
            windows = self.attn(windows)
            # with q-pooling each window shrinks by the stride; re-tile at the output size
            out_window = windows.shape[1]
            out_hw = shortcut.shape[1:3]
            padded = tuple(s + (-s % out_window) for s in out_hw)
            x = window_unpartition(windows, out_window, padded, out_hw)
        else:
            x = self.attn(x)

        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Hiera(nn.Module):
    """The Hiera trunk. Input B x 3 x S x S; output: list of stage features B x C_i x S/4/2^i x S/4/2^i."""

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        drop_path_rate: float = 0.0,
        q_pool: int = 3,
        q_stride: Tuple[int, int] = (2, 2),
        stages: Sequence[int] = (2, 3, 16, 3),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        window_pos_embed_bkg_spatial_size: Tuple[int, int] = (14, 14),
        window_spec: Sequence[int] = (8, 4, 14, 7),
        global_att_blocks: Sequence[int] = (12, 16, 20),
        weights_path: Optional[str] = None,
        return_interm_layers: bool = True,
    ) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError(f"stages {list(stages)} and window_spec {list(window_spec)} differ in length")
        if weights_path is not None:
            raise ValueError("Hiera(weights_path=...) is not supported; load a full checkpoint with build_sam2")
        self.window_spec = list(window_spec)
        self.q_stride = tuple(q_stride)
        self.stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        if not 0 <= q_pool <= len(stages) - 1:
            raise ValueError(f"q_pool must be in [0, {len(stages) - 1}], got {q_pool}")
        # the first block of each later stage pools its queries
        self.q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.global_att_blocks = list(global_att_blocks or [])
        self.return_interm_layers = return_interm_layers
        # Activation checkpointing of the blocks while training (see forward); off by default.
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(embed_dim=embed_dim)
        # windowed absolute position embedding (https://arxiv.org/abs/2311.05613): a coarse
        # background embedding interpolated to the feature size plus a per-window tile
        self.window_pos_embed_bkg_spatial_size = tuple(window_pos_embed_bkg_spatial_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *self.window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, self.window_spec[0], self.window_spec[0]))

        depth = sum(stages)
        drop_rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList()
        stage = 0
        dim = embed_dim
        for i in range(depth):
            # the window size lags one block behind the stage: a stage's first (pooling)
            # block still uses the previous stage's window, shrunk by the pooling
            window_size = 0 if i in self.global_att_blocks else self.window_spec[stage]
            dim_out = dim
            if i - 1 in self.stage_ends:
                dim_out = int(dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(
                MultiScaleBlock(
                    dim=dim,
                    dim_out=dim_out,
                    num_heads=num_heads,
                    drop_path=drop_rates[i],
                    q_stride=self.q_stride if i in self.q_pool_blocks else None,
                    window_size=window_size,
                )
            )
            dim = dim_out

        ends = self.stage_ends[::-1] if return_interm_layers else self.stage_ends[-1:]
        self.channel_list = [self.blocks[i].dim_out for i in ends]

    def _get_pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
        """Position embedding for an H x W token grid -> 1 x H x W x C."""
        background = F.interpolate(self.pos_embed, size=hw, mode="bicubic")
        window = self.pos_embed_window
        reps = [full // part for full, part in zip(background.shape, window.shape)]
        return (background + window.tile(reps)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x: B x 3 x S x S -> [B x C_i x H_i x W_i], highest resolution first."""
        x = self.patch_embed(x)
        x = x + self._get_pos_embed(x.shape[1:3])
        outputs = []
        # Checkpointed blocks keep only their inputs and recompute the rest during backward. Non-reentrant
        # checkpointing: it also gives gradients to parameters inside a block whose input needs none (a frozen
        # trunk with trainable adapters), and the block runs its grad-mode code path in the recomputation too.
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
            if i == self.stage_ends[-1] or (self.return_interm_layers and i in self.stage_ends):
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs
