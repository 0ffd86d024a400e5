"""The trainer's command line: its flags, their checks, and the settings a resumed run must repeat.

``build_parser`` declares every flag (each strategy's own parameters come from the strategy registry);
``prepare_args`` applies --demo's defaults, resolves paths and checks every flag before anything is loaded or
written, returning the read-only ``Settings`` the rest of the program reads. ``resume_keys`` and ``LEGACY`` say
which settings a resumed run must repeat and what a setting absent from an older run folder means. Every problem
is a ``UsageError`` whose message names the flag or file; trainer.main turns it into one line, exit code 2.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from importlib import import_module
from pathlib import Path
from typing import Optional, Sequence, Tuple

import datasets_skin
import val
from active_learning_strategies import (ALL_UNLABELED, NO_FIRST_ROUND, ActiveLearningStrategyFactory, SelectionPlan,
                                        parse_first_round, parse_pool_size)
from label_studio_api import TOKEN_VARIABLE
from oracles import ORACLES
from proposal_costs import COST_MODES
from run_folder import run_dir_of
from sam_lora_image_encoder_prompt import lora_sam_misfit, prompt_mode_of

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL_CFG = "./sam2/configs/sam2.1/sam2.1_hiera_l.yaml"
DEFAULT_CHECKPOINT = "./sam2/checkpoints/sam2.1_hiera_large.pt"
DEMO_CHECKPOINT = REPO / "sam2" / "checkpoints" / "sam2.1_hiera_tiny.pt"
DEFAULT_LABEL_STUDIO_URL = "http://127.0.0.1:8080"
CHECKPOINT_HINT = "see sam2/checkpoints/README.md for where to download the official SAM2.1 checkpoints"
STRATEGIES = ActiveLearningStrategyFactory
PROMPT_DRAWS = ("per_image", "per_epoch")


class UsageError(Exception):
    """A problem with the command line or its inputs; the message names the flag or file (exit code 2)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def promptmode_flag(text: str) -> str:
    try:
        return prompt_mode_of(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_model_flags(model: argparse._ArgumentGroup) -> None:
    model.add_argument("--model_cfg", default=DEFAULT_MODEL_CFG,
                       help="SAM2.1 Hydra config (path, or short name such as sam2.1_hiera_t)")
    model.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                       help="official SAM2.1 checkpoint; 'none' = seeded random weights")
    model.add_argument("--module", default="sam_lora_image_encoder_prompt", help="Python module defining LoRA_Sam")
    model.add_argument("--rank", type=int, default=4, help="LoRA rank")
    model.add_argument("--lora_width", default="input", choices=["input", "output"], help="LoRA q/v updates at Hiera "
                       "stage changes: input = as wide as the block's input (the reference code); output = all of q/v")
    model.add_argument("--lora_ckpt", default=None, help="LoRA-only weights to start from (save_lora_parameters)")
    model.add_argument("--img_size", type=int, default=512, help="training/validation resolution (multiple of 32)")
    model.add_argument("--num_classes", type=int, default=1, help="foreground classes (the loss sees num_classes+1); "
                       "1: masks are read as lesion / background")
    model.add_argument("--promptmode", default="none", type=promptmode_flag, metavar="{none,point,box,point-box,0}",
                       help="none (or the reference's 0): no prompts; else decoder 2 trains on prompts from decoder 1")
    model.add_argument("--prompt_draw", default="per_image", choices=PROMPT_DRAWS,
                       help="prompted modes: where each training image's random prompt point comes from. per_image: a "
                            "generator of its own, seeded by (seed, epoch, image), so a batch split across processes "
                            "draws the same; per_epoch: one generator per epoch drawn in batch order (how runs made "
                            "before per_image drew; one process only)")
    model.add_argument("--precision", default="float32", choices=["float32", "mixed"],
                       help="on CUDA. float32: training and validation in float32, pool scoring under fp16 autocast "
                            "(the reference code); mixed: all three under autocast (bf16 where supported, else fp16 "
                            "with the gradient scaler). On the CPU everything is float32")
    model.add_argument("--no_mem_embed", default="trainable", choices=["trainable", "frozen"],
                       help="SAM2's no-memory embedding (added to the image embedding): trained as in the reference "
                            "code, or kept at the checkpoint's value")


def add_cost_flags(cost: argparse._ArgumentGroup) -> None:
    cost.add_argument("--annotation_cost", default="pixels", choices=COST_MODES,
                      help="pixels: the proposal's Dice and the fraction of the photo's pixels to change (one more "
                           "encoder pass per selected image); clicks: also the clicks of RITM's simulated annotator "
                           "to IoU 0.85 and 0.90 (up to 20 decoder calls per image); none: nothing")
    cost.add_argument("--click_mask_input", action="store_true",
                      help="--annotation_cost clicks: each prediction gets the previous one as SAM2's mask prompt, "
                           "as RITM's models do (off: the run never trains that path, and the Label Studio backend "
                           "answers a person's clicks without it)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer.py", formatter_class=_HelpFormatter, allow_abbrev=False,
                                description="Cold-start active learning with SAM2: select, annotate, fine-tune, "
                                            "validate.")
    data = p.add_argument_group("data and run folder")
    data.add_argument("--data_root", default=None, help="dataset root (Training_Data/, Training_GroundTruth/, "
                      "Validation_Data/, Validation_GroundTruth/, or the official ISIC-2017 folder names)")
    data.add_argument("--output", default=None, help="output folder; the run goes to OUTPUT/Skin_{img_size} "
                      "(default ./output, ./output_demo with --demo)")
    data.add_argument("--gpu", default="0", help="CUDA device index; without CUDA the run uses the CPU")
    data.add_argument("--seed", type=int, default=1337, help="seed of pools, selection, init, order")
    data.add_argument("--deterministic", action="store_true", help="deterministic (slower) CUDA kernels")
    data.add_argument("--num_workers", type=int, default=0,
                      help="DataLoader workers (0 keeps the decode-once image cache in this process)")
    data.add_argument("--decode", default="full", choices=["full", "draft"],
                      help="JPEG decoding before the resize to --img_size. full: decode at full size (the reference "
                           "code); draft: let the decoder downscale by 1/2..1/8, staying >= 2 x img_size (3-5x faster)")
    data.add_argument("--max_image_pixels", type=int, default=datasets_skin.DEFAULT_MAX_IMAGE_PIXELS, help="largest "
                      "image (width x height) read; larger headers are refused as possible decompression bombs")
    speed = p.add_argument_group("speed and memory only: none of these changes what is selected or learned")
    speed.add_argument("--score_batch_size", type=int, default=None,
                       help="images per pool-scoring batch (default: 16 on CUDA, --batch_size on the CPU)")
    speed.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing of the Hiera blocks "
                       "while training (less memory, ~1 extra encoder forward per step)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the image encoder's trunk")
    add_model_flags(p.add_argument_group("model"))
    al = p.add_argument_group("active learning")
    al.add_argument("--strategy", default="mask_difference", choices=STRATEGIES.available_strategies(),
                    help="how the pool is ranked")
    for parameter in STRATEGIES.all_parameters():
        al.add_argument(f"--{parameter.name}", type=parameter.type, default=parameter.default,
                        choices=parameter.choices, help=parameter.help)
    al.add_argument("--batch_size", type=int, default=4, help="images annotated per epoch, and mini-batch size")
    al.add_argument("--pool_size", type=parse_pool_size, default=10, help="random unlabeled candidates scored per "
                    "epoch; all: every unlabeled image (one or more encoder passes per image per epoch)")
    al.add_argument("--first_round", type=parse_first_round, default=NO_FIRST_ROUND, help="epoch 1 selects with this "
                    "strategy instead: NAME or NAME@POOL (e.g. typiclust@all; default pool: --pool_size)")
    al.add_argument("--oracle", default="ground_truth", choices=ORACLES,
                    help="how a selected image gets its mask. ground_truth: read the existing mask (simulation). "
                         "folder: images without a mask are unlabeled; each round writes the selection with the "
                         "model's proposal masks (and Label Studio's tasks) to OUTPUT/Skin_{img_size}/annotate/"
                         "round_NNN/ and stops; a person saves the masks there or in the dataset's mask folder, then "
                         "--resume continues. label_studio: the same round goes to the run's Label Studio project "
                         "through its API and comes back through it at --resume (or --wait)")
    al.add_argument("--accept_partial", action="store_true", help="a person's oracle, --resume: accept a round with "
                    "some masks missing (their images go back to the unlabeled pool)")
    al.add_argument("--label_studio_url", default=DEFAULT_LABEL_STUDIO_URL, help="--oracle label_studio: the server")
    al.add_argument("--label_studio_token_file", default=None, help="--oracle label_studio: a file holding your "
                    f"personal access token, readable by you alone (default: ${TOKEN_VARIABLE}); never a flag value")
    al.add_argument("--wait", action="store_true", help="--oracle label_studio: instead of stopping, wait until every "
                    "task of the round is annotated or skipped, then go on (skipped images go back to the pool)")
    al.add_argument("--label_studio_backend", default=None, metavar="URL", help="--oracle label_studio: connect "
                    "this ML backend (label_studio_backend.py) to the run's project, interactive")
    al.add_argument("--label_budget", type=int, default=None, help="stop once this many images are labeled (the "
                    "last selection is cut to reach it exactly, then trained on and validated); default: no budget")
    add_cost_flags(p.add_argument_group("annotation cost: what correcting each selected image's proposal costs, "
                                        "from the model that selected it (al_selection.csv, metrics.csv; "
                                        "docs/annotation_cost.md); nothing selected or learned changes"))
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--base_lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    opt.add_argument("--max_epochs", type=int, default=50, help="active-learning epochs (one selection each)")
    opt.add_argument("--dice_weight", type=float, default=0.8, help="loss = (1-w)*CE + w*Dice per decoder")
    opt.add_argument("--train_on", default="selected", choices=["selected", "labeled"],
                     help="selected: each epoch trains on the images selected in it, one optimiser step (the reference "
                          "code); labeled: on all images labeled so far")
    run = p.add_argument_group("validation, checkpoints, run control")
    run.add_argument("--val_every", type=int, default=1, help="validate every N epochs (and at the last)")
    run.add_argument("--val_limit", type=int, default=None, help="validate on the first N images (by name) only")
    run.add_argument("--val_protocol", default="isic", choices=["isic", "reference"], help="checkpoint choice. isic: "
                     "hard masks at the photo's size, every image; reference: soft Dice at --img_size on the first 20")
    run.add_argument("--keep_best", default="newest", choices=["newest", "all"], help="best_model_dice*.pth: keep "
                     "the newest only, or every improving one (the reference code); saved from --save_from_epoch on")
    run.add_argument("--save_from_epoch", type=int, default=10, help="the first (1-based) epoch that may save one")
    run.add_argument("--resume", action="store_true", help="continue the run in OUTPUT/Skin_{img_size}")
    run.add_argument("--accept_new_images", action="store_true", help="--resume: new training images join the pool")
    run.add_argument("--demo", action="store_true",
                     help="synthetic data + sam2.1_hiera_t at a small size; no download, no GPU needed")
    return p


# --demo replaces these defaults unless the flag is given explicitly. Sized to write every artefact (a best
# checkpoint from the usual epoch 10 on included) in well under 3 minutes on 2 CPU cores.
DEMO_SETTINGS = dict(model_cfg="sam2.1_hiera_t", checkpoint=str(DEMO_CHECKPOINT) if DEMO_CHECKPOINT.is_file()
                     else "none", img_size=128, batch_size=2, pool_size=6, max_epochs=12)
DEMO_DATA = dict(n_train=40, n_val=8, n_test=0, size=192)

# Settings a resumed run must share with the run it continues (else selections would differ), besides the
# strategy's own parameters. LEGACY: what a setting absent from an older run folder means (how it was made).
BASE_RESUME_KEYS = ("img_size", "batch_size", "pool_size", "seed", "strategy", "model_cfg", "checkpoint", "module",
                    "rank", "num_classes", "promptmode", "train_on", "dice_weight", "base_lr", "precision", "decode",
                    "lora_width", "no_mem_embed", "val_protocol", "first_round", "keep_best", "val_limit")
# Settings a resume may change (they change neither selections nor which checkpoint is best; the oracle only
# between the folder and Label Studio, both a person: oracles.oracle_switch): the resume state records them, and a
# resume that changes one says so in the log.
MAY_CHANGE_ON_RESUME = ("val_every", "save_from_epoch", "oracle", "annotation_cost", "click_mask_input")
LEGACY = dict(precision="mixed", decode="draft", lora_width="output", no_mem_embed="frozen", val_protocol="isic",
              keep_best="newest", val_limit=None, first_round=NO_FIRST_ROUND, prompt_draw="per_epoch",
              annotation_cost="none", click_mask_input=False,
              **{p.name: p.legacy for p in STRATEGIES.all_parameters() if p.legacy is not None})

def resume_keys(*strategies: str, prompted: bool = False) -> Tuple[str, ...]:
    """The settings a resumed run must repeat: BASE_RESUME_KEYS, the parameters of the strategies it uses (the
    names of ``SelectionPlan.selectors``) and, when it trains on prompts (``prompted``), how it draws them (nothing
    is drawn under --promptmode none)."""
    return BASE_RESUME_KEYS + tuple(dict.fromkeys(p.name for n in strategies for p in STRATEGIES.parameters_of(n))) \
        + (("prompt_draw",) if prompted else ())


class Settings(argparse.Namespace):
    """The command line after preparation (``prepare_args``): read-only, so no step can change a setting."""

    def __init__(self, **values) -> None:
        super().__init__()
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"settings are read-only after preparation (tried to set {key})")


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """Names of the flags written on the command line (default or not)."""
    unset = object()  # argparse fills in defaults only for attributes the namespace lacks
    names = vars(parser.parse_args([]))
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in names}))
    return {k for k, v in vars(parsed).items() if v is not unset}


def existing_path(path: str) -> Optional[Path]:
    """``path`` as given, else relative to this repository (so ./sam2/... works from anywhere)."""
    return next((c for c in (Path(path), REPO / path) if c.exists()), None)


def prepare_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str],
                 writes_output: bool = True) -> Settings:
    """The run's settings: --demo's defaults, the default --output and demo data root, --checkpoint and
    --model_cfg resolved relative to this repository; then every flag check (nothing is written). Without
    ``writes_output`` (a process that writes nothing there: a rank other than 0 under torchrun, maybe on another
    machine) --output is not checked."""
    values = dict(vars(args))
    given = explicit_flags(parser, argv) if args.demo else set()
    values.update({k: v for k, v in DEMO_SETTINGS.items() if args.demo and k not in given})
    values["output"] = values["output"] or ("./output_demo" if args.demo else "./output")
    if values["val_protocol"] == "reference" and values["val_limit"] is None:
        values["val_limit"] = val.REFERENCE_VAL_IMAGES  # the reference's first 20, here by sorted name
    if args.demo and values["data_root"] is None:
        values["data_root"] = str(Path(values["output"]) / "demo_data")
    checkpoint = existing_path(values["checkpoint"]) if values["checkpoint"].lower() != "none" else None
    values["checkpoint"] = str(checkpoint) if checkpoint is not None and checkpoint.is_file() else values["checkpoint"]
    config = existing_path(values["model_cfg"])  # else a packaged/short name, resolved by build_sam2
    values["model_cfg"] = str(config) if config is not None and config.is_file() else values["model_cfg"]
    settings = Settings(**values)
    check_numbers(settings)
    check_together(settings)
    check_paths(settings)
    check_label_studio(settings)
    if writes_output:
        check_output(settings)
    return settings


def check_processes(args: argparse.Namespace, processes: int) -> None:
    """What a run on several processes (torchrun) cannot do."""
    if processes > 1 and args.wait:
        raise UsageError("--wait under torchrun would hold every process (and GPU) while a person annotates: run "
                         "without --wait (each round stops the run), then continue with --resume")
    if processes > 1 and args.promptmode != "none" and args.prompt_draw == "per_epoch":
        raise UsageError("--prompt_draw per_epoch draws the prompt points of a batch from one generator, so what an "
                         "image draws depends on how the batch is split across processes: run it in one process "
                         "(python3 trainer.py, also to --resume a run made that way), or use --prompt_draw per_image")


def demo_data_root(args: argparse.Namespace) -> Optional[Path]:
    """Where --demo writes its synthetic data (OUTPUT/demo_data), when the run uses it; else None."""
    root = Path(args.output) / "demo_data"
    return root if args.demo and Path(args.data_root) == root else None


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric flag error, before anything is loaded."""
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1 (got {args.batch_size})")
    plan = SelectionPlan.from_settings(vars(args))
    for flag, selector in zip(("--pool_size", "--first_round"), plan.selectors):
        if selector.pool_size != ALL_UNLABELED and selector.pool_size < args.batch_size:
            raise UsageError(f"{flag}: the pool ({selector.pool_size}) must be >= --batch_size ({args.batch_size}): "
                             "the batch is selected from the pool")
    if args.img_size < 32 or args.img_size % 32:
        raise UsageError(f"--img_size must be a positive multiple of 32 (got {args.img_size}); e.g. 256, 512 or 1024")
    if args.num_classes != 1:
        raise UsageError(f"--num_classes {args.num_classes}: {val.BINARY_MASKS}")
    for flag in ("max_epochs", "rank", "val_every", "save_from_epoch", "max_image_pixels"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    for flag in ("val_limit", "label_budget", "score_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    if args.num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0 (got {args.num_workers})")
    if not 0.0 <= args.dice_weight <= 1.0:
        raise UsageError(f"--dice_weight must be in [0, 1] (got {args.dice_weight})")
    if not (math.isfinite(args.base_lr) and args.base_lr > 0):
        raise UsageError(f"--base_lr must be a finite number > 0 (got {args.base_lr})")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in 0..{2**32 - 1} (got {args.seed})")


def check_together(args: argparse.Namespace) -> None:
    """Flags that mean something only with another."""
    if args.click_mask_input and args.annotation_cost != "clicks":
        raise UsageError(f"--click_mask_input changes how the clicks of --annotation_cost clicks are simulated, but "
                         f"--annotation_cost is {args.annotation_cost}: pass --annotation_cost clicks, or leave "
                         "--click_mask_input out")


def check_label_studio(args: argparse.Namespace) -> None:
    """The Label Studio flags belong to --oracle label_studio."""
    given = [f"--{flag}" for flag in ("wait", "label_studio_backend") if getattr(args, flag)]
    if given and args.oracle != "label_studio":
        raise UsageError(f"{given[0]} needs --oracle label_studio (it waits for, or helps, a person annotating in "
                         "Label Studio)")


def check_paths(args: argparse.Namespace) -> None:
    """Every file/folder/module flag error (paths as ``prepare_args`` resolved them)."""
    if args.data_root is None:
        raise UsageError("--data_root is required (the dataset root in ISIC-2017 layout); or try --demo for "
                         "synthetic data")
    if demo_data_root(args) is None and not Path(args.data_root).is_dir():
        raise UsageError(f"--data_root {args.data_root}: no such folder")
    if args.checkpoint.lower() != "none" and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: file not found; {CHECKPOINT_HINT} (or pass --demo to try "
                         "the pipeline without one)")
    if args.lora_ckpt is not None and not Path(args.lora_ckpt).is_file():
        raise UsageError(f"--lora_ckpt {args.lora_ckpt}: file not found")
    try:
        module = import_module(args.module)
    except ImportError as err:
        raise UsageError(f"--module {args.module}: cannot be imported ({err})") from None
    if not hasattr(module, "LoRA_Sam"):
        raise UsageError(f"--module {args.module} ({getattr(module, '__file__', '?')}) defines no LoRA_Sam class")
    misfit = lora_sam_misfit(module.LoRA_Sam)
    if misfit:
        raise UsageError(f"--module {args.module} ({getattr(module, '__file__', '?')}): {misfit}")


def check_output(args: argparse.Namespace) -> None:
    """--output (and its run folder) must be, or be creatable as, folders this user may write; creates nothing."""
    run_dir = run_dir_of(args.output, args.img_size)
    try:
        existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    except OSError as err:  # e.g. a name longer than the file system allows (ENAMETOOLONG)
        raise UsageError(f"--output {args.output}: {err.strerror or err} (file systems limit each folder's name, "
                         "usually to 255 bytes); choose another --output") from None
    if not existing.is_dir():
        raise UsageError(f"--output {args.output}: {existing} is a file, not a folder; choose another --output")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UsageError(f"--output {args.output}: cannot write in {existing} ({err.strerror or err}); "
                         "choose another --output") from None
