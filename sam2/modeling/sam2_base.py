"""SAM2Base, image path only: image encoder + prompt encoder + two mask decoders.

The video machinery of upstream SAM2 (memory attention, memory encoder, object pointers) is not
built. A single image is handled as upstream handles a first frame without memory: the learned
``no_mem_embed`` is added to the lowest-resolution features (``directly_add_no_mem_embed``).
"""

from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.init import trunc_normal_

from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer


class SAM2Base(nn.Module):
    """SAM2.1 for single images, with two mask decoders.

    ``sam_mask_decoder`` is decoder 1 (the checkpoint's decoder); ``sam_mask_decoder2`` is
    decoder 2, built as a copy of decoder 1 (``build_sam2`` re-copies it after loading an
    official checkpoint, which has one decoder only).

    Args:
      image_encoder: ``ImageEncoder`` (Hiera trunk + FPN neck).
      image_size: model input size S (a multiple of 32).
      backbone_stride: stride of the image embedding (16).
      directly_add_no_mem_embed: add ``no_mem_embed`` to the image embedding.
      use_high_res_features_in_sam: feed the stride-4/8 features to the decoder.
      iou_prediction_use_sigmoid, pred_obj_scores, pred_obj_scores_mlp,
      use_multimask_token_for_obj_ptr: decoder options (see ``MaskDecoder``).
      sam_mask_decoder_extra_args: extra ``MaskDecoder`` kwargs (post-processing options).
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        image_size: int = 512,
        backbone_stride: int = 16,
        directly_add_no_mem_embed: bool = False,
        use_high_res_features_in_sam: bool = False,
        iou_prediction_use_sigmoid: bool = False,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        use_multimask_token_for_obj_ptr: bool = False,
        sam_mask_decoder_extra_args: Optional[dict] = None,
    ) -> None:
        super().__init__()
        if image_size % 32 != 0 or image_size <= 0:
            raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
        self.image_encoder = image_encoder
        self.hidden_dim = image_encoder.neck.d_model
        self.image_size = int(image_size)
        self.backbone_stride = backbone_stride
        self.use_high_res_features_in_sam = use_high_res_features_in_sam
        self.num_feature_levels = 3 if use_high_res_features_in_sam else 1
        self.directly_add_no_mem_embed = directly_add_no_mem_embed
        self.iou_prediction_use_sigmoid = iou_prediction_use_sigmoid
        self.pred_obj_scores = pred_obj_scores
        self.pred_obj_scores_mlp = pred_obj_scores_mlp
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr
        self.sam_mask_decoder_extra_args = dict(sam_mask_decoder_extra_args or {})

        # "no memory" token: on a single image it is simply added to the image embedding
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, self.hidden_dim))
        trunc_normal_(self.no_mem_embed, std=0.02)

        self.sam_prompt_embed_dim = self.hidden_dim
        self.sam_image_embedding_size = self.image_size // self.backbone_stride
        embedding_hw = (self.sam_image_embedding_size, self.sam_image_embedding_size)
        self.sam_prompt_encoder = PromptEncoder(
            embed_dim=self.sam_prompt_embed_dim,
            image_embedding_size=embedding_hw,
            input_image_size=(self.image_size, self.image_size),
            mask_in_chans=16,
        )
        self.sam_mask_decoder = self._build_mask_decoder()
        self.sam_mask_decoder2 = self._build_mask_decoder()
        self.sam_mask_decoder2.load_state_dict(self.sam_mask_decoder.state_dict())

    def _build_mask_decoder(self) -> MaskDecoder:
        return MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=self.sam_prompt_embed_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=self.sam_prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            use_high_res_features=self.use_high_res_features_in_sam,
            iou_prediction_use_sigmoid=self.iou_prediction_use_sigmoid,
            pred_obj_scores=self.pred_obj_scores,
            pred_obj_scores_mlp=self.pred_obj_scores_mlp,
            use_multimask_token_for_obj_ptr=self.use_multimask_token_for_obj_ptr,
            **self.sam_mask_decoder_extra_args,
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, *args, **kwargs):
        raise NotImplementedError(
            "SAM2Base has no single forward; use encode_image() then sam_prompt_encoder / "
            "sam_mask_decoder(2), or SAM2ImagePredictor"
        )

    def encode_backbone(self, images: torch.Tensor) -> Dict[str, object]:
        """The one image-encoder pass, at any input size S that is a multiple of 32.

        No parameter depends on S (Hiera interpolates its position embedding to the input); only
        the prompt encoder's stored sizes and ``encode_image``'s check refer to ``image_size``.

        Args:
          images: B x 3 x S x S, ImageNet-normalised.
        Returns:
          dict(image_embed=B x 256 x S/16 x S/16 (``no_mem_embed`` added),
               backbone_fpn=the raw FPN levels [B x 256 x S/4 x S/4, B x 256 x S/8 x S/8,
               B x 256 x S/16 x S/16] (before conv_s0/conv_s1 and no_mem_embed)).
        """
        levels = self.image_encoder.features(images)
        image_embed = levels[-1]
        if self.directly_add_no_mem_embed:
            image_embed = image_embed + self.no_mem_embed.view(1, -1, 1, 1)
        return {"image_embed": image_embed, "backbone_fpn": levels}

    def project_high_res(self, backbone_fpn: List[torch.Tensor], decoder: Optional[nn.Module] = None) -> List[torch.Tensor]:
        """FPN levels 0/1 through ``decoder``'s own conv_s0/conv_s1 (default: decoder 1).

        Args:
          backbone_fpn: raw levels [B x 256 x S/4 x S/4, B x 256 x S/8 x S/8, ...].
          decoder: the ``MaskDecoder`` the features are meant for.
        Returns:
          [B x 32 x S/4 x S/4, B x 64 x S/8 x S/8], or [] when the decoder uses no
          high-resolution features.
        """
        if not self.use_high_res_features_in_sam:
            return []
        decoder = self.sam_mask_decoder if decoder is None else decoder
        return [decoder.conv_s0(backbone_fpn[0]), decoder.conv_s1(backbone_fpn[1])]

    def encode_image(self, images: torch.Tensor) -> Dict[str, object]:
        """The one image-encoder pass at the model's ``image_size``, projected for decoder 1
        (what the official predictor uses).

        Args:
          images: B x 3 x S x S, ImageNet-normalised, S = ``image_size``.
        Returns:
          ``encode_backbone``'s dict plus high_res_feats=[B x 32 x S/4 x S/4, B x 64 x S/8 x S/8]
          (decoder 1's conv_s0/conv_s1; the list is empty when the decoder uses no
          high-resolution features).
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"encode_image expects B x 3 x {self.image_size} x {self.image_size} images, got {tuple(images.shape)}"
            )
        out = self.encode_backbone(images)
        out["high_res_feats"] = self.project_high_res(out["backbone_fpn"])
        return out

    def forward_image(self, img_batch: torch.Tensor) -> Dict[str, object]:
        """Upstream-style backbone output (``vision_features``, ``vision_pos_enc``,
        ``backbone_fpn``), with levels 0/1 already projected by decoder 1's conv_s0/conv_s1.
        ``no_mem_embed`` is NOT added here (as upstream)."""
        out = self.image_encoder(img_batch)
        if self.use_high_res_features_in_sam:
            fpn = list(out["backbone_fpn"])
            fpn[:2] = self.project_high_res(fpn)
            out["backbone_fpn"] = fpn
        return out
