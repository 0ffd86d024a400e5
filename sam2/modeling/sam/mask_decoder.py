"""SAM2 mask decoder: output tokens + prompt tokens run through the two-way transformer against
the image embedding; each mask token becomes a dynamic 1x1 conv over the upscaled embedding."""

from typing import List, Optional, Tuple, Type

import torch
from torch import nn

from sam2.modeling.sam2_utils import MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    """Predicts mask logits at 4x the image-embedding resolution (S/4), their IoU, and an
    object-presence logit.

    Token 0 is the single-mask output, tokens 1..num_multimask_outputs the ambiguity-aware
    multi-mask outputs. With ``use_high_res_features`` the stride-4 and stride-8 backbone
    features (already projected by ``conv_s0`` / ``conv_s1``) are added during upscaling.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = False,
        iou_prediction_use_sigmoid: bool = False,
        dynamic_multimask_via_stability: bool = False,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
        pred_obj_scores: bool = False,
        pred_obj_scores_mlp: bool = False,
        use_multimask_token_for_obj_ptr: bool = False,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1

        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr

        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1, stride=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1, stride=1)

        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth,
            sigmoid_output=iou_prediction_use_sigmoid,
        )
        if pred_obj_scores:
            self.pred_obj_score_head = (
                MLP(transformer_dim, transformer_dim, 1, 3) if pred_obj_scores_mlp else nn.Linear(transformer_dim, 1)
            )

        # single-mask output falls back to the best multi-mask output when unstable (eval only)
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: Optional[List[torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict masks for a batch of prompts.

        Args:
          image_embeddings: B x C x H x W (or 1 x C x H x W with ``repeat_image``).
          image_pe: 1 x C x H x W (``PromptEncoder.get_dense_pe()``).
          sparse_prompt_embeddings: B x K x C; dense_prompt_embeddings: B x C x H x W.
          multimask_output: return tokens 1..3 instead of token 0.
          repeat_image: repeat one image embedding for all B prompts.
          high_res_features: [B x C/8 x 4H x 4W, B x C/4 x 2H x 2W] when ``use_high_res_features``.
        Returns:
          masks B x M x 4H x 4W, iou_pred B x M, sam_tokens_out B x M' x C, object_score_logits B x 1.
        """
        masks, iou_pred, mask_tokens_out, object_score_logits = self.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings,
            repeat_image=repeat_image,
            high_res_features=high_res_features,
        )
        if multimask_output:
            masks, iou_pred = masks[:, 1:], iou_pred[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou_pred = self._dynamic_multimask_via_stability(masks, iou_pred)
        else:
            masks, iou_pred = masks[:, 0:1], iou_pred[:, 0:1]

        if multimask_output and self.use_multimask_token_for_obj_ptr:
            sam_tokens_out = mask_tokens_out[:, 1:]
        else:
            sam_tokens_out = mask_tokens_out[:, 0:1]
        return masks, iou_pred, sam_tokens_out, object_score_logits

    def _output_tokens(self) -> torch.Tensor:
        """[obj_score,] iou, mask tokens -> T x C."""
        tokens = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            tokens.insert(0, self.obj_score_token.weight)
        return torch.cat(tokens, dim=0)

    def _upscale(self, src: torch.Tensor, high_res_features: Optional[List[torch.Tensor]]) -> torch.Tensor:
        """B x C x H x W -> B x C/8 x 4H x 4W."""
        if not self.use_high_res_features:
            return self.output_upscaling(src)
        if high_res_features is None:
            raise ValueError("this decoder uses high-resolution features; pass high_res_features=[s0, s1]")
        deconv1, norm1, act1, deconv2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        x = act1(norm1(deconv1(src) + feat_s1))
        return act2(deconv2(x) + feat_s0)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        repeat_image: bool,
        high_res_features: Optional[List[torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All tokens' outputs: masks B x 4 x 4H x 4W, iou_pred B x 4, mask tokens B x 4 x C,
        object_score_logits B x 1."""
        first = 1 if self.pred_obj_scores else 0  # position of the IoU token
        output_tokens = self._output_tokens().unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        if repeat_image:
            src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
        else:
            if image_embeddings.shape[0] != tokens.shape[0]:
                raise ValueError(
                    f"{image_embeddings.shape[0]} image embeddings for {tokens.shape[0]} prompts; "
                    "pass repeat_image=True to share one image"
                )
            src = image_embeddings
        src = src + dense_prompt_embeddings
        if image_pe.size(0) != 1:
            raise ValueError("image_pe must have batch size 1 (PromptEncoder.get_dense_pe())")
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, first, :]
        mask_tokens_out = hs[:, first + 1 : first + 1 + self.num_mask_tokens, :]

        upscaled = self._upscale(src.transpose(1, 2).view(b, c, h, w), high_res_features)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)

        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(hs[:, 0, :])
        else:
            # no object head: "object present" with certainty (sigmoid(10) ~ 1)
            object_score_logits = 10.0 * iou_pred.new_ones(iou_pred.shape[0], 1)
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def _get_stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """IoU between the masks thresholded at +delta and -delta: B x M x H x W -> B x M."""
        flat = mask_logits.flatten(-2)
        delta = self.dynamic_multimask_stability_delta
        inner = (flat > delta).sum(dim=-1).float()
        outer = (flat > -delta).sum(dim=-1).float()
        return torch.where(outer > 0, inner / outer, 1.0)

    def _dynamic_multimask_via_stability(
        self, all_mask_logits: torch.Tensor, all_iou_scores: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token 0's mask where it is stable, else the multi-mask output with the best predicted IoU."""
        batch = torch.arange(all_iou_scores.size(0), device=all_iou_scores.device)
        best = torch.argmax(all_iou_scores[:, 1:], dim=-1) + 1
        best_logits = all_mask_logits[batch, best].unsqueeze(1)
        best_iou = all_iou_scores[batch, best].unsqueeze(1)

        single_logits = all_mask_logits[:, 0:1]
        single_iou = all_iou_scores[:, 0:1]
        stable = self._get_stability_scores(single_logits) >= self.dynamic_multimask_stability_thresh
        logits = torch.where(stable[..., None, None].expand_as(single_logits), single_logits, best_logits)
        iou = torch.where(stable.expand_as(single_iou), single_iou, best_iou)
        return logits, iou
