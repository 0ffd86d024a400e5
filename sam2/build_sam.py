"""Build a SAM2.1 image model from a Hydra config and (optionally) an official checkpoint.

Configs are plain YAML files read with OmegaConf (no global Hydra state, so this works from
any working directory and inside other Hydra applications); ``_target_`` nodes are
instantiated with ``hydra.utils.instantiate``, after checking that each names one of this
package's model classes (``SAM2_TARGETS``: a ``_target_`` may name any callable). Official
SAM2.1 configs work too: their video-only entries are dropped with one log line.
Checkpoints are read with ``torch.load(..., weights_only=True)`` (``load_weights``).

Errors: ``ConfigError`` (``ConfigNotFoundError``, ``ConfigFileError``) for the config,
``CheckpointError`` (``CheckpointReadError`` when the file cannot be unpickled at all) for
the checkpoint.
"""

import logging
import os
import warnings
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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

# the only classes a config may build (its ``_target_``s): this package's image model and its parts
MODEL_TARGET = "sam2.modeling.sam2_base.SAM2Base"
SAM2_TARGETS = frozenset(
    {
        MODEL_TARGET,
        "sam2.modeling.backbones.image_encoder.ImageEncoder",
        "sam2.modeling.backbones.image_encoder.FpnNeck",
        "sam2.modeling.backbones.hieradet.Hiera",
        "sam2.modeling.position_encoding.PositionEmbeddingSine",
    }
)
# what torch.save writes: a zip archive (current format) or a pickle (legacy format)
CHECKPOINT_MAGIC = {b"PK\x03\x04": "a zip archive", b"\x80": "a pickle"}


class ConfigError(ValueError):
    """The config given to build_sam2 cannot be used; the message names it and says why."""


class ConfigNotFoundError(ConfigError, FileNotFoundError):
    """The config file / name given to build_sam2 does not exist."""


class ConfigFileError(ConfigError):
    """The config file exists but is no SAM2 config: not YAML, no ``model`` node, a ``_target_``
    outside ``SAM2_TARGETS``, or options the classes do not take."""


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint file cannot be loaded into the model (unreadable, wrong format, or keys/shapes
    that do not match the config)."""


class CheckpointReadError(CheckpointError):
    """``torch.load(path, weights_only=True)`` failed: the file is damaged, is no PyTorch file, or
    holds pickled code (refused). ``path`` is the file, ``cause`` what torch raised (also chained),
    for a caller that wants to say which of these it is."""

    def __init__(self, path: Union[str, os.PathLike], cause: BaseException) -> None:
        super().__init__(
            f"SAM2 checkpoint {str(path)!r} cannot be loaded with torch.load(weights_only=True) "
            f"({type(cause).__name__}): it is damaged, no PyTorch checkpoint, or holds pickled code"
        )
        self.path = Path(path)
        self.cause = cause


def packaged_configs() -> List[str]:
    """Names of the configs shipped with the package, e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``."""
    return sorted(p.relative_to(PACKAGE_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml"))


def _config_hint() -> str:
    return "pass a SAM2 YAML config: a path, or one of " + ", ".join(Path(p).stem for p in packaged_configs())


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


def _read_config_file(path: Path) -> DictConfig:
    """The YAML mapping in ``path``, with a top-level ``model`` node; ``ConfigFileError`` saying what the file is
    instead (a checkpoint, something else than YAML, YAML of something else)."""
    with open(path, "rb") as f:
        head = f.read(4)
    kind = next((what for magic, what in CHECKPOINT_MAGIC.items() if head.startswith(magic)), None)
    if kind is not None:
        raise ConfigFileError(f"SAM2 config {path} is a PyTorch checkpoint ({kind}), not a YAML config; were the "
                              f"config and the checkpoint swapped? {_config_hint()}")
    try:
        cfg = OmegaConf.load(path)
    except (ValueError, yaml.YAMLError, OmegaConfBaseException) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise ConfigFileError(f"SAM2 config {path} is not a YAML file ({reason}); {_config_hint()}") from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg:
        holds = f"keys {', '.join(map(str, list(cfg.keys())[:5]))}" if isinstance(cfg, DictConfig) and cfg else (
            "a list" if not isinstance(cfg, DictConfig) else "nothing")
        raise ConfigFileError(f"SAM2 config {path} has no top-level 'model' node (it holds {holds}), so it is no "
                              f"SAM2 config; {_config_hint()}")
    return cfg


def _targets(node: object) -> Iterator[str]:
    """Every ``_target_`` value in a plain (``to_container``) config tree."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield str(node["_target_"])
        children = node.values()
    else:
        children = node if isinstance(node, list) else ()
    for child in children:
        yield from _targets(child)


def _check_targets(model_cfg: DictConfig, path: Path) -> None:
    """Refuse, before anything is built, a model node that is not a SAM2Base or builds other classes than ours."""
    if model_cfg.get("_target_") != MODEL_TARGET:
        raise ConfigFileError(f"SAM2 config {path}: its model node builds {model_cfg.get('_target_')!r}, not "
                              f"{MODEL_TARGET}; {_config_hint()}")
    foreign = sorted(set(_targets(OmegaConf.to_container(model_cfg, resolve=True))) - SAM2_TARGETS)
    if foreign:
        raise ConfigFileError(f"SAM2 config {path} asks to build {', '.join(foreign)}, which is no SAM2 image-model "
                              "class; it is refused unbuilt (a _target_ can name any function). Only these are "
                              f"built: {', '.join(sorted(SAM2_TARGETS))}")


def load_config(
    config_file: Union[str, os.PathLike],
    overrides: Sequence[str] = (),
    image_size: Optional[int] = None,
) -> DictConfig:
    """Read a config, apply overrides and ``image_size``, drop video-only entries -> the ``model`` node, whose
    ``_target_``s are all in ``SAM2_TARGETS`` (else ``ConfigFileError``)."""
    path = resolve_config_path(config_file)
    cfg = _read_config_file(path)
    _apply_overrides(cfg, overrides)
    if image_size is not None:
        if int(image_size) != image_size or image_size <= 0 or image_size % 32 != 0:
            raise ValueError(f"image_size must be a positive multiple of 32 (256, 512, 1024, ...), got {image_size}")
        cfg.model.image_size = int(image_size)
    OmegaConf.resolve(cfg)
    _drop_video_only_entries(cfg.model)
    _check_targets(cfg.model, path)
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
        try:
            model = instantiate(model_cfg, _recursive_=True)
        except InstantiationException as err:  # e.g. an option one of our classes does not take
            reason = " ".join(str(err).split())[:240]
            raise ConfigFileError(f"SAM2 config {config_file}: the model cannot be built from it ({reason})") from None
    if ckpt_path is not None:
        load_checkpoint(model, ckpt_path)
    model = model.to(_resolve_device(device))
    model.train(mode == "train")
    return model


def load_weights(ckpt_path: Union[str, os.PathLike]) -> object:
    """``torch.load(ckpt_path, weights_only=True)`` onto the CPU: tensors and containers only, never code.
    Any failure is a ``CheckpointReadError`` (what torch raised is its ``cause``)."""
    try:
        with warnings.catch_warnings():  # a plain pickle of protocol > 2 makes torch warn before it refuses it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - garbage makes the unpickler fail in many ways
        raise CheckpointReadError(ckpt_path, err) from err


def _read_state_dict(ckpt_path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """The state dict of an official checkpoint; ``CheckpointReadError`` when the file cannot be loaded."""
    obj = load_weights(ckpt_path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(
            f"SAM2 checkpoint {str(ckpt_path)!r} holds neither {{'model': state_dict}} nor a state dict of tensors"
        )
    return obj


TRUNK_POS_EMBED = "image_encoder.trunk.pos_embed"


def trunk_size(shapes: Mapping[str, Sequence[int]]) -> Optional[Tuple[int, int]]:
    """(embed_dim, number of Hiera blocks) of the trunk in a key -> shape mapping (keys may carry a prefix such as
    ``sam.``), or None when it holds no trunk."""
    pos = next((k for k in shapes if k.endswith(TRUNK_POS_EMBED)), None)
    if pos is None:
        return None
    prefix = pos[: -len("pos_embed")] + "blocks."
    blocks = {k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)}
    return int(shapes[pos][1]), len(blocks)


def _describe_trunk(size: Optional[Tuple[int, int]]) -> str:
    """e.g. 'hiera_l (embed_dim 144, 48 blocks)'."""
    if size is None:
        return "no Hiera trunk"
    return f"{KNOWN_TRUNKS.get(size, 'a Hiera of unknown size')} (embed_dim {size[0]}, {size[1]} blocks)"


def _some(keys: Sequence[str], count: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


def state_mismatch(found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]]) -> Optional[str]:
    """None when the state dict a file holds (key -> shape, ``found``) fits a model's (``expected``); otherwise one
    short line: how many keys are missing, unexpected and of another shape, with a few names each, and, when the
    two Hiera trunks differ, which sizes they are and the packaged config of the file's size.

    The one summary of "this file is another model" (the full key lists run to hundreds of lines).
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or reshaped):
        return None
    parts = [f"{len(missing)} keys missing (e.g. {_some(missing)})"] if missing else []
    parts += [f"{len(unexpected)} unexpected (e.g. {_some(unexpected)})"] if unexpected else []
    if reshaped:
        first = sorted(reshaped)[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {first}: file {tuple(found[first])}, "
                     f"model {tuple(expected[first])})")
    file_trunk, model_trunk = trunk_size(found), trunk_size(expected)
    if file_trunk == model_trunk:
        return "; ".join(parts)
    hint = (f"; use the config of the file's size (sam2.1_{KNOWN_TRUNKS[file_trunk]})" if file_trunk in KNOWN_TRUNKS
            else "")
    return (f"{'; '.join(parts)}. The file holds {_describe_trunk(file_trunk)}, the model is "
            f"{_describe_trunk(model_trunk)}: different model sizes{hint}")


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

    found = {k: v.shape for k, v in state.items()}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    mismatch = state_mismatch(found, expected)
    if mismatch:
        same_size = trunk_size(found) == trunk_size(expected)
        cause = ". It does not come from an official SAM2.1 image+video model of this size" if same_size else ""
        raise CheckpointError(f"cannot load SAM2 checkpoint {str(ckpt_path)!r}: {mismatch}{cause}")
    model.load_state_dict(state, strict=True)
    logger.info("SAM2 checkpoint %s loaded", ckpt_path)
