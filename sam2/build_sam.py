"""Build a SAM2.1 image model from a Hydra config and (optionally) an official checkpoint.

Configs are plain YAML files read with OmegaConf (no global Hydra state, so this works from
any working directory and inside other Hydra applications); ``_target_`` nodes are
instantiated with ``hydra.utils.instantiate``. Official SAM2.1 configs work too: their
video-only entries are dropped with one log line.
"""

import logging
import os
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from safe_io import load_torch_file
from sam2.modeling.sam2_base import SAM2Base

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
CHECKPOINT_README = PACKAGE_DIR / "checkpoints" / "README.md"

# SAM2Base options of upstream's video model that the image path does not use
VIDEO_ONLY_MODEL_KEYS = frozenset(
    {
        "memory_attention",
        "memory_encoder",
        "num_maskmem",
        "sigmoid_scale_for_mem_enc",
        "sigmoid_bias_for_mem_enc",
        "binarize_mask_from_pts_for_mem_enc",
        "use_mask_input_as_output_without_sam",
        "max_cond_frames_in_attn",
        "multimask_output_in_sam",
        "multimask_min_pt_num",
        "multimask_max_pt_num",
        "multimask_output_for_tracking",
        "memory_temporal_stride_for_eval",
        "non_overlap_masks_for_mem_enc",
        "use_obj_ptrs_in_encoder",
        "max_obj_ptrs_in_encoder",
        "add_tpos_enc_to_obj_ptrs",
        "proj_tpos_enc_in_obj_ptrs",
        "use_signed_tpos_enc_to_obj_ptrs",
        "only_obj_ptrs_in_the_past_for_eval",
        "fixed_no_obj_ptr",
        "soft_no_obj_ptr",
        "use_mlp_for_obj_ptr_proj",
        "no_obj_embed_spatial",
        "compile_image_encoder",
        "fill_hole_area",
    }
)

# top-level state-dict groups of upstream's video model (absent from ours)
VIDEO_ONLY_STATE_GROUPS = frozenset(
    {
        "memory_attention",
        "memory_encoder",
        "maskmem_tpos_enc",
        "no_mem_pos_enc",
        "no_obj_ptr",
        "no_obj_embed_spatial",
        "obj_ptr_proj",
        "obj_ptr_tpos_proj",
        "mask_downsample",
    }
)

# the same decoder post-processing defaults as upstream's build_sam2
POSTPROCESSING_OVERRIDES = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
)

# (trunk embed_dim, number of Hiera blocks) -> model name, to explain size mismatches
KNOWN_TRUNKS = {(96, 12): "hiera_t", (96, 16): "hiera_s", (112, 24): "hiera_b+", (144, 48): "hiera_l"}

DECODER1, DECODER2 = "sam_mask_decoder.", "sam_mask_decoder2."
_ABSENT = object()


class ConfigNotFoundError(FileNotFoundError):
    """The config file / name given to build_sam2 does not exist."""


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint file cannot be loaded into the model (unreadable, wrong format, or keys/shapes
    that do not match the config)."""


def packaged_configs() -> List[str]:
    """Names of the configs shipped with the package, e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``."""
    return sorted(p.relative_to(PACKAGE_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml"))


def resolve_config_path(config_file: Union[str, os.PathLike]) -> Path:
    """A YAML path (absolute or relative to the working directory), a packaged name
    (``configs/sam2.1/sam2.1_hiera_t.yaml``, with or without ``.yaml``) or a short name
    (``sam2.1_hiera_t``) -> the YAML file."""
    name = str(config_file)
    with_ext = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    candidates = [Path(name), Path(with_ext), PACKAGE_DIR / with_ext]
    # the README's "./sam2/configs/..." also works from a directory that lacks it
    for prefix in ("./sam2/", "sam2/"):
        if with_ext.startswith(prefix):
            candidates.append(PACKAGE_DIR / with_ext[len(prefix):])
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    short = Path(with_ext).name
    matches = sorted(CONFIG_DIR.rglob(short))
    if len(matches) == 1:
        return matches[0]
    raise ConfigNotFoundError(
        f"SAM2 config {name!r} not found (looked for it as a file, relative to {PACKAGE_DIR}, and as a short "
        f"name under {CONFIG_DIR}). Pass a YAML path or one of: {', '.join(packaged_configs())}"
    )


def _apply_overrides(cfg: DictConfig, overrides: Iterable[str]) -> None:
    """Apply Hydra command-line style overrides (``key=v``, ``+key=v``, ``++key=v``, ``~key``)."""
    overrides = list(overrides)
    if not overrides:
        return
    for override in OverridesParser.create().parse_overrides(overrides=overrides):
        key = override.key_or_group
        exists = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT
        if override.is_delete():
            if not exists:
                raise KeyError(f"override ~{key}: no such key in the config")
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            del parent[leaf]
        elif override.is_add() and exists:
            raise KeyError(f"override +{key}: key already exists (use ++{key}=... to force)")
        elif not (override.is_add() or override.is_force_add()) and not exists:
            raise KeyError(f"override {key}=...: no such key in the config (use ++{key}=... to add it)")
        else:
            OmegaConf.update(cfg, key, override.value(), merge=True, force_add=True)


def _drop_video_only_entries(model_cfg: DictConfig) -> None:
    dropped = sorted(k for k in list(model_cfg.keys()) if k in VIDEO_ONLY_MODEL_KEYS)
    for key in dropped:
        del model_cfg[key]
    if dropped:
        logger.info("SAM2 config: ignoring %d video-only entries (%s)", len(dropped), ", ".join(dropped))


def load_config(
    config_file: Union[str, os.PathLike],
    overrides: Sequence[str] = (),
    image_size: Optional[int] = None,
) -> DictConfig:
    """Read a config, apply overrides and ``image_size``, drop video-only entries -> the ``model`` node."""
    path = resolve_config_path(config_file)
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig) or "model" not in cfg:
        raise ValueError(f"SAM2 config {path} has no top-level 'model' node")
    _apply_overrides(cfg, overrides)
    if image_size is not None:
        if int(image_size) != image_size or image_size <= 0 or image_size % 32 != 0:
            raise ValueError(f"image_size must be a positive multiple of 32 (256, 512, 1024, ...), got {image_size}")
        cfg.model.image_size = int(image_size)
    OmegaConf.resolve(cfg)
    _drop_video_only_entries(cfg.model)
    return cfg.model


def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("CUDA is not available: building SAM2 on the CPU instead", stacklevel=3)
        device = torch.device("cpu")
    return device


def build_sam2(
    config_file: Union[str, os.PathLike],
    ckpt_path: Optional[Union[str, os.PathLike]] = None,
    device: Union[str, torch.device] = "cuda",
    mode: str = "eval",
    hydra_overrides_extra: Sequence[str] = (),
    apply_postprocessing: bool = True,
    image_size: Optional[int] = None,
) -> SAM2Base:
    """Build a SAM2.1 image model.

    Args:
      config_file: YAML path, packaged name (``configs/sam2.1/sam2.1_hiera_t.yaml``) or short
        name (``sam2.1_hiera_t``).
      ckpt_path: official SAM2.1 checkpoint (``{"model": state_dict}`` or a bare state dict);
        None -> deterministic random init (seed 0, the global RNG is left untouched).
      device: "cuda" falls back to the CPU with a warning when CUDA is absent.
      mode: "eval" or "train".
      hydra_overrides_extra: Hydra-style overrides, e.g. ``("++model.image_size=512",)``.
      apply_postprocessing: upstream's decoder post-processing defaults (dynamic multimask
        fallback via stability, delta 0.05, threshold 0.98).
      image_size: model input size S (multiple of 32), replacing the config's 1024.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"SAM2 checkpoint {str(ckpt_path)!r} not found. Download the official SAM2.1 checkpoint for this "
            f"config and place it as described in {CHECKPOINT_README}"
        )
    overrides = list(hydra_overrides_extra)
    if apply_postprocessing:
        overrides += POSTPROCESSING_OVERRIDES
    model_cfg = load_config(config_file, overrides, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = instantiate(model_cfg, _recursive_=True)
    if not isinstance(model, SAM2Base):
        raise TypeError(f"config {config_file!r} built a {type(model).__name__}, expected SAM2Base")
    if ckpt_path is not None:
        load_checkpoint(model, ckpt_path)
    model = model.to(_resolve_device(device))
    model.train(mode == "train")
    return model


def _read_state_dict(ckpt_path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """The state dict of an official checkpoint; ``safe_io.CheckpointFileError`` when the file is unreadable."""
    obj = load_torch_file(ckpt_path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(
            f"SAM2 checkpoint {str(ckpt_path)!r} holds neither {{'model': state_dict}} nor a state dict of tensors"
        )
    return obj


def _trunk_signature(keys_to_shapes: Dict[str, torch.Size]) -> str:
    """Describe a state dict's Hiera trunk, e.g. 'hiera_l (embed_dim 144, 48 blocks)'."""
    pos = keys_to_shapes.get("image_encoder.trunk.pos_embed")
    prefix = "image_encoder.trunk.blocks."
    blocks = {k[len(prefix):].split(".")[0] for k in keys_to_shapes if k.startswith(prefix)}
    if pos is None or not blocks:
        return "no Hiera trunk"
    embed_dim, depth = int(pos[1]), len(blocks)
    name = KNOWN_TRUNKS.get((embed_dim, depth), "an unknown size")
    return f"{name} (embed_dim {embed_dim}, {depth} blocks)"


def _summarise(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_checkpoint(model: SAM2Base, ckpt_path: Union[str, os.PathLike]) -> None:
    """Load an official SAM2.1 checkpoint (or our own full save) into ``model``.

    Video-only groups are skipped (one log line). Decoder 2 is loaded when the file has it,
    otherwise it becomes a copy of the loaded decoder 1. Anything else that does not match
    raises :class:`CheckpointError` naming the keys.
    """
    state = _read_state_dict(ckpt_path)
    video = [k for k in state if k.split(".")[0] in VIDEO_ONLY_STATE_GROUPS]
    if video:
        groups = sorted({k.split(".")[0] for k in video})
        logger.info("SAM2 checkpoint: skipping %d video-only tensors (%s)", len(video), ", ".join(groups))
    state = {k: v for k, v in state.items() if k.split(".")[0] not in VIDEO_ONLY_STATE_GROUPS}
    if not any(k.startswith(DECODER2) for k in state):
        state.update({DECODER2 + k[len(DECODER1):]: v for k, v in state.items() if k.startswith(DECODER1)})

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_summarise(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_summarise(unexpected)}")
        if mismatched:
            details = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in sorted(mismatched)]
            problems.append("shape mismatches: " + _summarise(details, limit=4))
        ckpt_trunk = _trunk_signature({k: v.shape for k, v in state.items()})
        model_trunk = _trunk_signature({k: v.shape for k, v in expected.items()})
        cause = (
            f"the checkpoint is {ckpt_trunk} but the config builds {model_trunk}: config and checkpoint are of "
            "different model sizes; pick the matching config (see sam2/checkpoints/README.md)"
            if ckpt_trunk != model_trunk
            else "the checkpoint does not come from an official SAM2.1 image+video model of this size"
        )
        raise CheckpointError(f"cannot load SAM2 checkpoint {str(ckpt_path)!r}: " + "; ".join(problems) + f". Likely cause: {cause}.")
    model.load_state_dict(state, strict=True)
    logger.info("SAM2 checkpoint %s loaded", ckpt_path)
