"""Interactive prediction on one image: embed it once, then predict masks for any prompts."""

from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from sam2.modeling.sam2_base import SAM2Base

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOW_RES_LOGIT_CLAMP = 32.0  # low-res logits are returned clamped to [-32, 32]


def preprocess_image(image: Union[np.ndarray, Image.Image], image_size: int) -> torch.Tensor:
    """HWC RGB uint8 array or PIL image -> 3 x S x S float tensor, resized (antialiased,
    bilinear, aspect ratio not kept) and ImageNet-normalised."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 RGB image array, got shape {image.shape}")
    else:
        raise TypeError(f"expected a numpy HWC RGB array or a PIL image, got {type(image).__name__}")
    pixels = TF.to_tensor(image)  # 3 x H x W in [0, 1] for uint8 / PIL input
    pixels = TF.resize(pixels, [image_size, image_size], antialias=True)
    return TF.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)


class SAM2ImagePredictor:
    """SAM2 image predictor with upstream's ``set_image`` / ``predict`` semantics.

    Args:
      sam_model: a ``SAM2Base`` (any ``image_size``).
      mask_threshold: logit threshold turning mask logits into binary masks.
    """

    def __init__(self, sam_model: SAM2Base, mask_threshold: float = 0.0) -> None:
        self.model = sam_model
        self.mask_threshold = mask_threshold
        self.reset_predictor()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_predictor(self) -> None:
        self._features = None
        self._orig_hw = None
        self._is_image_set = False

    @torch.no_grad()
    def set_image(self, image: Union[np.ndarray, Image.Image]) -> None:
        """Embed ``image`` (H x W x 3 RGB uint8 array, or a PIL image) for later ``predict`` calls."""
        self.reset_predictor()
        if isinstance(image, Image.Image):
            self._orig_hw = (image.size[1], image.size[0])
        else:
            self._orig_hw = tuple(np.shape(image)[:2])
        pixels = preprocess_image(image, self.model.image_size)[None].to(self.device)
        features = self.model.encode_image(pixels)
        self._features = {"image_embed": features["image_embed"], "high_res_feats": features["high_res_feats"]}
        self._is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """1 x C x S/16 x S/16 embedding of the current image."""
        self._require_image()
        return self._features["image_embed"]

    def _require_image(self) -> None:
        if not self._is_image_set:
            raise RuntimeError("call set_image(...) before predicting")

    def _to_model_coords(self, coords: torch.Tensor, normalize: bool) -> torch.Tensor:
        """... x 2 (x, y) in original-image pixels (or [0, 1] when not ``normalize``) -> model pixels."""
        if normalize:
            h, w = self._orig_hw
            coords = torch.stack([coords[..., 0] / w, coords[..., 1] / h], dim=-1)
        return coords * self.model.image_size

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords: bool = True,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for prompts on the current image.

        Args:
          point_coords: N x 2 (or B x N x 2) (x, y) points in original-image pixels (in [0, 1]
            when ``normalize_coords`` is False).
          point_labels: N (or B x N) labels: 1 foreground, 0 background.
          box: 4 (or B x 4) x0, y0, x1, y1 box, same coordinates as the points.
          mask_input: 1 x S/4 x S/4 low-res logits from a previous call.
          multimask_output: three masks (ambiguous prompts) instead of one.
          return_logits: return mask logits instead of booleans.
        Returns:
          masks C x H x W (float32: 0/1, or logits with ``return_logits``), iou_predictions C
          (float32), low-res
          logits C x S/4 x S/4 (float32); with batched prompts each gains a leading B axis.
        """
        self._require_image()
        coords = labels = boxes = masks_in = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = self._to_model_coords(
                torch.as_tensor(point_coords, dtype=torch.float, device=self.device), normalize_coords
            )
            labels = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)
            if coords.ndim == 2:
                coords, labels = coords[None], labels[None]
        if box is not None:
            box_t = torch.as_tensor(box, dtype=torch.float, device=self.device)
            boxes = self._to_model_coords(box_t.reshape(-1, 2, 2), normalize_coords)
        if mask_input is not None:
            masks_in = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)
            if masks_in.ndim == 3:
                masks_in = masks_in[None]

        masks, iou, low_res = self._predict(coords, labels, boxes, masks_in, multimask_output, return_logits)
        # as upstream, binary masks come back as float32 0/1 arrays
        return (
            masks.squeeze(0).float().cpu().numpy(),
            iou.squeeze(0).float().cpu().numpy(),
            low_res.squeeze(0).float().cpu().numpy(),
        )

    @torch.no_grad()
    def _predict(
        self,
        coords: Optional[torch.Tensor],
        labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor],
        mask_input: Optional[torch.Tensor],
        multimask_output: bool,
        return_logits: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts in model pixels (B x N x 2 / B x N, boxes B x 2 x 2) -> masks at the original
        size, IoU predictions, clamped low-res logits."""
        points = None if coords is None else (coords, labels)
        if boxes is not None:
            # a box is two labelled corner points (2, 3) placed before the clicks
            corner_labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).repeat(boxes.shape[0], 1)
            if points is None:
                points = (boxes, corner_labels)
            else:
                points = (torch.cat([boxes, points[0]], dim=1), torch.cat([corner_labels, points[1]], dim=1))

        prompt_encoder = self.model.sam_prompt_encoder
        sparse, dense = prompt_encoder(points=points, boxes=None, masks=mask_input)
        several_prompts = points is not None and points[0].shape[0] > 1
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=self._features["image_embed"],
            image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=several_prompts,
            high_res_features=self._features["high_res_feats"],
        )
        masks = F.interpolate(low_res.float(), self._orig_hw, mode="bilinear", align_corners=False)
        low_res = torch.clamp(low_res, -LOW_RES_LOGIT_CLAMP, LOW_RES_LOGIT_CLAMP)
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, iou, low_res
