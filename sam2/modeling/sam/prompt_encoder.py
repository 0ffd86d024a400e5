"""SAM prompt encoder: points and boxes -> sparse tokens, a low-res mask -> dense embedding."""

from typing import Optional, Tuple, Type

import torch
from torch import nn

from sam2.modeling.position_encoding import PositionEmbeddingRandom
from sam2.modeling.sam2_utils import LayerNorm2d

# point label -> index into point_embeddings (-1 = padding uses not_a_point_embed instead)
NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 0, 1, 2, 3


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Args:
      embed_dim: token width (256).
      image_embedding_size: (H, W) of the image embedding (S/16).
      input_image_size: (H, W) of the model input (S); prompts are in its pixel coordinates.
      mask_in_chans: hidden channels of the mask down-sampler.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        self.num_point_embeddings = 4  # negative, positive, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        self.mask_input_size = (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self, image_embedding_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Positional encoding of the image-embedding grid -> 1 x C x H x W.

        image_embedding_size: (H, W) of the grid (default: the stored ``image_embedding_size``).
        """
        return self.pe_layer(image_embedding_size or self.image_embedding_size).unsqueeze(0)

    def _embed_points(
        self, points: torch.Tensor, labels: torch.Tensor, pad: bool, input_image_size: Tuple[int, int]
    ) -> torch.Tensor:
        """points: B x N x 2 pixels of an input of size (H, W), labels: B x N -> B x N(+1) x C."""
        points = points + 0.5  # pixel centres
        if pad:
            # without a box, a padding point stands in for the missing box tokens
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, input_image_size)
        labels = labels.unsqueeze(-1)
        embedding = torch.where(labels == -1, torch.zeros_like(embedding) + self.not_a_point_embed.weight, embedding)
        for label, type_embed in enumerate(self.point_embeddings):
            embedding = torch.where(labels == label, embedding + type_embed.weight, embedding)
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor, input_image_size: Tuple[int, int]) -> torch.Tensor:
        """boxes: B x 4 (x0, y0, x1, y1) pixels of an (H, W) input -> B x 2 x C (one token per corner)."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        embedding = self.pe_layer.forward_with_coords(corners, input_image_size)
        corner_types = torch.stack(
            [self.point_embeddings[BOX_TOP_LEFT].weight[0], self.point_embeddings[BOX_BOTTOM_RIGHT].weight[0]]
        )
        return embedding + corner_types

    @staticmethod
    def _batch_size(points, boxes, masks) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
        image_embedding_size: Optional[Tuple[int, int]] = None,
        input_image_size: Optional[Tuple[int, int]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
          points: (coords B x N x 2 in input pixels, labels B x N: 1 pos, 0 neg, 2/3 box
            corners, -1 padding) or None.
          boxes: B x 4 pixel boxes or None.
          masks: B x 1 x 4H x 4W mask logits or None.
          image_embedding_size, input_image_size: (H, W) of the image embedding and of the
            model input when they differ from the stored sizes (a model run at another input
            size); default: the stored ``image_embedding_size`` / ``input_image_size``.
        Returns:
          sparse B x K x C and dense B x C x H x W embeddings.
        """
        embedding_hw = tuple(image_embedding_size or self.image_embedding_size)
        input_hw = tuple(input_image_size or self.input_image_size)
        bs = self._batch_size(points, boxes, masks)
        device = self.point_embeddings[0].weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=device)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(points[0], points[1], boxes is None, input_hw)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes, input_hw)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, *embedding_hw)
        return sparse, dense
