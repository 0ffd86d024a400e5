#!/usr/bin/env python3
"""MD-SAM-AL trainer: cold-start active learning with SAM2 (LoRA image encoder, two mask decoders).

Every epoch:

    unlabeled images --(random pool of --pool_size)--> the strategy selects --batch_size images
        --> the oracle gives their masks (read only now) --> both decoders (+ LoRA, prompt encoder) are
        fine-tuned --> validation (decoder 1, no prompt) --> checkpoints and the resume state

    python trainer.py --data_root /data/ISIC2017 --output ./output --gpu 0
    python trainer.py --demo        # synthetic data, sam2.1_hiera_t, CPU, no download

This file holds the flags, the set-up and the loop; the run folder's files and rules are run_folder.py, the
person's rounds (--oracle folder) annotation_rounds.py, the strategies active_learning_strategies.py. Nothing below
this file reads command-line flags; every error of the command line or its inputs ends as one line naming the
flag or file, exit code 2 (UsageError -> parser.exit in main).
"""
from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import tempfile
from importlib import import_module
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

import annotation_rounds
import datasets_skin
import utils
import val
from active_learning_strategies import (ALL_UNLABELED, NO_FIRST_ROUND, ActiveLearningStrategyFactory, Selection,
                                        Strategy, first_round_choice, parse_first_round, parse_pool_size)
from epoch_steps import (CHECKPOINT_HINT, Run, RunStopped, annotate, close_writers, earlier_selection, epoch_seed,
                         finish_run, labels_wanted, log_base_lr_change, log_start, open_writers, record_epoch, restore,
                         result, save_checkpoints, select_batch, start_afresh, stop_reason, timed, train_one_epoch,
                         validate_epoch, write_round_for_person)
from run_folder import (AWAITING, DIVERGED, FolderInUse, FolderLocked, ResumeState, RunFolder, RunFolderError,
                        SettingsDiffer, run_dir_of)
from safe_io import WriteError
from sam_lora_image_encoder_prompt import ModelInputError, build_model_from_settings, prompt_mode_of
from synthetic_isic import ensure_synthetic_isic

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL_CFG = "./sam2/configs/sam2.1/sam2.1_hiera_l.yaml"
DEFAULT_CHECKPOINT = "./sam2/checkpoints/sam2.1_hiera_large.pt"
DEMO_CHECKPOINT = REPO / "sam2" / "checkpoints" / "sam2.1_hiera_tiny.pt"
STRATEGIES = ActiveLearningStrategyFactory
AWAITING_FILE, DIVERGED_FILE = AWAITING, DIVERGED


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
    model.add_argument("--num_classes", type=int, default=1, help="foreground classes (the loss sees num_classes+1)")
    model.add_argument("--promptmode", default="none", type=promptmode_flag, metavar="{none,point,box,point-box,0}",
                       help="none (or the reference's 0): no prompts; else decoder 2 trains on prompts from decoder 1")
    model.add_argument("--precision", default="float32", choices=["float32", "mixed"],
                       help="on CUDA. float32: training and validation in float32, pool scoring under fp16 autocast "
                            "(the reference code); mixed: all three under autocast (bf16 where supported, else fp16 "
                            "with the gradient scaler). On the CPU everything is float32")
    model.add_argument("--no_mem_embed", default="trainable", choices=["trainable", "frozen"],
                       help="SAM2's no-memory embedding (added to the image embedding): trained as in the reference "
                            "code, or kept at the checkpoint's value")


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
    al.add_argument("--oracle", default="ground_truth", choices=["ground_truth", "folder"],
                    help="how a selected image gets its mask. ground_truth: read the existing mask (simulation). "
                         "folder: images without a mask are unlabeled; each round writes the selection with the "
                         "model's proposal masks (and Label Studio's tasks) to OUTPUT/Skin_{img_size}/annotate/"
                         "round_NNN/ and stops; a person saves the masks there or in the dataset's mask folder, then "
                         "--resume continues")
    al.add_argument("--accept_partial", action="store_true", help="--oracle folder, --resume: accept a round with "
                    "some masks missing (their images go back to the unlabeled pool)")
    al.add_argument("--label_budget", type=int, default=None, help="stop once this many images are labeled (the "
                    "last selection is cut to reach it exactly, then trained on and validated); default: no budget")
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
                    "lora_width", "no_mem_embed", "val_protocol", "first_round")
LEGACY = dict(precision="mixed", decode="draft", lora_width="output", no_mem_embed="frozen", val_protocol="isic",
              keep_best="newest", first_round=NO_FIRST_ROUND,
              **{p.name: p.legacy for p in STRATEGIES.all_parameters() if p.legacy is not None})

log = logging.getLogger("trainer")


def resume_keys(strategy: str, first_round: str = NO_FIRST_ROUND) -> Tuple[str, ...]:
    names = [strategy] + [c.name for c in [first_round_choice(first_round)] if c is not None]
    return BASE_RESUME_KEYS + tuple(dict.fromkeys(p.name for n in names for p in STRATEGIES.parameters_of(n)))


# ----------------------------------------------------------------------------- flags

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


def prepare_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> Settings:
    """The run's settings: --demo's defaults, the default --output and demo data root, --checkpoint and
    --model_cfg resolved relative to this repository; then every flag check (nothing is written)."""
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
    check_paths(settings)
    check_output(settings)
    return settings


def demo_data_root(args: argparse.Namespace) -> Optional[Path]:
    """Where --demo writes its synthetic data (OUTPUT/demo_data), when the run uses it; else None."""
    root = Path(args.output) / "demo_data"
    return root if args.demo and Path(args.data_root) == root else None


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric flag error, before anything is loaded."""
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1 (got {args.batch_size})")
    first = first_round_choice(args.first_round)
    for flag, pool in (("--pool_size", args.pool_size), ("--first_round", first and first.pool_size)):
        if pool not in (None, ALL_UNLABELED) and pool < args.batch_size:
            raise UsageError(f"{flag}: the pool ({pool}) must be >= --batch_size ({args.batch_size}): the batch is "
                             "selected from the pool")
    if args.img_size < 32 or args.img_size % 32:
        raise UsageError(f"--img_size must be a positive multiple of 32 (got {args.img_size}); e.g. 256, 512 or 1024")
    if not 1 <= args.num_classes <= 4:
        raise UsageError(f"--num_classes must be 1..4 (one SAM2 mask token per class; got {args.num_classes})")
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


def check_output(args: argparse.Namespace) -> None:
    """--output (and its run folder) must be, or be creatable as, folders this user may write; creates nothing."""
    run_dir = run_dir_of(args.output, args.img_size)
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--output {args.output}: {existing} is a file, not a folder; choose another --output")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UsageError(f"--output {args.output}: cannot write in {existing} ({err.strerror or err}); "
                         "choose another --output") from None


# ----------------------------------------------------------------------------- set-up

def open_run_folder(args: Settings, folder: RunFolder,
                    create: bool = False) -> Optional[Tuple[bool, Optional[ResumeState]]]:
    """Own the folder: (whether it holds a dead run to start afresh, the state to continue with --resume), or with
    ``create`` make it (still new, if new when checked); every problem as one line naming the flag (nothing written)."""
    try:
        if create:
            return folder.own(create=True)
        return folder.open_for_run(vars(args), resume_keys(args.strategy, args.first_round), LEGACY, args.resume)
    except FolderLocked as err:
        raise UsageError(f"--output {args.output}: {err}; wait until it ends, or choose another --output") from None
    except FolderInUse as err:
        again = f" (to run the demo afresh: rm -r {args.output})" if args.demo else ""
        raise UsageError(f"--output {args.output}: {err}; pass --resume to continue it, or choose another "
                         f"--output{again}; nothing was overwritten") from None
    except SettingsDiffer as err:
        changed = "; ".join(f"--{k} was {was}, now {now}" for k, was, now in err.changes)
        if err.dead:
            raise UsageError(f"--output {args.output}: {err} ({changed}); rerun it with its settings (it then starts "
                             "afresh), or choose another --output; nothing was removed") from None
        raise UsageError(f"--resume: the run to continue used other settings (its selections would not repeat); "
                         f"{changed}") from None
    except RunFolderError as err:
        raise UsageError(f"--resume: {err}") from None


def make_strategy(args: Settings, name: Optional[str] = None) -> Strategy:
    return STRATEGIES.from_settings(name or args.strategy, vars(args))


def pick_device(args: Settings) -> torch.device:
    try:
        return utils.select_device(args.gpu)
    except utils.DeviceError as err:
        raise UsageError(f"--gpu {args.gpu}: {err}") from None


AFTER_WRITE_ERROR = "; free space there (or make it writable), then run the same command with --resume"
NEW_IMAGES_HINT = "; or pass --accept_new_images to take the new training images into the unlabeled pool"
MODEL_FLAGS = dict(model_cfg="--model_cfg", checkpoint="--checkpoint", lora_ckpt="--lora_ckpt", module="--module")


def make_model(args: Settings, device: torch.device) -> torch.nn.Module:
    try:
        return build_model_from_settings(vars(args), device)
    except ModelInputError as err:
        raise UsageError(err.after_flag(MODEL_FLAGS[err.source], getattr(args, err.source))) from None


def load_data(args: Settings) -> Tuple[datasets_skin.SemiSupervisedSkinDataset, Optional[Dataset]]:
    """The training set and the validation subset (None: no Validation split, --oracle folder only); with --demo
    its synthetic data set is written first, once."""
    root = demo_data_root(args)
    try:
        if root is not None and ensure_synthetic_isic(root, seed=args.seed, **DEMO_DATA):
            log.info("demo: wrote synthetic ISIC-format data to %s", root)
    except OSError as err:
        raise UsageError(f"--output: cannot write the demo data {root} ({err.strerror or err}); remove {root} "
                         "or choose another --output") from None
    try:
        return datasets_skin.training_and_validation(args.data_root, args.img_size, args.oracle == "folder",
                                                     args.val_limit, args.num_workers > 0, args.decode == "draft",
                                                     args.max_image_pixels)
    except datasets_skin.ImageTooLargeError as err:
        raise UsageError(f"--data_root {args.data_root}: {err.describe('pass a larger --max_image_pixels')}") from None
    except datasets_skin.DatasetError as err:
        raise UsageError(f"--data_root {args.data_root}: {err}") from None


def round_error(err: annotation_rounds.RoundError) -> UsageError:
    """A round that cannot go on, as the one message naming what to do."""
    if err.reason == "needs_folder_oracle":
        return UsageError(f"--resume: {err}; continue it with --oracle folder; nothing was changed")
    if err.reason == "nothing_to_select":
        return UsageError(f"--oracle folder: {err}; train on them with --oracle ground_truth, or add images without "
                          "masks")
    if err.reason == "bad_existing_masks":
        return UsageError(f"--data_root: {err}:\n  " + "\n  ".join(err.problems) + "\nfix or remove them (an image "
                          "without a mask is one to annotate)")
    if err.reason == "masks":
        hint = ("; or pass --accept_partial to continue with the masks that are there (the other images go back to "
                "the unlabeled pool)") if err.partial_helps else ""
        return UsageError(f"--resume: {err}:\n  " + "\n  ".join(err.problems) + "\nSave each mask as a 0/255 PNG of "
                          f"its image's size at the path named, then run the same command again{hint}")
    return UsageError(f"--resume: {err}")


def make_oracle(args: Settings, folder: RunFolder, state: Optional[ResumeState],
                train_set: datasets_skin.SemiSupervisedSkinDataset) -> annotation_rounds.GroundTruthOracle:
    """The oracle of --oracle, after every check of its masks (nothing is written before)."""
    try:
        return annotation_rounds.make_oracle(args.oracle == "folder", folder, state, train_set, args.accept_partial)
    except annotation_rounds.RoundError as err:
        raise round_error(err) from None
    except RunFolderError as err:
        raise UsageError(f"--resume: {err}") from None


def tidy_run_folder(run: Run, dead: bool) -> None:
    """At start and resume, logged: remove the temporary files that killed writes left in the run folder, and
    clear a dead run (see ``check_dead_run``)."""
    stale = run.folder.remove_stale_temps()
    if stale:
        log.info("removed %d temporary file(s) left by a write that was killed: %s", len(stale),
                 ", ".join(p.name for p in stale))
    if dead:
        old_lr = run.folder.read_config().get("base_lr", run.args.base_lr)
        removed = run.folder.clear_dead_run()
        log.info("%s holds a run that stopped before finishing its first epoch (no last_state.pth), so there is "
                 "nothing to continue: %s; removed what it wrote: %s", run.run_dir,
                 "--resume starts it from epoch 1" if run.args.resume else "starting it afresh",
                 ", ".join(str(p.relative_to(run.run_dir)) for p in removed) or "nothing")
        log_base_lr_change(run, old_lr)


def add_log_handler(handler: logging.Handler) -> logging.Handler:
    log.setLevel(logging.INFO)
    log.propagate = False
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    return handler


def start_run(args: Settings, argv: Sequence[str]) -> Run:
    """Own and check the run folder, load data and model, then create (or reopen, with --resume) the run folder.
    Everything that can fail on bad input fails before the folder is created."""
    folder = RunFolder(run_dir_of(args.output, args.img_size))
    dead, state = open_run_folder(args, folder)
    strategy, device = make_strategy(args), pick_device(args)
    utils.seed_everything(args.seed, deterministic=args.deterministic)
    train_set, val_set = load_data(args)
    oracle = make_oracle(args, folder, state, train_set)
    model = make_model(args, device)
    model.set_grad_checkpointing(args.grad_ckpt)
    if args.compile:
        model.compile_image_encoder()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.base_lr,
                                  weight_decay=0.01)
    fp16 = args.precision == "mixed" and utils.amp_dtype(device) == torch.float16
    first = first_round_choice(args.first_round)
    run = Run(args, folder, device, strategy, train_set, val_set, model, optimizer,
              torch.amp.GradScaler("cuda", enabled=fp16), oracle, resume_keys(args.strategy, args.first_round),
              first_round=first and make_strategy(args, first.name))

    open_run_folder(args, folder, create=True)
    add_log_handler(logging.FileHandler(folder.file("log.txt"), mode="a"))
    tidy_run_folder(run, dead)
    if state is not None:
        try:
            restore(run, state, f"resumed at epoch {state.epoch + 1}: {' '.join(argv)}")
        except RunFolderError as err:
            raise UsageError(f"--resume: {err}{NEW_IMAGES_HINT if getattr(err, 'only_added', False) else ''}") from None
    else:
        start_afresh(run)
    open_writers(run)
    log_start(run, argv)
    return run


# ----------------------------------------------------------------------------- stopping mid-run

class DivergenceError(UsageError):
    """Training produced NaN or inf; the message names the epoch and suggests a lower --base_lr (exit code 2)."""


def how_to_go_on(epoch: int, fix: str) -> str:
    """What a run stopped in ``epoch`` keeps (nothing of that epoch is saved), and how to go on after ``fix``."""
    if epoch > 1:
        return (f"the run stopped; last_state.pth and the best checkpoint are those of epoch {epoch - 1}, untouched: "
                f"{fix}, then rerun with --resume")
    return f"the run stopped in its first epoch, so there is nothing to keep: {fix}, then rerun (it starts afresh)"


def stopped(args: Settings, err: RunStopped) -> UsageError:
    """A run stopped mid-epoch, as the one line saying what happened and what to do."""
    if err.reason == "diverged":
        lr, bad = args.base_lr, err.names
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return DivergenceError(f"training diverged in epoch {err.epoch} ({err.where}): NaN or inf in {shown}, at "
                               f"--base_lr {lr:g}; " + how_to_go_on(err.epoch, f"choose a lower --base_lr (e.g. "
                                                                               f"{lr / 10:g})"))
    return UsageError(f"--data_root {args.data_root}: {err.where} (found in epoch {err.epoch}); "
                      + how_to_go_on(err.epoch, "replace or remove that file"))


def stop_for_annotation(run: Run, epoch: int, selection: Selection, argv: Sequence[str]) -> dict:
    """Write the round for a person, say where each mask goes and the one command that continues; stop."""
    folder = write_round_for_person(run, epoch, selection)
    for line in annotation_rounds.round_instructions(folder, epoch):
        log.info(line)
    script = "trainer.py" if Path.cwd().resolve() == REPO else str(REPO / "trainer.py")
    kept = [a for a in argv if a not in ("--accept_partial", "--accept_new_images")]  # answers to this round only
    again = shlex.join(["python3", script, *kept, *([] if "--resume" in kept else ["--resume"])])
    log.info("then continue with:\n  %s", again)
    return result(run, epoch - 1, round_dir=folder, requested=[run.train_set.names[i] for i in selection.chosen])


# ----------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    add_log_handler(logging.StreamHandler(sys.stdout))
    run = None
    try:
        args = prepare_args(parser, parser.parse_args(argv), argv)
        run = start_run(args, argv)

        # ---- the active-learning loop: one selection and one round of fine-tuning per epoch
        epoch = run.start_epoch - 1
        for epoch in range(run.start_epoch, args.max_epochs + 1):
            utils.seed_everything(epoch_seed(args.seed, epoch), deterministic=args.deterministic)
            wanted = labels_wanted(run)
            if wanted == 0:
                log.info("%s; stopping before epoch %d", stop_reason(run), epoch)
                epoch -= 1
                break
            times: Dict[str, float] = {}
            utils.reset_peak_memory(run.device)

            # 1) score a fresh random pool and select (or the round resumed, selected before the stop)
            with timed(times, "scoring_s"):
                selection = earlier_selection(run, epoch) or select_batch(run, epoch, wanted)

            # 2) the oracle: ground_truth has the masks; folder writes the round for a person and stops here
            if not run.oracle.has_masks(epoch):
                return stop_for_annotation(run, epoch, selection, argv)
            annotate(run, epoch, selection)  # only now are the selected masks read
            utils.crash_point("selected", epoch)

            # 3) fine-tune both decoders (+ LoRA, prompt encoder) on the labeled set or this epoch's selection
            with timed(times, "train_s"):
                losses = train_one_epoch(run, epoch, selection.chosen)

            # 4) validate with decoder 1, no prompt (how the model is used); always after the last selection
            last = epoch == args.max_epochs or labels_wanted(run) == 0
            with timed(times, "val_s"):
                metrics = validate_epoch(run, epoch) if epoch % args.val_every == 0 or last else {}

            # 5) record the epoch, then checkpoint: the best full state_dict, the resume state
            record_epoch(run, epoch, losses, metrics, times)
            save_checkpoints(run, epoch, metrics)
            utils.crash_point("epoch_end", epoch)

        return finish_run(run, epoch)
    except RunStopped as err:
        parser.exit(2, f"{parser.prog}: error: {stopped(args, err)}\n")
    except (UsageError, WriteError) as err:  # one line: the message names the flag or file
        parser.exit(2, f"{parser.prog}: error: {err}{AFTER_WRITE_ERROR if isinstance(err, WriteError) else ''}\n")
    finally:
        if run is not None:
            close_writers(run)
        for handler in list(log.handlers):  # the console and log.txt
            log.removeHandler(handler)
            handler.close()


if __name__ == "__main__":
    main()
