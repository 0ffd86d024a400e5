#!/usr/bin/env python3
"""MD-SAM-AL trainer: cold-start active learning with SAM2 (LoRA image encoder, two mask decoders).

Every epoch:

    unlabeled images --(random pool of --pool_size)--> strategy scores the pool
        --> the top --batch_size images are "annotated" (their masks are read only now)
        --> both decoders (+ LoRA, prompt encoder) are fine-tuned on the labeled set
        --> validation (decoder 1, no prompt) --> best checkpoint from --save_from_epoch on

    python trainer.py --data_root /data/ISIC2017 --output ./output --gpu 0
    python trainer.py --demo        # synthetic data, sam2.1_hiera_t, CPU, no download

One loop, two oracles (how a selected image gets its mask): --oracle ground_truth reads the existing mask (the
simulation); --oracle folder treats every training image without a mask as unlabeled, writes each selection as a
round for a person (annotate/round_NNN/: images, the model's proposal masks, overlays, to_annotate.csv), saves
last_state.pth and AWAITING_FILE, and stops (exit 0); --resume checks the masks saved and continues the same
epoch, exactly as an uninterrupted run would.

Outputs go to OUTPUT/Skin_{img_size}/: log/ (TensorBoard), config.txt, log.txt, al_selection.csv,
best_model_dice{score:.4f}.pth, last_state.pth (for --resume) and, at the end, last_model.pth; with
--oracle folder also annotate/round_NNN/ and, while a round waits for masks, awaiting_masks.json.
Nothing below this file reads command-line flags; every error of the command line or its inputs ends
as one line naming the flag or file, exit code 2 (UsageError -> parser.exit in main).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import wraps
from importlib import import_module
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tensorboardX import SummaryWriter
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.utils import make_grid
from tqdm import tqdm

import annotation_rounds
import datasets_skin
import tb_images
import utils
import val
from active_learning_strategies import (ActiveLearningStrategyFactory, BaseActiveLearningStrategy,
                                        MaskDifferenceStrategy, default_score_batch_size, top_k)
from safe_io import (CheckpointFileError, atomic_folder, atomic_path, atomic_torch_save, atomic_write_text,
                     load_torch_file, remove_stale_temps)
from sam2.build_sam import CheckpointError, ConfigNotFoundError
from sam_lora_image_encoder_prompt import build_model
from synthetic_isic import make_synthetic_isic

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL_CFG = "./sam2/configs/sam2.1/sam2.1_hiera_l.yaml"
DEFAULT_CHECKPOINT = "./sam2/checkpoints/sam2.1_hiera_large.pt"
DEMO_CHECKPOINT = REPO / "sam2" / "checkpoints" / "sam2.1_hiera_tiny.pt"
DOWNLOAD_HINT = "see sam2/checkpoints/README.md for where to download the official SAM2.1 checkpoints"
# --oracle folder: present in the run folder while a round waits for a person's masks (a live run, never a dead
# one to clear); written atomically with the round, removed once the epoch trained on those masks is saved.
AWAITING_FILE = "awaiting_masks.json"


class UsageError(Exception):
    """A problem with the command line or its inputs; the message names the flag or file (exit code 2)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer.py",
        description="Cold-start active learning with SAM2: select, annotate, fine-tune, validate.",
        formatter_class=_HelpFormatter,
    )
    # data and run folder
    p.add_argument("--data_root", default=None,
                   help="dataset root (Training_Data/, Training_GroundTruth/, Validation_Data/, "
                        "Validation_GroundTruth/, or the official ISIC-2017 folder names)")
    p.add_argument("--output", default=None,
                   help="output folder; the run goes to OUTPUT/Skin_{img_size} (default ./output, "
                        "./output_demo with --demo)")
    p.add_argument("--gpu", default="0", help="CUDA device index; without CUDA the run uses the CPU")
    p.add_argument("--seed", type=int, default=1337, help="seed of pools, selection, init, order")
    p.add_argument("--deterministic", action="store_true", help="deterministic (slower) CUDA kernels")
    p.add_argument("--num_workers", type=int, default=0,
                   help="DataLoader workers (0 keeps the decode-once image cache in this process)")
    # speed and memory only: none of these changes what is selected or learned
    p.add_argument("--score_batch_size", type=int, default=None,
                   help="images per pool-scoring batch (default: 16 on CUDA, --batch_size on the CPU)")
    p.add_argument("--grad_ckpt", action="store_true",
                   help="activation checkpointing of the Hiera blocks while training (less memory, ~1 extra "
                        "encoder forward per step)")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder's trunk")
    # model
    p.add_argument("--model_cfg", default=DEFAULT_MODEL_CFG,
                   help="SAM2.1 Hydra config (path, or short name such as sam2.1_hiera_t)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="official SAM2.1 checkpoint; 'none' = seeded random weights")
    p.add_argument("--module", default="sam_lora_image_encoder_prompt",
                   help="Python module that defines LoRA_Sam")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--lora_ckpt", default=None, help="LoRA-only weights to start from (save_lora_parameters format)")
    p.add_argument("--img_size", type=int, default=512, help="training/validation resolution (multiple of 32)")
    p.add_argument("--num_classes", type=int, default=1, help="foreground classes (the loss sees num_classes+1)")
    p.add_argument("--promptmode", default="none", choices=["none", "point", "box", "point-box"],
                   help="none: both decoders unprompted; otherwise decoder 2 is trained on prompts "
                        "derived from decoder 1's prediction")
    # active learning
    p.add_argument("--strategy", default="mask_difference", help="mask_difference | entropy | random")
    p.add_argument("--batch_size", type=int, default=4, help="images annotated per epoch, and mini-batch size")
    p.add_argument("--pool_size", type=int, default=10, help="random unlabeled candidates scored per epoch")
    p.add_argument("--oracle", default="ground_truth", choices=["ground_truth", "folder"],
                   help="how a selected image gets its mask. ground_truth: read the existing mask (simulation). "
                        "folder: images without a mask are unlabeled; each round writes the selection with the "
                        "model's proposal masks to OUTPUT/Skin_{img_size}/annotate/round_NNN/ and stops; a person "
                        "saves the masks in the dataset's mask folder, then --resume continues")
    p.add_argument("--accept_partial", action="store_true",
                   help="--oracle folder, --resume: accept a round with some masks missing (their images go back "
                        "to the unlabeled pool)")
    p.add_argument("--label_budget", type=int, default=None,
                   help="stop once this many images are labeled (the last selection is cut to reach it exactly, "
                        "then trained on and validated); default: no budget")
    # optimisation
    p.add_argument("--base_lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    p.add_argument("--max_epochs", type=int, default=50, help="active-learning epochs (one selection each)")
    p.add_argument("--dice_weight", type=float, default=0.8, help="loss = (1-w)*CE + w*Dice per decoder")
    p.add_argument("--train_on", default="labeled", choices=["labeled", "selected"],
                   help="labeled: every epoch trains on all images labeled so far; "
                        "selected: only on the images selected this epoch (the reference code)")
    # validation and checkpoints
    p.add_argument("--val_every", type=int, default=1, help="validate every N epochs (and at the last)")
    p.add_argument("--val_limit", type=int, default=None, help="validate on the first N images only")
    p.add_argument("--save_from_epoch", type=int, default=10,
                   help="best_model_dice*.pth is saved from this (1-based) epoch on")
    # run control
    p.add_argument("--resume", action="store_true", help="continue the run in OUTPUT/Skin_{img_size}")
    p.add_argument("--demo", action="store_true",
                   help="synthetic data + sam2.1_hiera_t at a small size; no download, no GPU needed")
    return p


# --demo replaces these defaults unless the flag is given explicitly. Sized to write every artefact
# (a best checkpoint from the usual epoch 10 on included) in well under 3 minutes on 2 CPU cores
# (measured: 32 s wall on 2 quiet Xeon cores; training dominates, as it grows with the labeled set).
DEMO_SETTINGS = dict(
    model_cfg="sam2.1_hiera_t",
    checkpoint=str(DEMO_CHECKPOINT) if DEMO_CHECKPOINT.is_file() else "none",
    img_size=128,
    batch_size=2,
    pool_size=6,
    max_epochs=12,
)
DEMO_DATA = dict(n_train=40, n_val=8, n_test=0, size=192)

# Settings a resumed run must share with the run it continues (else selections would differ).
RESUME_KEYS = ("img_size", "batch_size", "pool_size", "seed", "strategy", "model_cfg", "checkpoint",
               "module", "rank", "num_classes", "promptmode", "train_on", "dice_weight", "base_lr")
CSV_HEADER = ["epoch", "image", "score", "rank_in_pool"]
# Written when training diverges (NaN/inf); while it is there, --resume may change --base_lr. Removed with the
# next finished epoch.
DIVERGED_FILE = "diverged.json"
# What a run that died before finishing its first epoch may have written (log.txt stays: the log goes on).
DEAD_RUN_FILES = ("config.txt", "al_selection.csv", DIVERGED_FILE)

log = logging.getLogger("trainer")


# ----------------------------------------------------------------------------- flags

def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """Names of the flags written on the command line (default or not)."""
    unset = object()  # argparse fills in defaults only for attributes the namespace lacks
    names = vars(parser.parse_args([]))
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in names}))
    return {k for k, v in vars(parsed).items() if v is not unset}


def apply_demo_settings(args: argparse.Namespace, given: set) -> None:
    for key, value in DEMO_SETTINGS.items():
        if key not in given:
            setattr(args, key, value)


def existing_path(path: str) -> Optional[Path]:
    """``path`` as given, else relative to this repository (so ./sam2/... works from anywhere)."""
    for candidate in (Path(path), REPO / path):
        if candidate.exists():
            return candidate
    return None


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric flag error, before anything is loaded."""
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1 (got {args.batch_size})")
    if args.pool_size < args.batch_size:
        raise UsageError(f"--pool_size ({args.pool_size}) must be >= --batch_size ({args.batch_size}): "
                         "the batch is selected from the pool")
    if args.img_size < 32 or args.img_size % 32:
        raise UsageError(f"--img_size must be a positive multiple of 32 (got {args.img_size}); e.g. 256, 512 or 1024")
    if not 1 <= args.num_classes <= 4:
        raise UsageError(f"--num_classes must be 1..4 (one SAM2 mask token per class; got {args.num_classes})")
    for flag in ("max_epochs", "rank", "val_every", "save_from_epoch"):
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
    """Every file/folder/module flag error; resolves --checkpoint and --model_cfg relative to this repository."""
    if args.data_root is None and not args.demo:
        raise UsageError("--data_root is required (the dataset root in ISIC-2017 layout); "
                         "or try --demo for synthetic data")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise UsageError(f"--data_root {args.data_root}: no such folder")
    if args.checkpoint.lower() != "none":
        found = existing_path(args.checkpoint)
        if found is None or not found.is_file():
            raise UsageError(f"--checkpoint {args.checkpoint}: file not found; {DOWNLOAD_HINT} "
                             "(or pass --demo to try the pipeline without one)")
        args.checkpoint = str(found)
    found = existing_path(args.model_cfg)  # else a packaged/short name, resolved by build_sam2
    if found is not None and found.is_file():
        args.model_cfg = str(found)
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
    run_dir = Path(args.output) / f"Skin_{args.img_size}"
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--output {args.output}: {existing} is a file, not a folder; choose another --output")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UsageError(f"--output {args.output}: cannot write in {existing} ({err.strerror or err}); "
                         "choose another --output") from None


def prepare_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Demo defaults, the default --output, and every flag check."""
    if args.demo:
        apply_demo_settings(args, explicit_flags(parser, argv))
    if args.output is None:
        args.output = "./output_demo" if args.demo else "./output"
    check_numbers(args)
    check_paths(args)
    check_output(args)


# ----------------------------------------------------------------------------- model and loss

def trainable_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors training changes (LoRA, prompt encoder, decoders), on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def cpu_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def dual_decoder_loss(outputs: Dict[str, torch.Tensor], labels: torch.Tensor,
                      dice_weight: float) -> Dict[str, torch.Tensor]:
    """Mean of both decoders' (1-w)*CE + w*Dice (logits B x (C+1) x S/4 x S/4 upsampled to the
    B x S x S labels), under "loss", plus every part for logging."""
    parts: Dict[str, torch.Tensor] = {}
    for d in (1, 2):
        logits = F.interpolate(outputs[f"low_res_logits{d}"].float(), size=labels.shape[-2:],
                               mode="bilinear", align_corners=False)
        parts[f"loss_dec{d}"], parts[f"ce_dec{d}"], parts[f"dice_dec{d}"] = utils.segmentation_loss(
            logits, labels, dice_weight=dice_weight)
    parts["loss"] = 0.5 * (parts["loss_dec1"] + parts["loss_dec2"])
    return parts


@torch.no_grad()
def predict_logits(model: torch.nn.Module, device: torch.device, images: torch.Tensor) -> torch.Tensor:
    """Validation prediction: decoder 1, no prompt. B x 3 x S x S -> B x (C+1) x S/4 x S/4 float32 logits."""
    with utils.autocast(device):
        return model.decode(model.encode(images.to(device)), 1)["low_res_logits"].float()


# ----------------------------------------------------------------------------- active learning

def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch, independent of what ran before it (so --resume repeats it exactly)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def draw_pool(unlabeled: Sequence[int], pool_size: int, seed: int, epoch: int) -> List[int]:
    rng = np.random.default_rng([seed, epoch])
    size = min(pool_size, len(unlabeled))
    return sorted(int(i) for i in rng.choice(np.asarray(unlabeled), size=size, replace=False))


def ranks_in_pool(scores: Dict[int, float]) -> Dict[int, int]:
    """1-based rank of each pool image, in the strategy's own order (highest score first)."""
    return {idx: r + 1 for r, idx in enumerate(top_k(scores, len(scores)))}


# ----------------------------------------------------------------------------- files

def csv_text(rows: List[list]) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()


def append_selection_rows(path: Path, rows: List[list]) -> None:
    """Add rows to al_selection.csv by rewriting it atomically: a kill leaves the old file or the new one, never
    a partial line (so a partial line on --resume is damage, not something this trainer wrote)."""
    old = path.read_text() if path.exists() else csv_text([CSV_HEADER])
    atomic_write_text(path, old + csv_text(rows))


def selection_row_ok(row: List[str]) -> bool:
    try:
        return len(row) == len(CSV_HEADER) and bool(row[1]) and int(row[0]) >= 1 and math.isfinite(float(row[2])) \
            and int(row[3]) >= 1
    except ValueError:
        return False


def read_selection_rows(path: Path) -> List[List[str]]:
    """The rows of al_selection.csv after its header; a blank, partial or unreadable line is a UsageError naming
    the file and the line (checked on --resume, before anything is written)."""
    try:
        with open(path, newline="") as f:
            lines = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"--resume: cannot read {path} ({err})") from None
    if not lines or lines[0] != CSV_HEADER:
        raise UsageError(f"--resume: {path} does not start with the line {','.join(CSV_HEADER)}; it is not a "
                         "selection log of this trainer")
    for number, row in enumerate(lines[1:], start=2):
        if not selection_row_ok(row):
            what = "blank" if not row else f"incomplete or damaged ({','.join(row)!r})"
            raise UsageError(f"--resume: {path} line {number} is {what}; every line must be "
                             f"{','.join(CSV_HEADER)}: repair or delete that line, then rerun")
    return lines[1:]


def truncate_selection_csv(path: Path, last_epoch: int) -> None:
    """Drop rows of epochs after ``last_epoch`` (written by a run killed mid-epoch)."""
    if not path.exists():
        return
    kept = [r for r in read_selection_rows(path) if int(r[0]) <= last_epoch]
    atomic_write_text(path, csv_text([CSV_HEADER] + kept))


def run_folder_in_use(run_dir: Path) -> Optional[str]:
    for name in (AWAITING_FILE, "config.txt", "al_selection.csv", "last_state.pth"):
        if (run_dir / name).exists():
            return name
    return None


def add_log_handler(handler: logging.Handler) -> logging.Handler:
    log.setLevel(logging.INFO)
    log.propagate = False
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    return handler


# ----------------------------------------------------------------------------- oracles: how a selected image gets its mask

@dataclass
class AcceptedRound:
    """A round whose masks passed the checks at --resume: its epoch, the images to label now (in selection order),
    the pool's scores."""

    epoch: int
    chosen: List[int]
    scores: Dict[int, float]


class Oracle:
    """--oracle ground_truth (the simulation): every selected image's mask is there already."""

    def __init__(self) -> None:
        self.notes: List[str] = []  # said once at the start (e.g. masks accepted with a remark)

    def earlier_selection(self, epoch: int) -> Optional[Tuple[List[int], Dict[int, float]]]:
        """The selection of ``epoch`` made before the run stopped for annotation, if any."""
        return None

    def masks_ready(self, run: "Run", epoch: int, chosen: List[int], scores: Dict[int, float]) -> bool:
        return True


class FolderOracle(Oracle):
    """--oracle folder: a person saves the masks. A new selection becomes a round for them and the run stops; at
    --resume the checked round is that epoch's selection again, with its masks ready."""

    def __init__(self, accepted: Optional[AcceptedRound] = None) -> None:
        super().__init__()
        self.accepted = accepted

    def earlier_selection(self, epoch: int) -> Optional[Tuple[List[int], Dict[int, float]]]:
        if self.accepted is None or self.accepted.epoch != epoch:
            return None
        return self.accepted.chosen, self.accepted.scores

    def masks_ready(self, run: "Run", epoch: int, chosen: List[int], scores: Dict[int, float]) -> bool:
        if self.earlier_selection(epoch) is not None:
            return True
        write_annotation_round(run, epoch, chosen, scores)
        return False


# ----------------------------------------------------------------------------- set-up

@dataclass
class Run:
    """Everything one active-learning run works with (built by ``start_run``)."""

    args: argparse.Namespace
    run_dir: Path
    device: torch.device
    strategy: BaseActiveLearningStrategy
    train_set: datasets_skin.SemiSupervisedSkinDataset
    val_set: Optional[Dataset]  # None: no Validation split (--oracle folder only)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    oracle: Oracle
    writer: Optional[SummaryWriter] = None
    truths: val.GroundTruthCache = field(default_factory=val.GroundTruthCache)  # full-size masks, once per run
    start_epoch: int = 1
    best_dice: float = -1.0
    best_path: Optional[Path] = None

    @property
    def csv_path(self) -> Path:
        return self.run_dir / "al_selection.csv"

    @property
    def state_path(self) -> Path:
        return self.run_dir / "last_state.pth"

    @property
    def labeled_names(self) -> List[str]:
        return [self.train_set.names[i] for i in self.train_set.labeled_indices]


def settings_changed(recorded: dict, args: argparse.Namespace, run_dir: Path) -> List[str]:
    """The RESUME_KEYS settings in which ``args`` differs from ``recorded`` (a state's args, or config.txt's text),
    one "--flag was X, now Y" each. --base_lr may change after the run stopped on divergence (DIVERGED_FILE)."""
    may_change = {"base_lr"} if (run_dir / DIVERGED_FILE).is_file() else set()
    shown = {k: repr if isinstance(getattr(args, k), str) else str for k in RESUME_KEYS}
    return [f"--{k} was {shown[k](recorded.get(k))}, now {shown[k](getattr(args, k))}" for k in RESUME_KEYS
            if k not in may_change and str(recorded.get(k)) != str(getattr(args, k))]


def write_config(path: Path, args: argparse.Namespace) -> None:
    """config.txt: every setting of the run, one ``key: value`` line each (``read_config`` reads it back)."""
    atomic_write_text(path, "".join(f"{k}: {v}\n" for k, v in sorted(vars(args).items())))


def read_config(path: Path) -> Dict[str, str]:
    """config.txt as written by ``write_config`` (``key: value`` lines; ``#`` lines are notes such as "resumed at
    epoch 3"); {} when absent."""
    if not path.is_file():
        return {}
    pairs = (line.split(": ", 1) for line in path.read_text(errors="replace").splitlines() if ": " in line)
    return {key: value for key, value in pairs if not key.startswith("#")}


def dead_run(args: argparse.Namespace, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that stopped before finishing its first epoch (killed, a bad file, a
    divergence): its config.txt but no last_state.pth and no round waiting for a person's masks (AWAITING_FILE:
    that run is live). It holds nothing to continue, so a rerun with the same settings, with or without --resume,
    starts it afresh (``clear_dead_run``). Other settings are refused, as for --resume; a folder whose config.txt
    does not record them is not recognised as a run of this trainer (refused as before). Nothing is removed here."""
    if not run_folder_in_use(run_dir) or (run_dir / "last_state.pth").exists() or (run_dir / AWAITING_FILE).exists():
        return False
    recorded = read_config(run_dir / "config.txt")
    if not set(RESUME_KEYS) <= set(recorded):
        return False
    changed = settings_changed(recorded, args, run_dir)
    if changed:
        raise UsageError(f"--output {args.output}: {run_dir} holds a run that stopped before finishing its first "
                         f"epoch, with other settings ({'; '.join(changed)}); rerun it with its settings (it then "
                         "starts afresh), or choose another --output; nothing was removed")
    return True


def clear_dead_run(run_dir: Path) -> List[Path]:
    """Remove what a dead run (see ``dead_run``) wrote, except log.txt; returns what was removed."""
    removed = [run_dir / name for name in DEAD_RUN_FILES if (run_dir / name).is_file()]
    removed += sorted(run_dir.glob("best_model_dice*.pth")) + sorted((run_dir / "log").glob("events.out.tfevents.*"))
    for path in removed:
        path.unlink()
    return removed


def read_resume_state(args: argparse.Namespace, run_dir: Path) -> Optional[dict]:
    """The state to continue from (``--resume``), after checking that it fits the flags; else None.
    Without --resume an existing run folder is refused, so that nothing is overwritten."""
    in_use = run_folder_in_use(run_dir)
    if in_use and not args.resume:
        again = f" (to run the demo afresh: rm -r {args.output})" if args.demo else ""
        raise UsageError(f"--output {args.output}: {run_dir} already holds a run ({run_dir / in_use}); pass "
                         f"--resume to continue it, or choose another --output{again}; nothing was overwritten")
    if not args.resume:
        return None
    state_path = run_dir / "last_state.pth"
    if not state_path.is_file():
        raise UsageError(f"--resume: {state_path} does not exist, so there is no run to continue "
                         "(it is written at the end of every epoch)")
    try:
        state = load_torch_file(state_path)
    except CheckpointFileError as err:
        raise UsageError(f"--resume: cannot read {err}") from None
    changed = settings_changed(state["args"], args, run_dir)
    if changed:
        raise UsageError("--resume: the run to continue used other settings (its selections would not "
                         "repeat); " + "; ".join(changed))
    if (run_dir / "al_selection.csv").exists():
        read_selection_rows(run_dir / "al_selection.csv")
    return state


def make_strategy(args: argparse.Namespace) -> BaseActiveLearningStrategy:
    try:
        return ActiveLearningStrategyFactory.create_strategy(args.strategy)
    except ValueError as err:
        raise UsageError(f"--strategy {args.strategy}: {err}") from None


def pick_device(args: argparse.Namespace) -> torch.device:
    try:
        return utils.select_device(args.gpu)
    except utils.DeviceError as err:
        raise UsageError(f"--gpu {args.gpu}: {err}") from None


def write_demo_data(root: Path, seed: int) -> None:
    """The demo's synthetic data set, unless ``root`` holds it: written into a temporary folder renamed to ``root``
    when complete, so a run killed meanwhile leaves no half data set (its temporary folder is removed here)."""
    remove_stale_temps(root.parent, root.name)
    if (root / "Training_Data").is_dir():
        return
    log.info("demo: writing synthetic ISIC-format data to %s", root)
    try:
        with atomic_folder(root) as tmp:
            make_synthetic_isic(tmp, seed=seed, **DEMO_DATA)
    except OSError as err:
        raise UsageError(f"--output: cannot write the demo data {root} ({err.strerror or err}); remove {root} "
                         "or choose another --output") from None


def load_data(args: argparse.Namespace) -> Tuple[datasets_skin.SemiSupervisedSkinDataset, Optional[Dataset]]:
    """Training set (all unlabeled at first) and the validation subset; every file's header is checked here.
    With --oracle folder every training image counts (without a mask it is to be annotated) and the Validation
    split is optional (None). Both share one MaskNotes (what the masks read looked like, logged once per run)."""
    if args.demo and args.data_root is None:
        args.data_root = str(Path(args.output) / "demo_data")
        write_demo_data(Path(args.data_root), args.seed)
    folder = args.oracle == "folder"
    notes = datasets_skin.MaskNotes()
    try:
        train_set = datasets_skin.SemiSupervisedSkinDataset(
            *datasets_skin.find_split(args.data_root, "Training", masks_optional=folder), img_size=args.img_size,
            unlabeled_ok=folder, mask_notes=notes)
        if folder and not datasets_skin.split_present(args.data_root, "Validation"):
            return train_set, None
        val_set = datasets_skin.ValSkinDataset(
            *datasets_skin.find_split(args.data_root, "Validation"), img_size=args.img_size, mask_notes=notes)
    except datasets_skin.DatasetError as err:
        raise UsageError(f"--data_root {args.data_root}: {err}") from None
    val_idx = list(range(len(val_set) if args.val_limit is None else min(args.val_limit, len(val_set))))
    if args.num_workers:
        val_set.preload(val_idx)  # workers then share the decoded images instead of decoding their own
    return train_set, Subset(val_set, val_idx)


def make_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    checkpoint = None if args.checkpoint.lower() == "none" else args.checkpoint
    try:
        return build_model(args.model_cfg, checkpoint, args.img_size, args.rank, args.num_classes,
                           args.module, device, args.lora_ckpt, args.seed)
    except ConfigNotFoundError as err:
        raise UsageError(f"--model_cfg {args.model_cfg}: {err}") from None
    except CheckpointFileError as err:
        flag = "--lora_ckpt" if args.lora_ckpt and args.lora_ckpt in str(err) else "--checkpoint"
        raise UsageError(f"{flag}: {err}") from None
    except CheckpointError as err:
        raise UsageError(f"--checkpoint {checkpoint} does not fit --model_cfg {args.model_cfg}: {err}") from None
    except ValueError as err:
        if not args.lora_ckpt:
            raise
        raise UsageError(f"--lora_ckpt {args.lora_ckpt}: {err}") from None


def restore_state(run: Run, state: dict, argv: Sequence[str]) -> None:
    """Continue from ``last_state.pth``: trained weights, optimiser, labeled set, best so far; drop what an
    unfinished epoch wrote (its selection rows, a best checkpoint it saved)."""
    # Frozen weights come from --checkpoint as at the start; the state holds what training changed.
    _, unexpected = run.model.load_state_dict(state["trainable"], strict=False)
    if unexpected:
        raise UsageError(f"--resume: {run.state_path} does not fit this model (unexpected keys {unexpected[:3]})")
    run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:  # differs from the state's only after a divergence (settings_changed)
        group["lr"] = run.args.base_lr
    log_base_lr_change(run, state["args"].get("base_lr"))
    run.scaler.load_state_dict(state["scaler"])
    lost = sorted(set(state["labeled_names"]) - set(run.train_set.names))
    if lost:
        raise UsageError(f"--resume: {len(lost)} labeled images of the run are no longer in "
                         f"--data_root {run.args.data_root} (e.g. {lost[0]})")
    run.train_set.mark_labeled([run.train_set.names.index(n) for n in state["labeled_names"]])
    run.start_epoch, run.best_dice = state["epoch"] + 1, state["best_dice"]
    run.best_path = Path(state["best_path"]) if state["best_path"] else None
    truncate_selection_csv(run.csv_path, state["epoch"])
    for stale in run.run_dir.glob("best_model_dice*.pth"):
        if run.best_path is None or stale.name != run.best_path.name:
            stale.unlink()  # a best saved by an epoch that did not finish; it is redone
    with open(run.run_dir / "config.txt", "a") as f:
        f.write(f"# resumed at epoch {run.start_epoch}: {' '.join(argv)}\n")
    log.info("resuming %s at epoch %d: %d labeled images, best Dice %.4f",
             run.run_dir, run.start_epoch, len(run.labeled_names), run.best_dice)


def read_awaiting(run_dir: Path) -> Optional[dict]:
    """The round that waits for masks (AWAITING_FILE), or None."""
    path = run_dir / AWAITING_FILE
    if not path.is_file():
        return None
    try:
        waiting = json.loads(path.read_text())
        if not isinstance(waiting["epoch"], int) or not isinstance(waiting["pool_scores"], dict):
            raise ValueError("epoch or pool_scores malformed")
        list(waiting["images"]), str(waiting["round_dir"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--resume: {path} is unreadable ({type(err).__name__}: {err}); it is written by this "
                         "program when a round waits for masks: restore it, nothing was changed") from None
    return waiting


def round_problems(args: argparse.Namespace, waiting: dict, state: dict,
                   train_set: datasets_skin.SemiSupervisedSkinDataset) -> Tuple[List[str], List[int], List[str], str]:
    """Check the round's images and masks and the earlier masks: (problems, each naming its file; the images
    to label now; notes; a hint). Absent masks are problems unless --accept_partial and one mask is there."""
    index = {name: i for i, name in enumerate(train_set.names)}
    image_dir = train_set.samples[0].image_path.parent
    requested = [Path(f).stem for f in waiting["images"]]
    problems = [f"{image_dir / f}: the image of this round is gone" for f in waiting["images"]
                if Path(f).stem not in index]
    problems += [f"{image_dir}/{name}.*: an image labeled in an earlier round is gone"
                 for name in state["labeled_names"] if name not in index]
    problems += [f"{train_set.samples[index[name]].mask_path}: the mask of an image labeled in an earlier round "
                 "is gone (training needs it)" for name in state["labeled_names"]
                 if name in index and not train_set.samples[index[name]].mask_path.is_file()]
    report = annotation_rounds.check_masks(train_set.samples[index[n]] for n in requested if n in index)
    problems += report.problems
    absent = {s.name for s in report.missing}
    present = [index[n] for n in requested if n in index and n not in absent]
    hint = ""
    if absent and not (args.accept_partial and present):
        problems += [f"{s.mask_path}: missing (the mask of {s.image_path.name})" for s in report.missing]
        hint = "" if args.accept_partial else ("; or pass --accept_partial to continue with the masks that are there "
                                               "(the other images go back to the unlabeled pool)")
    notes = report.notes + ([f"--accept_partial: {len(absent)} images of round {waiting['epoch']} have no mask and "
                             f"go back to the unlabeled pool: {', '.join(sorted(absent))}"] if absent else [])
    return problems, present, notes, hint


def accept_round(args: argparse.Namespace, run_dir: Path, state: dict,
                 train_set: datasets_skin.SemiSupervisedSkinDataset) -> Tuple[Optional[AcceptedRound], List[str]]:
    """--resume while a round waits for masks: check everything it needs before anything changes; the round as
    its epoch's selection, and notes. Raises UsageError listing every failing file."""
    waiting = read_awaiting(run_dir)
    if waiting is None or waiting["epoch"] <= state["epoch"]:
        return None, []  # no round waits (the marker of a round already trained on is stale)
    where = f"round {waiting['epoch']} ({run_dir / waiting['round_dir']})"
    if waiting["epoch"] != state["epoch"] + 1:
        raise UsageError(f"--resume: {run_dir / AWAITING_FILE} ({where}) does not follow {run_dir / 'last_state.pth'} "
                         f"(epoch {state['epoch']}); nothing was changed")
    if args.oracle != "folder":
        raise UsageError(f"--resume: {where} waits for masks ({run_dir / AWAITING_FILE}); continue it with "
                         "--oracle folder; nothing was changed")
    problems, chosen, notes, hint = round_problems(args, waiting, state, train_set)
    if problems:
        raise UsageError(f"--resume: {where} cannot continue; nothing was changed:\n  " + "\n  ".join(problems)
                         + "\nSave each mask as a 0/255 PNG of its image's size at the path named, then run the "
                         f"same command again{hint}")
    index = {name: i for i, name in enumerate(train_set.names)}
    scores = {index[n]: float(v) for n, v in waiting["pool_scores"].items() if n in index}
    return AcceptedRound(waiting["epoch"], chosen, scores), notes


def label_existing_masks(train_set: datasets_skin.SemiSupervisedSkinDataset) -> List[str]:
    """A new --oracle folder run: the images that already have a mask (checked as a round's) are the initial
    labeled set; the others are the pool, which must not be empty. Notes to log."""
    report = annotation_rounds.check_masks(train_set.samples)
    image_dir, mask_dir = train_set.samples[0].image_path.parent, train_set.samples[0].mask_path.parent
    if report.problems:
        raise UsageError(f"--data_root: masks in {mask_dir} that cannot be used:\n  " + "\n  ".join(report.problems)
                         + "\nfix or remove them (an image without a mask is one to annotate)")
    if not report.missing:
        raise UsageError(f"--oracle folder: every image in {image_dir} already has a mask in {mask_dir}, so there is "
                         "nothing to select for annotation; train on them with --oracle ground_truth, or add images "
                         "without masks")
    unlabeled = {s.name for s in report.missing}
    train_set.mark_labeled(i for i, name in enumerate(train_set.names) if name not in unlabeled)
    return report.notes + [f"--oracle folder: {len(train_set) - len(unlabeled)} images already have a mask (the "
                           f"initial labeled set), {len(unlabeled)} are to be annotated"]


def make_oracle(args: argparse.Namespace, run_dir: Path, state: Optional[dict],
                train_set: datasets_skin.SemiSupervisedSkinDataset) -> Oracle:
    """The oracle of --oracle, after every check of its masks (nothing is written before)."""
    accepted, notes = accept_round(args, run_dir, state, train_set) if state is not None else (None, [])
    if args.oracle == "ground_truth":
        return Oracle()
    if state is None:
        notes = label_existing_masks(train_set)
    oracle = FolderOracle(accepted)
    oracle.notes = notes
    return oracle


def log_base_lr_change(run: Run, old_lr: object) -> None:
    if str(old_lr) != str(run.args.base_lr):
        log.info("--base_lr is now %s (it was %s when the run stopped on divergence)", run.args.base_lr, old_lr)


def tidy_run_folder(run: Run, dead: bool) -> None:
    """At start and resume, logged: remove the temporary files that killed writes left in the run folder, and
    clear a dead run (see ``dead_run``)."""
    stale = remove_stale_temps(run.run_dir)
    if stale:
        log.info("removed %d temporary file(s) left by a write that was killed: %s", len(stale),
                 ", ".join(p.name for p in stale))
    if dead:
        old_lr = read_config(run.run_dir / "config.txt").get("base_lr", run.args.base_lr)
        removed = clear_dead_run(run.run_dir)
        log.info("%s holds a run that stopped before finishing its first epoch (no last_state.pth), so there is "
                 "nothing to continue: %s; removed what it wrote: %s", run.run_dir,
                 "--resume starts it from epoch 1" if run.args.resume else "starting it afresh",
                 ", ".join(str(p.relative_to(run.run_dir)) for p in removed) or "nothing")
        log_base_lr_change(run, old_lr)


def log_start(run: Run, argv: Sequence[str]) -> None:
    args = run.args
    log.info("command: trainer.py %s", " ".join(argv))
    log.info("device %s | model %s | checkpoint %s | img_size %d | %d training images, %d validation",
             run.device, args.model_cfg, args.checkpoint, args.img_size, len(run.train_set), len(run.val_set or ()))
    if run.val_set is None:
        log.info("no Validation split under %s: the run does not validate, and keeps only last_model.pth",
                 args.data_root)
    for note in run.oracle.notes:
        log.info(note)
    if args.checkpoint.lower() == "none":
        log.warning("!" * 78)
        log.warning("!! NO SAM2 CHECKPOINT: the model starts from SEEDED RANDOM WEIGHTS, not SAM2.1.")
        log.warning("!! Scores and Dice show the pipeline works, not what SAM2 achieves; %s.", DOWNLOAD_HINT)
        log.warning("!" * 78)
    if run.device.type == "cpu" and not args.demo:
        log.warning("training on the CPU: expect this to be very slow at --img_size %d", args.img_size)


def start_run(args: argparse.Namespace, argv: Sequence[str]) -> Run:
    """Check the run folder, load data and model, then create (or reopen, with --resume) the run folder.
    Everything that can fail on bad input fails before the folder is created."""
    run_dir = Path(args.output) / f"Skin_{args.img_size}"
    dead = dead_run(args, run_dir)
    state = None if dead else read_resume_state(args, run_dir)
    strategy, device = make_strategy(args), pick_device(args)
    utils.seed_everything(args.seed, deterministic=args.deterministic)
    train_set, val_set = load_data(args)
    oracle = make_oracle(args, run_dir, state, train_set)
    model = make_model(args, device)
    model.set_grad_checkpointing(args.grad_ckpt)
    if args.compile:
        model.compile_image_encoder()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.base_lr, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=utils.amp_dtype(device) == torch.float16)
    run = Run(args, run_dir, device, strategy, train_set, val_set, model, optimizer, scaler, oracle)

    run_dir.mkdir(parents=True, exist_ok=True)
    add_log_handler(logging.FileHandler(run_dir / "log.txt", mode="a"))
    tidy_run_folder(run, dead)
    if state is not None:
        restore_state(run, state, argv)
    else:
        write_config(run_dir / "config.txt", args)
    # The pid in the event file's name: a resume within the same second must not overwrite the earlier file.
    run.writer = SummaryWriter(str(run_dir / "log"), purge_step=run.start_epoch if args.resume else None,
                               filename_suffix=f".{os.getpid()}")
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


def nonfinite_names(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors that hold NaN or inf (one device sync for all of them)."""
    floats = {name: t for name, t in tensors.items() if torch.is_floating_point(t)}
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(t.detach()).all() for t in floats.values()]).tolist()
    return [name for name, ok in zip(floats, finite) if not ok]


def check_finite(run: Run, epoch: int, what: str, tensors: Dict[str, torch.Tensor]) -> None:
    """Stop the run where NaN or inf first shows in ``tensors`` (``what`` says where): DIVERGED_FILE records that
    it stopped on divergence (so that --resume may lower --base_lr), nothing else is written, and DivergenceError
    names the epoch. Everything saved passes through here first, so no checkpoint holds a non-finite tensor."""
    bad = nonfinite_names(tensors)
    if not bad:
        return
    lr = run.args.base_lr
    atomic_write_text(run.run_dir / DIVERGED_FILE, json.dumps(
        dict(epoch=epoch, where=what, tensors=bad[:20], base_lr=lr), indent=1) + "\n")
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise DivergenceError(f"training diverged in epoch {epoch} ({what}): NaN or inf in {shown}, at --base_lr "
                          f"{lr:g}; " + how_to_go_on(epoch, f"choose a lower --base_lr (e.g. {lr / 10:g})"))


def stops_on_bad_file(step):
    """Decorates an epoch step ``step(run, epoch, ...)``: a DatasetError (a file whose header is fine but whose data
    is not can only be found when it is first decoded, mid-run) becomes a one-line UsageError naming the file;
    the last finished epoch stays as it was saved, so --resume works once the file is replaced or removed."""
    @wraps(step)
    def checked(run: Run, epoch: int, *args, **kwargs):
        try:
            return step(run, epoch, *args, **kwargs)
        except datasets_skin.DatasetError as err:  # from a DataLoader worker its text ends with the original line
            text = str(err).strip().splitlines()[-1].split("DatasetError: ", 1)[-1].rstrip(". ")
            raise UsageError(f"--data_root {run.args.data_root}: {text} (found in epoch {epoch}); "
                             + how_to_go_on(epoch, "replace or remove that file")) from None
    return checked


# ----------------------------------------------------------------------------- the steps of an epoch

def labels_wanted(run: Run) -> int:
    """How many images this epoch selects: --batch_size, fewer to end exactly at --label_budget or when the
    unlabeled images run out; 0 = the run is over."""
    wanted = min(run.args.batch_size, len(run.train_set.unlabeled_indices))
    if run.args.label_budget is not None:
        wanted = min(wanted, run.args.label_budget - len(run.train_set.labeled_indices))
    return max(wanted, 0)


@stops_on_bad_file
def select_batch(run: Run, epoch: int, k: int) -> Tuple[List[int], Dict[int, float]]:
    """Score a fresh random pool of unlabeled images; the k best (highest score first) and every pool score."""
    args = run.args
    pool = draw_pool(run.train_set.unlabeled_indices, args.pool_size, args.seed, epoch)
    run.model.eval()
    batch_size = args.score_batch_size or default_score_batch_size(run.device, args.batch_size)
    chosen, scores = run.strategy.select(run.model, run.train_set, pool, k, run.device, batch_size=batch_size,
                                         seed=epoch_seed(args.seed, epoch), num_workers=args.num_workers,
                                         progress=True)
    check_finite(run, epoch, "scoring the pool",
                 {run.train_set.names[int(i)]: torch.tensor(float(s)) for i, s in scores.items()})
    return [int(i) for i in chosen], {int(i): float(s) for i, s in scores.items()}


@stops_on_bad_file
def annotate(run: Run, epoch: int, chosen: List[int], scores: Dict[int, float]) -> None:
    """Mark the chosen images labeled (their masks are read only from now on) and log the selection."""
    train_set, writer = run.train_set, run.writer
    train_set.mark_labeled(chosen)
    rank = ranks_in_pool(scores)
    append_selection_rows(run.csv_path, [[epoch, train_set.names[i], f"{scores[i]:.6f}", rank[i]] for i in chosen])
    writer.add_histogram("al/pool_scores", np.array(list(scores.values())), epoch)
    writer.add_scalar("al/labeled", len(train_set.labeled_indices), epoch)
    writer.add_scalar("al/selected_score_mean", float(np.mean([scores[i] for i in chosen])), epoch)
    samples = [train_set[i] for i in chosen]
    writer.add_image("al/selected", make_grid(
        [tb_images.overlay(s["image"], s["label"], None) for s in samples], nrow=len(samples)), epoch)
    if isinstance(run.strategy, MaskDifferenceStrategy):  # why these images: the discrepancy their score measured
        images = torch.stack([s["image"] for s in samples])
        compared = run.strategy.compared_predictions(run.model, images, chosen, run.device,
                                                     epoch_seed(run.args.seed, epoch))
        picture = tb_images.why_selected_image(images, compared, [scores[i] for i in chosen], run.strategy.threshold)
        writer.add_image("al/why_selected", picture, epoch)


def train_step(run: Run, batch: dict, prompt_rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    """One optimiser step on one mini-batch (prompt points drawn from ``prompt_rng``); the loss parts, detached."""
    args, model, optimizer, scaler = run.args, run.model, run.optimizer, run.scaler
    images = batch["image"].to(run.device, non_blocking=True)
    labels = batch["label"].to(run.device, non_blocking=True)
    prompt_idx = -1 if args.promptmode == "none" else 0
    with utils.autocast(run.device):
        outputs = model(images, args.num_classes > 1, args.img_size, prompt_idx, args.promptmode, prompt_rng)
    parts = dual_decoder_loss(outputs, labels, args.dice_weight)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(parts["loss"]).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm=1.0)
    scaler.step(optimizer)
    scaler.update()
    return {name: value.detach() for name, value in parts.items()}


@stops_on_bad_file
def train_one_epoch(run: Run, epoch: int, chosen: List[int]) -> Dict[str, float]:
    """Train on the labeled set (--train_on labeled) or this epoch's selection (selected); image-weighted
    mean of every loss part. Batch order and prompt points come from generators seeded by (seed, epoch), never
    from what scoring drew, so a restarted process or another strategy trains with the same draws."""
    args = run.args
    train_idx = run.train_set.labeled_indices if args.train_on == "labeled" else chosen
    if args.num_workers:
        run.train_set.preload(train_idx)
    order = torch.Generator().manual_seed(epoch_seed(args.seed, epoch))
    prompt_rng = np.random.default_rng([args.seed, epoch, 1])
    loader = DataLoader(Subset(run.train_set, train_idx), batch_size=args.batch_size, shuffle=True,
                        generator=order, num_workers=args.num_workers)
    run.model.train()
    sums: Dict[str, float] = {}
    trainable = {name: p for name, p in run.model.named_parameters() if p.requires_grad}
    for step, batch in enumerate(tqdm(loader, desc=f"epoch {epoch} train", leave=False, dynamic_ncols=True), 1):
        parts = train_step(run, batch, prompt_rng)
        # A step skipped by the fp16 gradient scaler (inf gradients) leaves the weights as they were: not divergence.
        check_finite(run, epoch, f"training step {step}", {"loss": parts["loss"], **trainable})
        utils.crash_point("train_batch", epoch)
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + float(value) * batch["image"].shape[0]
    means = {k: v / len(train_idx) for k, v in sums.items()}
    for name, value in means.items():
        run.writer.add_scalar(f"train/{name}", value, epoch)
    run.writer.add_scalar("train/lr", run.optimizer.param_groups[0]["lr"], epoch)
    return means


@stops_on_bad_file
def validate_epoch(run: Run, epoch: int) -> Dict[str, float]:
    """Mean validation metrics (decoder 1, no prompt, original resolution) and a TensorBoard picture; {} without
    a Validation split."""
    args, model = run.args, run.model
    if run.val_set is None:
        return {}
    model.eval()

    def predict(images: torch.Tensor) -> torch.Tensor:
        logits = predict_logits(model, run.device, images)
        check_finite(run, epoch, "validation", {"predicted logits": logits})
        return logits

    loader = DataLoader(run.val_set, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        collate_fn=datasets_skin.collate_val)
    result = val.validate(predict, tqdm(loader, desc=f"epoch {epoch} val", leave=False, dynamic_ncols=True),
                          args.num_classes, run.device, truths=run.truths)
    metrics = {k: float(v) for k, v in result["mean"].items()}
    for name, value in metrics.items():
        run.writer.add_scalar(f"val/{name}", value, epoch)
    shown = [run.val_set[i] for i in range(min(4, len(run.val_set)))]
    images = torch.stack([s["image"] for s in shown])
    pred = F.interpolate(predict(images), size=images.shape[-2:], mode="bilinear",
                         align_corners=False).argmax(1).cpu() > 0
    run.writer.add_image("val/prediction_over_gt", make_grid(
        [tb_images.overlay(s["image"], s["label"] > 0, p) for s, p in zip(shown, pred)], nrow=len(shown)), epoch)
    return metrics


def save_checkpoints(run: Run, epoch: int, metrics: Dict[str, float]) -> None:
    """The full state_dict as best_model_dice*.pth when validation Dice improves (from --save_from_epoch on),
    then last_state.pth (what --resume needs); the older best is removed only after both are written."""
    args = run.args
    dice = metrics.get("dice", float("nan"))
    check_finite(run, epoch, "saving last_state.pth", state_tensors(run))
    old_best = None
    if metrics and epoch >= args.save_from_epoch and dice > run.best_dice:
        full = cpu_state_dict(run.model)
        check_finite(run, epoch, "saving the best model", full)
        old_best, run.best_dice = run.best_path, dice
        run.best_path = run.run_dir / f"best_model_dice{dice:.4f}.pth"
        atomic_torch_save(full, run.best_path)
        log.info("epoch %d: new best Dice %.4f -> %s", epoch, dice, run.best_path)
    save_state(run, epoch)
    (run.run_dir / AWAITING_FILE).unlink(missing_ok=True)  # the masks of its round are in last_state now
    (run.run_dir / DIVERGED_FILE).unlink(missing_ok=True)  # the state now records the settings that worked
    if old_best is not None and old_best != run.best_path and old_best.exists():
        old_best.unlink()


def state_tensors(run: Run) -> Dict[str, torch.Tensor]:
    """The tensors last_state.pth holds: the trained weights and the optimiser's state."""
    tensors = {name: p for name, p in run.model.named_parameters() if p.requires_grad}
    tensors.update({f"optimizer {key} of {i}": value for i, per in run.optimizer.state_dict()["state"].items()
                    for key, value in per.items() if torch.is_tensor(value)})
    return tensors


def save_state(run: Run, epoch: int) -> None:
    """last_state.pth: what --resume continues from, the state at the end of ``epoch`` (the crash point
    ``checkpoint_write`` lies between writing it and renaming it into place)."""
    with atomic_path(run.state_path) as tmp:
        torch.save(dict(
            epoch=epoch, args={k: getattr(run.args, k) for k in RESUME_KEYS}, trainable=trainable_state(run.model),
            optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(), labeled_names=run.labeled_names,
            best_dice=run.best_dice, best_path=str(run.best_path) if run.best_path else "",
        ), tmp)
        utils.crash_point("checkpoint_write", epoch)


def log_epoch(run: Run, epoch: int, losses: Dict[str, float], metrics: Dict[str, float],
              times: Dict[str, float]) -> None:
    for level, line in run.train_set.mask_notes.news():  # 0/1 masks, other values, empty masks: once each
        log.log(level, line)
    for name, value in times.items():
        run.writer.add_scalar(f"time/{name}", value, epoch)
    peak = utils.peak_memory_gb(run.device)  # None off CUDA
    if peak is not None:
        run.writer.add_scalar("memory/peak_gb", peak, epoch)
    run.writer.flush()
    val_text = f"val dice {metrics['dice']:.4f} hd95 {metrics['hd95']:.2f}" if metrics else "val skipped"
    log.info("epoch %3d/%d | labeled %4d | loss %.4f (dec1 %.4f, dec2 %.4f) | %s"
             " | time scoring %.1fs train %.1fs val %.1fs%s",
             epoch, run.args.max_epochs, len(run.labeled_names), losses["loss"], losses["loss_dec1"],
             losses["loss_dec2"], val_text, times["scoring_s"], times["train_s"], times["val_s"],
             "" if peak is None else f" | peak memory {peak:.2f} GiB")


@contextmanager
def timed(times: Dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    times[name] = time.perf_counter() - start


def stop_reason(run: Run) -> str:
    if run.args.label_budget is not None and len(run.labeled_names) >= run.args.label_budget:
        return f"the label budget of {run.args.label_budget} images is reached"
    return f"all {len(run.train_set)} training images are labeled: nothing left to select"


def finish_run(run: Run, epochs: int) -> dict:
    """Write last_model.pth (the full state_dict at the end of the run) and say where everything is."""
    final = cpu_state_dict(run.model)
    check_finite(run, epochs, "saving last_model.pth", final)
    atomic_torch_save(final, run.run_dir / "last_model.pth")
    no_best = "n/a (no Validation split)" if run.val_set is None else \
        "n/a (no checkpoint: none saved before --save_from_epoch)"
    log.info("done: %d epochs, %d labeled images; best Dice %s", epochs, len(run.labeled_names),
             f"{run.best_dice:.4f}" if run.best_path else no_best)
    log.info("TensorBoard logs: %s   (view: tensorboard --logdir %s)", run.run_dir / "log", run.run_dir / "log")
    log.info("selection log:    %s", run.csv_path)
    log.info("final model:      %s", run.run_dir / "last_model.pth")
    if run.best_path:
        log.info("best checkpoint:  %s", run.best_path)
    return dict(run_dir=run.run_dir, best_path=run.best_path, best_dice=run.best_dice, epochs=epochs,
                labeled=run.labeled_names)


# ----------------------------------------------------------------------------- a round for a person (--oracle folder)

def round_dir(run: Run, epoch: int) -> Path:
    return run.run_dir / "annotate" / f"round_{epoch:03d}"


@torch.no_grad()
def proposal_masks(run: Run, chosen: List[int]) -> List[np.ndarray]:
    """The current model's masks of ``chosen`` (H x W bool at each image's original size), as validation predicts
    them: decoder 1, no prompt; before any training this is zero-shot SAM2."""
    run.model.eval()
    images = torch.stack([run.train_set[i]["image"] for i in chosen])
    logits = predict_logits(run.model, run.device, images)
    return [val.logits_to_label_map(one, run.train_set.samples[i].orig_size) > 0 for one, i in zip(logits, chosen)]


def write_annotation_round(run: Run, epoch: int, chosen: List[int], scores: Dict[int, float]) -> None:
    """Stop for annotation: last_state.pth holds the model and optimiser that made this selection (the end of
    epoch - 1); then the round's files, then AWAITING_FILE with the selection and the pool's scores, so that
    --resume continues this epoch exactly as an uninterrupted run would."""
    if not run.state_path.is_file():  # else it holds the end of epoch - 1 already (saved or resumed from)
        save_state(run, epoch - 1)
    rank, samples = ranks_in_pool(scores), run.train_set.samples
    samples[0].mask_path.parent.mkdir(exist_ok=True)  # the dataset's mask folder, for the person's masks
    items = [annotation_rounds.RoundItem(samples[i], scores[i], rank[i], proposal)
             for i, proposal in zip(chosen, proposal_masks(run, chosen))]
    annotation_rounds.write_round(round_dir(run, epoch), items)
    waiting = dict(epoch=epoch, round_dir=str(round_dir(run, epoch).relative_to(run.run_dir)),
                   images=[samples[i].image_path.name for i in chosen],
                   pool_scores={samples[i].name: score for i, score in scores.items()})
    atomic_write_text(run.run_dir / AWAITING_FILE, json.dumps(waiting, indent=1) + "\n")


def continue_command(argv: Sequence[str]) -> str:
    script = "trainer.py" if Path.cwd().resolve() == REPO else str(REPO / "trainer.py")
    return shlex.join(["python3", script, *argv, *([] if "--resume" in argv else ["--resume"])])


def stop_for_annotation(run: Run, epoch: int, argv: Sequence[str]) -> dict:
    """Say where each mask goes and the one command that continues; the run's result so far."""
    folder = round_dir(run, epoch)
    rows = annotation_rounds.read_round(folder)
    log.info("round %d waits for %d masks. Images, the model's proposals (*%s) and overlays: %s", epoch,
             len(rows), annotation_rounds.PROPOSAL_SUFFIX, folder)
    log.info("save each mask (a 0/255 PNG of the image's size; correct the proposal rather than draw from scratch):")
    for row in rows:
        log.info("  %s -> %s", row["image"], row["save_mask_as"])
    log.info("then continue with:\n  %s", continue_command(argv))
    return dict(run_dir=run.run_dir, best_path=run.best_path, best_dice=run.best_dice, epochs=epoch - 1,
                labeled=run.labeled_names, round_dir=folder, requested=[Path(r["image"]).stem for r in rows])


# ----------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    add_log_handler(logging.StreamHandler(sys.stdout))
    run = None
    try:
        prepare_args(parser, args, argv)
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

            # 1) score a fresh random pool and select the top batch_size (or the round resumed, selected before)
            with timed(times, "scoring_s"):
                chosen, scores = run.oracle.earlier_selection(epoch) or select_batch(run, epoch, wanted)

            # 2) the oracle: ground_truth has the masks; folder writes the round for a person and stops here
            if not run.oracle.masks_ready(run, epoch, chosen, scores):
                return stop_for_annotation(run, epoch, argv)
            annotate(run, epoch, chosen, scores)  # only now are the selected masks read
            utils.crash_point("selected", epoch)

            # 3) train on the labeled set. Default (--train_on labeled): every image labeled so far,
            # so earlier annotations keep counting; the reference trained on this epoch's batch only
            # (--train_on selected), i.e. one optimiser step per epoch.
            with timed(times, "train_s"):
                losses = train_one_epoch(run, epoch, chosen)

            # 4) validate with decoder 1, no prompt (how the model is used after training); always after
            # the last selection
            last = epoch == args.max_epochs or labels_wanted(run) == 0
            with timed(times, "val_s"):
                metrics = validate_epoch(run, epoch) if epoch % args.val_every == 0 or last else {}

            # 5) checkpoint: the full LoRA_Sam state_dict when validation Dice improves; the resume state
            save_checkpoints(run, epoch, metrics)
            log_epoch(run, epoch, losses, metrics, times)
            utils.crash_point("epoch_end", epoch)

        return finish_run(run, epoch)
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")  # one line: the message names the flag or file
    finally:
        if run is not None and run.writer is not None:
            run.writer.close()
        for handler in list(log.handlers):  # the console and log.txt
            log.removeHandler(handler)
            handler.close()


if __name__ == "__main__":
    main()
