#!/usr/bin/env python3
"""MD-SAM-AL trainer: cold-start active learning with SAM2 (LoRA image encoder, two mask decoders).

Every epoch:

    unlabeled images --(random pool of --pool_size)--> strategy scores the pool
        --> the top --batch_size images are "annotated" (their masks are read only now)
        --> both decoders (+ LoRA, prompt encoder) are fine-tuned on the labeled set
        --> validation (decoder 1, no prompt) --> best checkpoint from --save_from_epoch on

    python trainer.py --data_root /data/ISIC2017 --output ./output --gpu 0
    python trainer.py --demo        # synthetic data, sam2.1_hiera_t, CPU, no download

Outputs go to OUTPUT/Skin_{img_size}/: log/ (TensorBoard), config.txt, log.txt,
al_selection.csv, best_model_dice{score:.4f}.pth and last_state.pth (for --resume).
Nothing below this file reads command-line flags.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from importlib import import_module
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL_CFG = "./sam2/configs/sam2.1/sam2.1_hiera_l.yaml"
DEFAULT_CHECKPOINT = "./sam2/checkpoints/sam2.1_hiera_large.pt"
DEMO_CHECKPOINT = REPO / "sam2" / "checkpoints" / "sam2.1_hiera_tiny.pt"
DOWNLOAD_HINT = "see sam2/checkpoints/README.md for where to download the official SAM2.1 checkpoints"


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
# (measured: 37 s wall on 2 quiet Xeon cores; training dominates, as it grows with the labeled set).
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

log = logging.getLogger("trainer")


# ----------------------------------------------------------------------------- flags

def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """Names of the flags written on the command line (default or not)."""
    unset = object()  # argparse fills in defaults only for attributes the namespace lacks
    names = vars(parser.parse_args([]))
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in names}))
    return {k for k, v in vars(parsed).items() if v is not unset}


def existing_path(path: str) -> Optional[Path]:
    """``path`` as given, else relative to this repository (so ./sam2/... works from anywhere)."""
    for candidate in (Path(path), REPO / path):
        if candidate.exists():
            return candidate
    return None


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag error, found before anything is loaded; parser.error names the flag."""
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1 (got {args.batch_size})")
    if args.pool_size < args.batch_size:
        parser.error(f"--pool_size ({args.pool_size}) must be >= --batch_size ({args.batch_size}): "
                     "the batch is selected from the pool")
    if args.img_size < 32 or args.img_size % 32:
        parser.error(f"--img_size must be a positive multiple of 32 (got {args.img_size}); "
                     "e.g. 256, 512 or 1024")
    if not 1 <= args.num_classes <= 4:
        parser.error(f"--num_classes must be 1..4 (one SAM2 mask token per class; got {args.num_classes})")
    for flag in ("max_epochs", "rank", "val_every", "save_from_epoch"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    if args.val_limit is not None and args.val_limit < 1:
        parser.error(f"--val_limit must be >= 1 (got {args.val_limit})")
    if args.num_workers < 0:
        parser.error(f"--num_workers must be >= 0 (got {args.num_workers})")
    if not 0.0 <= args.dice_weight <= 1.0:
        parser.error(f"--dice_weight must be in [0, 1] (got {args.dice_weight})")
    if args.base_lr <= 0:
        parser.error(f"--base_lr must be > 0 (got {args.base_lr})")
    if args.data_root is None and not args.demo:
        parser.error("--data_root is required (the dataset root in ISIC-2017 layout); "
                     "or try --demo for synthetic data")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        parser.error(f"--data_root {args.data_root}: no such folder")
    if args.checkpoint.lower() != "none":
        found = existing_path(args.checkpoint)
        if found is None or not found.is_file():
            parser.error(f"--checkpoint {args.checkpoint}: file not found; {DOWNLOAD_HINT} "
                         "(or pass --demo to try the pipeline without one)")
        args.checkpoint = str(found)
    found = existing_path(args.model_cfg)  # else a packaged/short name, resolved by build_sam2
    if found is not None and found.is_file():
        args.model_cfg = str(found)
    if args.lora_ckpt is not None and not Path(args.lora_ckpt).is_file():
        parser.error(f"--lora_ckpt {args.lora_ckpt}: file not found")
    try:
        module = import_module(args.module)
    except ImportError as err:
        parser.error(f"--module {args.module}: cannot be imported ({err})")
    if not hasattr(module, "LoRA_Sam"):
        parser.error(f"--module {args.module} ({getattr(module, '__file__', '?')}) defines no LoRA_Sam class")


def apply_demo_settings(args: argparse.Namespace, given: set) -> None:
    for key, value in DEMO_SETTINGS.items():
        if key not in given:
            setattr(args, key, value)


# ----------------------------------------------------------------------------- model

def build_model(model_cfg: str, checkpoint: Optional[str], img_size: int, rank: int = 4,
                num_classes: int = 1, module: str = "sam_lora_image_encoder_prompt",
                device: torch.device | str = "cpu", lora_ckpt: Optional[str] = None,
                seed: int = 0) -> torch.nn.Module:
    """SAM2 (``build_sam2``) wrapped in ``LoRA_Sam`` on ``device``; the one place a model is made.

    ``checkpoint=None`` gives seeded random weights (reproducible for ``seed``). ``lora_ckpt``
    (LoRA-only format) is loaded on top. val.py's CLI reuses this function.
    """
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)  # random init (no checkpoint) and LoRA A matrices are reproducible
    sam = build_sam2(model_cfg, checkpoint, device=str(device), mode="train", image_size=img_size)
    net = import_module(module).LoRA_Sam(sam, r=rank, num_classes=num_classes).to(device)
    if lora_ckpt:
        net.load_lora_parameters(lora_ckpt)
    return net


def trainable_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors training changes (LoRA, prompt encoder, decoders), on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def cpu_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def dual_decoder_loss(outputs: Dict[str, torch.Tensor], labels: torch.Tensor,
                      dice_weight: float) -> Dict[str, torch.Tensor]:
    """Mean of both decoders' (1-w)*CE + w*Dice (logits B x (C+1) x S/4 x S/4 upsampled to the
    B x S x S labels), under "loss", plus every part for logging."""
    import utils

    parts: Dict[str, torch.Tensor] = {}
    for d in (1, 2):
        logits = F.interpolate(outputs[f"low_res_logits{d}"].float(), size=labels.shape[-2:],
                               mode="bilinear", align_corners=False)
        parts[f"loss_dec{d}"], parts[f"ce_dec{d}"], parts[f"dice_dec{d}"] = utils.segmentation_loss(
            logits, labels, dice_weight=dice_weight)
    parts["loss"] = 0.5 * (parts["loss_dec1"] + parts["loss_dec2"])
    return parts


# ----------------------------------------------------------------------------- files

def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


CSV_HEADER = ["epoch", "image", "score", "rank_in_pool"]


def append_selection_rows(path: Path, rows: List[list]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        if new:
            writer.writerow(CSV_HEADER)
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def truncate_selection_csv(path: Path, last_epoch: int) -> None:
    """Drop rows of epochs after ``last_epoch`` (written by a run killed mid-epoch)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header] + [r for r in rows if int(r[0]) <= last_epoch])
    os.replace(tmp, path)


def run_folder_in_use(run_dir: Path) -> Optional[str]:
    for name in ("config.txt", "al_selection.csv", "last_state.pth"):
        if (run_dir / name).exists():
            return name
    return None


def setup_logging(log_file: Optional[Path]) -> List[logging.Handler]:
    """Console + (once the run folder exists) log.txt; returns the handlers to close at the end."""
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, mode="a"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return handlers


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
    from active_learning_strategies import top_k

    return {idx: r + 1 for r, idx in enumerate(top_k(scores, len(scores)))}


# ----------------------------------------------------------------------------- images for TensorBoard

def overlay(image: torch.Tensor, gt: Optional[torch.Tensor], pred: Optional[torch.Tensor]) -> torch.Tensor:
    """3 x H x W normalised image -> 3 x H x W in [0, 1]; prediction tinted red, ground-truth outline green."""
    from datasets_skin import PIXEL_MEAN, PIXEL_STD

    mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
    img = (image.cpu().float() * std + mean).clamp(0, 1)
    if pred is not None:
        p = pred.cpu().bool()
        img[0][p] = 0.5 * img[0][p] + 0.5
        img[1][p] *= 0.5
        img[2][p] *= 0.5
    if gt is not None:
        g = gt.cpu().float()[None, None]
        inner = -F.max_pool2d(-g, 3, stride=1, padding=1)  # erosion
        edge = (g - inner)[0, 0].bool()
        img[:, edge] = torch.tensor([0.0, 1.0, 0.0]).view(3, 1)
    return img


# ----------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        apply_demo_settings(args, explicit_flags(parser, argv))
    if args.output is None:
        args.output = "./output_demo" if args.demo else "./output"
    check_flags(parser, args)

    # Imports that need the project's modules (kept here so --help and flag errors stay fast).
    import datasets_skin
    import utils
    import val
    from active_learning_strategies import ActiveLearningStrategyFactory
    from sam_lora_image_encoder_prompt import atomic_torch_save  # tmp file + rename: a kill leaves no half file
    from tensorboardX import SummaryWriter
    from torchvision.utils import make_grid
    from tqdm import tqdm

    run_dir = Path(args.output) / f"Skin_{args.img_size}"
    in_use = run_folder_in_use(run_dir)
    if in_use and not args.resume:
        again = f" (to run the demo afresh: rm -r {args.output})" if args.demo else ""
        parser.error(f"--output {args.output}: {run_dir} already holds a run ({run_dir / in_use}); "
                     f"pass --resume to continue it, or choose another --output{again}; nothing was overwritten")
    state_path = run_dir / "last_state.pth"
    state = None
    if args.resume:
        if not state_path.is_file():
            parser.error(f"--resume: {state_path} does not exist, so there is no run to continue "
                         "(it is written at the end of every epoch)")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in several types
            parser.error(f"--resume: cannot read {state_path} ({type(err).__name__}: {err})")
        changed = [f"--{k} was {state['args'].get(k)!r}, now {getattr(args, k)!r}"
                   for k in RESUME_KEYS if state["args"].get(k) != getattr(args, k)]
        if changed:
            parser.error("--resume: the run to continue used other settings (its selections would not "
                         "repeat); " + "; ".join(changed))
    try:
        strategy = ActiveLearningStrategyFactory.create_strategy(args.strategy)
    except (KeyError, ValueError) as err:
        parser.error(f"--strategy {args.strategy}: {err}")
    try:
        device = utils.select_device(args.gpu)
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))  # names --gpu and lists the devices present

    handlers = setup_logging(None)
    writer = None
    try:
        utils.seed_everything(args.seed, deterministic=args.deterministic)

        # ---- data (every file's header is checked here, before any training)
        if args.demo and args.data_root is None:
            args.data_root = str(Path(args.output) / "demo_data")
            if not (Path(args.data_root) / "Training_Data").is_dir():
                log.info("demo: writing synthetic ISIC-format data to %s", args.data_root)
                datasets_skin.make_synthetic_isic(args.data_root, seed=args.seed, **DEMO_DATA)
        try:
            train_set = datasets_skin.SemiSupervisedSkinDataset(
                *datasets_skin.find_split(args.data_root, "Training"), img_size=args.img_size)
            val_set = datasets_skin.ValSkinDataset(
                *datasets_skin.find_split(args.data_root, "Validation"), img_size=args.img_size)
        except datasets_skin.DatasetError as err:
            parser.error(f"--data_root {args.data_root}: {err}")
        val_idx = list(range(len(val_set) if args.val_limit is None else min(args.val_limit, len(val_set))))
        if args.num_workers:
            val_set.preload(val_idx)  # workers then share the decoded images instead of decoding their own
        val_set = Subset(val_set, val_idx)
        val_loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False,
                                num_workers=args.num_workers, collate_fn=datasets_skin.collate_val)

        # ---- model
        checkpoint = None if args.checkpoint.lower() == "none" else args.checkpoint
        from sam2.build_sam import CheckpointError, ConfigNotFoundError

        try:
            model = build_model(args.model_cfg, checkpoint, args.img_size, args.rank, args.num_classes,
                                args.module, device, args.lora_ckpt, args.seed)
        except ConfigNotFoundError as err:
            parser.error(f"--model_cfg {args.model_cfg}: {err}")
        except CheckpointError as err:
            parser.error(f"--checkpoint {checkpoint} does not fit --model_cfg {args.model_cfg}: {err}")
        except ValueError as err:
            if not args.lora_ckpt:
                raise
            parser.error(f"--lora_ckpt {args.lora_ckpt}: {err}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=args.base_lr, weight_decay=0.01)
        scaler = torch.amp.GradScaler("cuda", enabled=utils.amp_dtype(device) == torch.float16)
        multimask = args.num_classes > 1
        prompt_idx = -1 if args.promptmode == "none" else 0

        # ---- run folder (created only now that data and model loaded, so a failed start leaves none)
        run_dir.mkdir(parents=True, exist_ok=True)
        for h in handlers:
            log.removeHandler(h)
        handlers = setup_logging(run_dir / "log.txt")
        csv_path = run_dir / "al_selection.csv"
        start_epoch, best_dice, best_path = 1, -1.0, None
        if state is not None:
            # Frozen weights come from --checkpoint as at the start; the state holds what training changed.
            _, unexpected = model.load_state_dict(state["trainable"], strict=False)
            if unexpected:
                parser.error(f"--resume: {state_path} does not fit this model (unexpected keys {unexpected[:3]})")
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            lost = sorted(set(state["labeled_names"]) - set(train_set.names))
            if lost:
                parser.error(f"--resume: {len(lost)} labeled images of the run are no longer in "
                             f"--data_root {args.data_root} (e.g. {lost[0]})")
            train_set.mark_labeled([train_set.names.index(n) for n in state["labeled_names"]])
            start_epoch, best_dice = state["epoch"] + 1, state["best_dice"]
            best_path = Path(state["best_path"]) if state["best_path"] else None
            truncate_selection_csv(csv_path, state["epoch"])
            for stale in run_dir.glob("best_model_dice*.pth"):
                if best_path is None or stale.name != best_path.name:
                    stale.unlink()  # a best saved by an epoch that did not finish; it is redone
            with open(run_dir / "config.txt", "a") as f:
                f.write(f"# resumed at epoch {start_epoch}: {' '.join(argv)}\n")
            log.info("resuming %s at epoch %d: %d labeled images, best Dice %.4f",
                     run_dir, start_epoch, len(train_set.labeled_indices), best_dice)
        else:
            write_text_atomic(run_dir / "config.txt",
                              "".join(f"{k}: {v}\n" for k, v in sorted(vars(args).items())))
        writer = SummaryWriter(str(run_dir / "log"), purge_step=start_epoch if args.resume else None)

        log.info("command: trainer.py %s", " ".join(argv))
        log.info("device %s | model %s | checkpoint %s | img_size %d | %d training images, %d validation",
                 device, args.model_cfg, checkpoint or "none (random weights)", args.img_size, len(train_set),
                 len(val_set))
        if checkpoint is None:
            log.warning("!" * 78)
            log.warning("!! NO SAM2 CHECKPOINT: the model starts from SEEDED RANDOM WEIGHTS, not SAM2.1.")
            log.warning("!! Scores and Dice show the pipeline works, not what SAM2 achieves; %s.",
                        DOWNLOAD_HINT)
            log.warning("!" * 78)
        if device.type == "cpu" and not args.demo:
            log.warning("training on the CPU: expect this to be very slow at --img_size %d", args.img_size)

        # ---- the active-learning loop
        epoch = start_epoch - 1
        for epoch in range(start_epoch, args.max_epochs + 1):
            utils.seed_everything(epoch_seed(args.seed, epoch), deterministic=args.deterministic)
            unlabeled = train_set.unlabeled_indices
            if not unlabeled:
                log.info("all %d training images are labeled: nothing left to select; stopping before epoch %d",
                         len(train_set), epoch)
                epoch -= 1
                break

            # 1) score a fresh random pool and select the top batch_size
            t0 = time.perf_counter()
            pool = draw_pool(unlabeled, args.pool_size, args.seed, epoch)
            model.eval()
            chosen, scores = strategy.select(model, train_set, pool, args.batch_size, device, args.batch_size,
                                             seed=epoch_seed(args.seed, epoch), num_workers=args.num_workers,
                                             progress=True)
            chosen = [int(i) for i in chosen]
            scores = {int(i): float(s) for i, s in scores.items()}
            t_score = time.perf_counter() - t0

            # 2) "annotate": only now are the selected masks read
            train_set.mark_labeled(chosen)
            rank = ranks_in_pool(scores)
            append_selection_rows(csv_path, [[epoch, train_set.names[i], f"{scores[i]:.6f}", rank[i]]
                                             for i in chosen])
            writer.add_histogram("al/pool_scores", np.array(list(scores.values())), epoch)
            writer.add_scalar("al/labeled", len(train_set.labeled_indices), epoch)
            writer.add_scalar("al/selected_score_mean", float(np.mean([scores[i] for i in chosen])), epoch)
            samples = [train_set[i] for i in chosen]
            writer.add_image("al/selected", make_grid(
                [overlay(s["image"], s["label"], None) for s in samples], nrow=len(samples)), epoch)

            # 3) train on the labeled set. Default (--train_on labeled): every image labeled so far,
            # so earlier annotations keep counting; the reference trained on this epoch's batch only
            # (--train_on selected), i.e. one optimiser step per epoch.
            t0 = time.perf_counter()
            train_idx = train_set.labeled_indices if args.train_on == "labeled" else chosen
            order = torch.Generator().manual_seed(epoch_seed(args.seed, epoch))
            if args.num_workers:
                train_set.preload(train_idx)
            train_loader = DataLoader(Subset(train_set, train_idx), batch_size=args.batch_size, shuffle=True,
                                      generator=order, num_workers=args.num_workers)
            model.train()
            sums: Dict[str, float] = {}
            for batch in tqdm(train_loader, desc=f"epoch {epoch} train", leave=False, dynamic_ncols=True):
                images = batch["image"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
                with utils.autocast(device):
                    outputs = model(images, multimask, args.img_size, prompt_idx, args.promptmode)
                parts = dual_decoder_loss(outputs, labels, args.dice_weight)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(parts["loss"]).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)
                scaler.step(optimizer)
                scaler.update()
                for name, value in parts.items():  # image-weighted epoch means
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) * images.shape[0]
            means = {k: v / len(train_idx) for k, v in sums.items()}
            for name, value in means.items():
                writer.add_scalar(f"train/{name}", value, epoch)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], epoch)
            t_train = time.perf_counter() - t0

            # 4) validate with decoder 1, no prompt (how the model is used after training)
            t0 = time.perf_counter()
            metrics: Dict[str, float] = {}
            if epoch % args.val_every == 0 or epoch == args.max_epochs:
                model.eval()

                @torch.no_grad()
                def predict(images: torch.Tensor) -> torch.Tensor:
                    with utils.autocast(device):
                        feats = model.encode(images.to(device))
                        return model.decode(feats, 1, multimask_output=multimask)["low_res_logits"].float()

                result = val.validate(predict, tqdm(val_loader, desc=f"epoch {epoch} val", leave=False,
                                                    dynamic_ncols=True), args.num_classes, device)
                metrics = {k: float(v) for k, v in result["mean"].items()}
                for name, value in metrics.items():
                    writer.add_scalar(f"val/{name}", value, epoch)
                shown = [val_set[i] for i in range(min(4, len(val_set)))]
                imgs = torch.stack([s["image"] for s in shown])
                pred = F.interpolate(predict(imgs), size=imgs.shape[-2:], mode="bilinear",
                                     align_corners=False).argmax(1).cpu() > 0
                writer.add_image("val/prediction_over_gt", make_grid(
                    [overlay(s["image"], s["label"] > 0, p) for s, p in zip(shown, pred)], nrow=len(shown)), epoch)
            t_val = time.perf_counter() - t0

            # 5) checkpoint: the full LoRA_Sam state_dict when validation Dice improves
            dice = metrics.get("dice", float("nan"))
            old_best = None
            if metrics and epoch >= args.save_from_epoch and dice > best_dice:
                old_best, best_dice = best_path, dice
                best_path = run_dir / f"best_model_dice{dice:.4f}.pth"
                atomic_torch_save(cpu_state_dict(model), best_path)
                log.info("epoch %d: new best Dice %.4f -> %s", epoch, dice, best_path)
            atomic_torch_save(dict(
                epoch=epoch, args={k: getattr(args, k) for k in RESUME_KEYS},
                trainable=trainable_state(model), optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), labeled_names=[train_set.names[i] for i in train_set.labeled_indices],
                best_dice=best_dice, best_path=str(best_path) if best_path else "",
            ), state_path)
            if old_best is not None and old_best != best_path and old_best.exists():
                old_best.unlink()

            for name, value in (("scoring_s", t_score), ("train_s", t_train), ("val_s", t_val)):
                writer.add_scalar(f"time/{name}", value, epoch)
            writer.flush()
            val_text = f"val dice {dice:.4f} hd95 {metrics['hd95']:.2f}" if metrics else "val skipped"
            log.info("epoch %3d/%d | labeled %4d | loss %.4f (dec1 %.4f, dec2 %.4f) | %s"
                     " | time scoring %.1fs train %.1fs val %.1fs",
                     epoch, args.max_epochs, len(train_set.labeled_indices), means["loss"],
                     means["loss_dec1"], means["loss_dec2"], val_text, t_score, t_train, t_val)

        log.info("done: %d epochs, %d labeled images; best Dice %s", epoch, len(train_set.labeled_indices),
                 f"{best_dice:.4f}" if best_path else "n/a (no checkpoint: none saved before --save_from_epoch)")
        log.info("TensorBoard logs: %s   (view: tensorboard --logdir %s)", run_dir / "log", run_dir / "log")
        log.info("selection log:    %s", csv_path)
        if best_path:
            log.info("best checkpoint:  %s", best_path)
        return dict(run_dir=run_dir, best_path=best_path, best_dice=best_dice, epochs=epoch,
                    labeled=[train_set.names[i] for i in train_set.labeled_indices])
    finally:
        if writer is not None:
            writer.close()
        for h in handlers:
            log.removeHandler(h)
            h.close()


if __name__ == "__main__":
    main()
