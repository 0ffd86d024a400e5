"""The steps of one active-learning epoch, each a function of the ``Run`` that trainer.start_run builds:

    select_batch -> (the oracle) -> annotation_costs -> annotate -> train_one_epoch -> validate_epoch
        -> record_epoch (with cumulative_costs) -> save_checkpoints
        ... and at the end finish_run, or hand_over_round to stop for a person's masks

trainer.main's loop calls them in that order. The steps return their numbers; ``record_epoch`` alone writes an
epoch's numbers, each to metrics.csv and TensorBoard under one name. A step that cannot go on raises
``RunStopped`` (the trainer says what to do); nothing here reads command-line flags (``run.args`` are the
prepared, read-only settings).

On several processes (torchrun, ``run.ranks``) every rank runs the steps: scoring, embeddings and validation on its
share of the images, gathered in image order (``distributed``); training on its share of each batch, with the loss
of the whole batch; the selection made once, by rank 0, which alone writes the run folder (``record_epoch``,
``save_checkpoints``, ``finish_run``, ``hand_over_round`` run there only: the trainer calls them so).
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import wraps
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tensorboardX import SummaryWriter
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import datasets_skin
import tb_images
import utils
import val
from active_learning_strategies import (Selection, SelectionContext, SelectionPlan, default_score_batch_size,
                                        draw_pool)
from annotation_cost import COST_COLUMNS, run_totals
from annotation_rounds import RoundItem, accept_round
from oracles import Oracle
from distributed import Ranks
from proposal_costs import CostRow, run_costs
from run_folder import (ResumeState, RunFolder, RunFolderError, best_checkpoint_name, cost_cell, image_record,
                        selection_costs)
from sam2.build_sam import state_mismatch
from safe_io import atomic_torch_save
from settings import CHECKPOINT_HINT, MAY_CHANGE_ON_RESUME, Settings

log = logging.getLogger("trainer")


@dataclass
class Run:
    """Everything one active-learning run works with (built by ``trainer.start_run``)."""

    args: Settings
    folder: RunFolder
    device: torch.device
    plan: SelectionPlan  # which strategy selects in each epoch, from which pool
    train_set: datasets_skin.SemiSupervisedSkinDataset
    val_set: Optional[Dataset]  # None: no Validation split (a person's oracle only)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    oracle: Oracle
    resume_keys: Sequence[str]  # the settings last_state.pth records (a resume must repeat them)
    writer: Optional[SummaryWriter] = None  # log/: our tags, per epoch at the 1-based epoch
    reference_writer: Optional[SummaryWriter] = None  # log/reference/: the reference's tags (REFERENCE_TAGS)
    truths: val.GroundTruthCache = field(default_factory=val.GroundTruthCache)  # full-size masks, once per run
    start_epoch: int = 1
    saved_epoch: int = 0  # the epoch last_state.pth holds (0: none saved)
    best_dice: float = -1.0
    best_path: Optional[Path] = None
    ranks: Ranks = field(default_factory=Ranks)  # this process's place in a run on several (one: Ranks())
    parallel: Optional[torch.nn.Module] = None  # on several processes: the model in DistributedDataParallel

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def labeled_names(self) -> List[str]:
        return [self.train_set.names[i] for i in self.train_set.labeled_indices]

    def autocast(self):
        """Training and validation precision (--precision); scoring keeps its own autocast."""
        return utils.autocast(self.device, enabled=self.args.precision == "mixed")



# ----------------------------------------------------------------------------- starting

# The reference trainer's TensorBoard tags, each logged per batch at the 0-based epoch: tag -> our loss part.
# They go to their own folder (log/reference/), since two of its names are those of our per-epoch means.
REFERENCE_TAGS = {"train/loss_avg": "loss", "train/loss_dec1": "loss_dec1", "train/loss_dec2": "loss_dec2",
                  "train/loss_ce_dec1": "ce_dec1", "train/loss_dice_dec1": "dice_dec1",
                  "train/loss_ce_dec2": "ce_dec2", "train/loss_dice_dec2": "dice_dec2"}


def open_writers(run: Run) -> None:
    """The TensorBoard writers; on --resume they purge what the unfinished epoch logged (its steps)."""
    resume = run.args.resume
    # The pid in the event file's name: a resume within the same second must not overwrite the earlier file.
    suffix = f".{os.getpid()}"
    run.writer = SummaryWriter(str(run.folder.file("log")), purge_step=run.start_epoch if resume else None,
                               filename_suffix=suffix)
    run.reference_writer = SummaryWriter(str(run.folder.file("log") / "reference"), filename_suffix=suffix,
                                         purge_step=run.start_epoch - 1 if resume else None)


def close_writers(run: Run) -> None:
    for writer in (run.writer, run.reference_writer):
        if writer is not None:
            writer.close()


def log_start(run: Run, argv: Sequence[str]) -> None:
    args = run.args
    log.info("command: trainer.py %s", " ".join(argv))
    if run.ranks.active:
        gpu = any(a == "--gpu" or a.startswith("--gpu=") for a in argv)
        log.info("torchrun: %d processes (%s), each on %s%s; this log is rank 0's", run.ranks.size, run.ranks.backend,
                 "the GPU of its LOCAL_RANK" if run.device.type == "cuda" else "the CPU",
                 " (--gpu is ignored)" if gpu else "")
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
        log.warning("!! Scores and Dice show the pipeline works, not what SAM2 achieves; %s.", CHECKPOINT_HINT)
        log.warning("!" * 78)
    if run.device.type == "cpu" and not args.demo:
        log.warning("training on the CPU: expect this to be very slow at --img_size %d", args.img_size)


def images_of(run: Run) -> Dict[str, Dict[str, int]]:
    """The training and validation images the run uses (the whole Validation split), as images.json records them."""
    splits = {"Training": [s.image_path for s in run.train_set.samples]}
    if run.val_set is not None:
        splits["Validation"] = [s.image_path for s in run.val_set.dataset.samples]
    return image_record(splits)


def start_afresh(run: Run) -> None:
    """A new run's records: config.txt (every setting) and images.json (the images it uses)."""
    run.folder.write_config(vars(run.args))
    run.folder.write_images(images_of(run))


def restore(run: Run, state: ResumeState, note: str) -> None:
    """Continue from ``last_state.pth`` (``restore_training``); the folder drops what an unfinished epoch wrote and
    notes the resume (``note``). RunFolderError (nothing written) when the images are not those of the run (new
    training images pass with --accept_new_images) or the state does not fit."""
    images = images_of(run)
    added = run.folder.check_images(images, run.args.accept_new_images)
    restore_training(run, state)
    log_base_lr_change(run, state.settings.get("base_lr"))
    log_changed_settings(run, {**run.folder.read_config(), **state.settings})
    run.folder.reopen(state, note, keep_earlier_bests=run.args.keep_best == "all")
    run.folder.write_images(images)
    if added:
        log.info("--accept_new_images: %d new training images join the unlabeled pool: %s", len(added),
                 ", ".join(added))
    log.info("resuming %s at epoch %d: %d labeled images, best Dice %.4f",
             run.run_dir, run.start_epoch, len(run.labeled_names), run.best_dice)


def restore_training(run: Run, state: ResumeState) -> None:
    """The training state of ``last_state.pth`` (what every rank of a run on several processes takes from rank 0,
    which read it): trained weights, optimiser, labeled set, best so far; RunFolderError when it does not fit."""
    trainable = {name: p.shape for name, p in run.model.named_parameters() if p.requires_grad}
    mismatch = state_mismatch({k: v.shape for k, v in state.trainable.items()}, trainable)
    if mismatch:  # the settings are the run's (checked), so its model config file changed, or the state is another's
        raise RunFolderError(f"{run.folder.file('last_state.pth')} holds the trained weights of another model than "
                             f"the one built from {run.args.model_cfg}: {mismatch}")
    # Frozen weights come from --checkpoint as at the start; the state holds what training changed.
    run.model.load_state_dict(state.trainable, strict=False)
    run.optimizer.load_state_dict(state.optimizer)
    for group in run.optimizer.param_groups:  # differs from the state's only after a divergence (settings_changed)
        group["lr"] = run.args.base_lr
    run.scaler.load_state_dict(state.scaler)
    lost = sorted(set(state.labeled_names) - set(run.train_set.names))
    if lost:
        raise RunFolderError(f"{len(lost)} labeled images of the run are no longer in {run.args.data_root} (e.g. "
                             f"{lost[0]})")
    run.train_set.mark_labeled([run.train_set.names.index(n) for n in state.labeled_names])
    run.start_epoch, run.saved_epoch, run.best_dice = state.epoch + 1, state.epoch, state.best_dice
    run.best_path = state.best_checkpoint(run.run_dir)


def log_changed_settings(run: Run, recorded: Dict[str, object]) -> None:
    """Say which of the settings a resume may change (MAY_CHANGE_ON_RESUME) it changes, from their ``recorded``
    values (the state's, else config.txt's)."""
    for key in MAY_CHANGE_ON_RESUME:
        now = getattr(run.args, key)
        if key in recorded and str(recorded[key]) != str(now):
            log.info("--%s is now %s (it was %s)", key, now, recorded[key])


def log_base_lr_change(run: Run, old_lr: object) -> None:
    if str(old_lr) != str(run.args.base_lr):
        log.info("--base_lr is now %s (it was %s when the run stopped on divergence)", run.args.base_lr, old_lr)


# ----------------------------------------------------------------------------- stopping mid-epoch

class RunStopped(Exception):
    """The run stopped in ``epoch``; nothing of that epoch is saved, the last finished epoch stays as it was.

    reason "diverged": NaN or inf in ``names`` (``where`` says at which step; diverged.json records it, so that
    a resume may lower the learning rate); reason "bad_file": a file whose header is fine but whose data is not
    (found only when it is first decoded, mid-run); ``where`` names it."""

    def __init__(self, epoch: int, reason: str, where: str, names: Sequence[str] = ()) -> None:
        super().__init__(f"epoch {epoch}: {reason} ({where})")
        self.epoch, self.reason, self.where, self.names = epoch, reason, where, list(names)

    def __reduce__(self):  # rebuilt from its fields where it travels to another rank
        return RunStopped, (self.epoch, self.reason, self.where, self.names)


def check_finite(run: Run, epoch: int, what: str, tensors: Dict[str, torch.Tensor]) -> None:
    """Stop the run where NaN or inf first shows in ``tensors`` (``what`` says where): diverged.json records it
    and nothing else is written. Everything saved passes through here first, so no checkpoint holds a
    non-finite tensor."""
    bad = utils.nonfinite_names(tensors)
    if bad:
        if run.ranks.first:
            run.folder.write_diverged(dict(epoch=epoch, where=what, tensors=bad[:20], base_lr=run.args.base_lr))
        raise RunStopped(epoch, "diverged", what, bad)


def stops_on_bad_file(step):
    """Decorates an epoch step ``step(run, epoch, ...)``: a DatasetError (a damaged file, found when first decoded)
    stops the run as RunStopped naming the file."""
    @wraps(step)
    def checked(run: Run, epoch: int, *args, **kwargs):
        try:
            return step(run, epoch, *args, **kwargs)
        except datasets_skin.DatasetError as err:  # from a DataLoader worker its text ends with the original line
            text = str(err).strip().splitlines()[-1].split("DatasetError: ", 1)[-1].rstrip(". ")
            raise RunStopped(epoch, "bad_file", text) from None
    return checked


# ----------------------------------------------------------------------------- the steps

def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch, independent of what ran before it (so --resume repeats it exactly)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def labels_left(run: Run) -> int:
    """How many more images the run may label: the unlabeled ones, fewer under --label_budget; 0 = the run is over."""
    left = len(run.train_set.unlabeled_indices)
    if run.args.label_budget is not None:
        left = min(left, run.args.label_budget - len(run.train_set.labeled_indices))
    return max(left, 0)


def labels_wanted(run: Run) -> int:
    """How many images this epoch selects: --batch_size, fewer to end exactly at --label_budget or when the
    unlabeled images run out."""
    return min(run.args.batch_size, labels_left(run))


def feature_key(args) -> Dict[str, str]:
    """What the pretrained encoder's embedding of an image depends on besides the image: the key of the run
    folder's embedding cache (the model config and module, the checkpoint file -- with its size and modification
    time, so a file replaced in place counts as another -- or, without one, the seed of the random weights, and the
    image size)."""
    key = {name: str(getattr(args, name)) for name in ("model_cfg", "module", "img_size")}
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_file():
        stat = checkpoint.stat()
        key["checkpoint"] = f"{os.path.realpath(checkpoint)} ({stat.st_size} bytes, modified {stat.st_mtime_ns})"
    else:
        key["checkpoint"] = f"{args.checkpoint} (random weights, seed {args.seed})"
    return key


@stops_on_bad_file
def select_batch(run: Run, epoch: int, k: int) -> Selection:
    """The epoch's strategy's choice of k images from a fresh random pool of unlabeled images."""
    args, unlabeled = run.args, run.train_set.unlabeled_indices
    selector = run.plan.for_epoch(epoch)
    context = SelectionContext(
        run.model, run.train_set, draw_pool(unlabeled, selector.pool_size, args.seed, epoch), k, run.device,
        unlabeled=unlabeled, labeled=run.train_set.labeled_indices, seed=epoch_seed(args.seed, epoch),
        batch_size=args.score_batch_size or default_score_batch_size(run.device, args.batch_size),
        num_workers=args.num_workers, run_dir=run.run_dir, progress=run.ranks.first,
        autocast_dtype=utils.scoring_dtype(run.device, args.precision), feature_key=feature_key(args),
        ranks=run.ranks)
    selection = selector.strategy.select(context)
    decided = run.ranks.from_first(replace, selection, figure=None)  # rank 0's choice, for every rank
    selection = selection if run.ranks.first else decided
    check_finite(run, epoch, "scoring the pool",
                 {run.train_set.names[i]: torch.tensor(float(s)) for i, s in selection.scores.items()})
    return selection


def resumed_selection(run: Run, epoch: int) -> Optional[Selection]:
    """The selection of the round whose masks came back while the run was stopped (the oracle accepted it at
    --resume), if any; named by the strategy its marker records (a marker written before that: the plan's)."""
    accepted = run.oracle.resumed_round(epoch)
    if accepted is None:
        return None
    figure = None if accepted.figure is None else tb_images.from_png_array(accepted.figure)
    return Selection(list(accepted.chosen), dict(accepted.scores), figure=figure,
                     strategy=accepted.strategy or run.plan.for_epoch(epoch).name)


@stops_on_bad_file
def annotation_costs(run: Run, epoch: int, chosen: Sequence[int]) -> List[CostRow]:
    """What correcting the proposal of each chosen image costs (--annotation_cost, docs/annotation_cost.md): one
    row per image of ``chosen``, in its order, from the model that chose them (the end of the previous epoch, as
    --resume restores it), against the mask the oracle accepted for the image at the photo's size (the ground truth;
    with a person's oracle the mask they returned: no truth exists before it). On several processes each computes
    its share of ``chosen`` and the rows are gathered in its order, as scoring's scores are."""
    if run.args.annotation_cost == "none":
        return [dict.fromkeys(COST_COLUMNS) for _ in chosen]
    # rank 0 reads the masks at the photo's size: it accepted a person's, from round folders that the other
    # processes may not see (no shared file system is assumed) and their datasets do not point at
    truths = run.ranks.from_first(lambda: [datasets_skin.decode_mask(run.train_set.samples[i].mask_path, None)
                                           for i in chosen])
    share = run.ranks.share(range(len(chosen)))
    return run.ranks.gather(lambda: image_costs(run, [chosen[p] for p in share], [truths[p] for p in share]))


def image_costs(run: Run, indices: Sequence[int], truths: Sequence[np.ndarray]) -> List[CostRow]:
    """``annotation_costs``' rows of the images ``indices`` (this process's share) against their ``truths``: the
    images are encoded once more (the pool's features are not kept); eval mode, training mode restored."""
    if not indices:
        return []
    images = torch.stack([run.train_set[i]["image"] for i in indices])
    was_training = run.model.training
    run.model.eval()
    try:
        return run_costs(run.model, images, truths, run.args)
    finally:
        run.model.train(was_training)


@stops_on_bad_file
def annotate(run: Run, epoch: int, selection: Selection, costs: Sequence[CostRow]) -> Dict[str, float]:
    """Mark the chosen images labeled (training reads their masks from now on), log the selection with what each
    image's annotation cost (``costs``: ``annotation_costs``' rows, in the order of ``selection.chosen``; the
    oracle's lead times); its numbers."""
    train_set, writer, chosen = run.train_set, run.writer, selection.chosen
    train_set.mark_labeled(chosen)
    rank, scores, lead_times = selection.ranks(), selection.scores, run.oracle.lead_times
    if run.ranks.first:  # the run folder's owner
        run.folder.append_selection([[epoch, train_set.names[i], f"{scores[i]:.6f}", rank[i], selection.strategy,
                                      *(cost_cell(cost[c]) for c in COST_COLUMNS),
                                      cost_cell(lead_times.get(train_set.names[i]))]
                                     for i, cost in zip(chosen, costs, strict=True)])
        writer.add_histogram("al/pool_scores", np.array(list(scores.values())), epoch)
        writer.add_image("al/selected", tb_images.selected_grid([train_set[i] for i in chosen]), epoch)
        if selection.figure is not None:  # the strategy's picture of why these images (e.g. the masks compared)
            writer.add_image("al/why_selected", selection.figure, epoch)
    return dict(labeled=len(train_set.labeled_indices),
                selected_score_mean=float(np.mean([scores[i] for i in chosen])))


def cumulative_costs(run: Run, epoch: int) -> Dict[str, Optional[int]]:
    """What the images selected up to ``epoch`` have cost together (``annotation_cost.run_totals``: changed pixels,
    clicks to IoU 0.90, images not reached; None where some image lacks its cost), recomputed from al_selection.csv,
    so that a resumed run counts the epochs before it too."""
    rows = [row for row in run.folder.read_selection() if int(row[0]) <= epoch]
    sizes = {sample.name: sample.orig_size for sample in run.train_set.samples}
    return run_totals([selection_costs(row) for row in rows], [int(np.prod(sizes[row[1]])) for row in rows])


class LossInputs(torch.nn.Module):
    """The training forward as DistributedDataParallel wraps it: the model's forward returning only what the loss
    reads (low_res_logits1/2). DDP, with find_unused_parameters, takes the parameters no output depends on (the
    prompt encoder's point embeddings under --promptmode none) as unused in the step; an output the loss does not
    read (iou_predictions) would make its parameters look used, and DDP would wait for their gradients."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args) -> Dict[str, torch.Tensor]:
        outputs = self.model(*args)
        return {name: outputs[name] for name in ("low_res_logits1", "low_res_logits2")}


def parallel_model(run: Run) -> Optional[torch.nn.Module]:
    """On several processes, the model in DistributedDataParallel for training (None in one process). Parameters
    that take no part in a step's loss (under --promptmode none the point embeddings; the IoU and object-score
    heads always) are found by DDP after each forward (find_unused_parameters: one walk of the autograd graph,
    small beside a SAM2 forward); their gradient stays None on every rank, so AdamW leaves them alone, as in one
    process. The model itself (run.model) stays the one whose state_dict is saved: no ``module.`` prefix."""
    if not run.ranks.active:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(LossInputs(run.model), device_ids=[run.device.index] if run.device.type == "cuda"
                                   else None, find_unused_parameters=True)


def batch_share(run: Run, batch: dict) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """This rank's part of a training batch (every rank loads the whole batch; the whole of it in one process):
    images B x 3 x S x S, labels B x S x S, dataset indices. A rank that holds no image of the batch takes part with
    one image whose every pixel is ignored (label 255): its sums are 0, and so is its part of the gradient."""
    size = batch["image"].shape[0]
    positions = run.ranks.share(range(size))
    if not positions:
        return torch.zeros_like(batch["image"][:1]), torch.full_like(batch["label"][:1], utils.IGNORE_INDEX), [0]
    if len(positions) == size:
        return batch["image"], batch["label"], [int(i) for i in batch["index"]]
    return batch["image"][positions], batch["label"][positions], [int(batch["index"][p]) for p in positions]


def prompt_generators(run: Run, epoch: int, indices: List[int], per_epoch: np.random.Generator):
    """What the images ``indices`` draw their random prompt points from: one generator per image, seeded by (seed,
    epoch, image), so that which rank holds an image changes nothing (--prompt_draw per_image); or the epoch's one
    generator, drawn in batch order (per_epoch: runs made before per_image)."""
    if run.args.prompt_draw == "per_epoch":
        return per_epoch
    return [np.random.default_rng([run.args.seed, epoch, 1, index]) for index in indices]


def train_step(run: Run, epoch: int, batch: dict, per_epoch: np.random.Generator) -> Dict[str, torch.Tensor]:
    """One optimiser step on one mini-batch (this rank's part of it, with the loss of the whole batch); the loss
    parts, detached (the same on every rank)."""
    args, model, optimizer, scaler = run.args, run.model, run.optimizer, run.scaler
    images, labels, indices = batch_share(run, batch)
    images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
    prompt_idx = -1 if args.promptmode == "none" else 0
    prompts = None if args.promptmode == "none" else prompt_generators(run, epoch, indices, per_epoch)
    with run.autocast():
        outputs = (run.parallel or model)(images, args.num_classes > 1, args.img_size, prompt_idx, args.promptmode,
                                          prompts)
    parts = utils.dual_decoder_loss(outputs, labels, args.dice_weight,
                                    run.ranks.sum_with_grad if run.ranks.active else None)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(parts["loss"]).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm=1.0)
    scaler.step(optimizer)
    scaler.update()
    return {name: value.detach() for name, value in parts.items()}


@stops_on_bad_file
def train_one_epoch(run: Run, epoch: int, chosen: List[int]) -> Dict[str, float]:
    """Train on this epoch's selection (--train_on selected: one step when it fits one batch) or the labeled set
    (labeled); image-weighted mean of every loss part (each step's parts also go to the reference's tags) and the
    learning rate. Batch order and prompt points come from generators seeded by (seed, epoch), never from what
    scoring drew, so a restarted process or another strategy trains with the same draws. On several processes
    every rank loads each whole batch (so that a damaged file stops them all alike) and trains on its share."""
    args = run.args
    # by index, then shuffled: what is learned depends on the images, not on the order a strategy ranked them in
    train_idx = run.train_set.labeled_indices if args.train_on == "labeled" else sorted(chosen)
    if args.num_workers:
        run.train_set.preload(train_idx)
    order = torch.Generator().manual_seed(epoch_seed(args.seed, epoch))
    per_epoch = np.random.default_rng([args.seed, epoch, 1])
    loader = DataLoader(Subset(run.train_set, train_idx), batch_size=args.batch_size, shuffle=True,
                        generator=order, num_workers=args.num_workers)
    run.model.train()
    sums: Dict[str, float] = {}
    trainable = {name: p for name, p in run.model.named_parameters() if p.requires_grad}
    steps = tqdm(loader, desc=f"epoch {epoch} train", leave=False, dynamic_ncols=True, disable=not run.ranks.first)
    for step, batch in enumerate(steps, 1):
        parts = train_step(run, epoch, batch, per_epoch)
        # A step skipped by the fp16 gradient scaler (inf gradients) leaves the weights as they were: not divergence.
        check_finite(run, epoch, f"training step {step}", {"loss": parts["loss"], **trainable})
        utils.crash_point("train_batch", epoch)
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + float(value) * batch["image"].shape[0]
        for tag, name in REFERENCE_TAGS.items() if run.ranks.first else ():
            run.reference_writer.add_scalar(tag, float(parts[name]), epoch - 1)
    return {**{k: v / len(train_idx) for k, v in sums.items()}, "lr": run.optimizer.param_groups[0]["lr"]}


SHOWN_VALIDATION_IMAGES = 4  # in TensorBoard's val/prediction_over_gt, with the predictions validation made


@torch.no_grad()
def predict(run: Run, images: torch.Tensor) -> torch.Tensor:
    """How the model is used after training: decoder 1, no prompt, eval mode. B x 3 x S x S -> B x (C+1) x S/4 x S/4."""
    run.model.eval()
    with run.autocast():
        return run.model.predict_logits(images.to(run.device), 1)


@stops_on_bad_file
def validate_epoch(run: Run, epoch: int) -> Dict[str, float]:
    """Mean validation metrics (decoder 1, no prompt; --val_protocol isic: ours at the original resolution,
    reference: the reference's soft Dice at the model's size) and a TensorBoard picture; {} without a Validation
    split. On several processes each rank validates its share of the images, and the means are taken over every
    image's row, gathered in image order (never a mean of the ranks' means)."""
    if run.val_set is None:
        return {}
    shown: List[torch.Tensor] = []  # the picture's logits: the first images, which begin rank 0's share

    def checked_predict(images: torch.Tensor) -> torch.Tensor:
        logits = predict(run, images)
        check_finite(run, epoch, "validation", {"predicted logits": logits})
        if run.ranks.first and len(shown) < SHOWN_VALIDATION_IMAGES:
            shown.extend(logits[:SHOWN_VALIDATION_IMAGES - len(shown)].cpu())
        return logits

    share = Subset(run.val_set, run.ranks.share(range(len(run.val_set))))
    loader = DataLoader(share, batch_size=run.args.batch_size, shuffle=False, num_workers=run.args.num_workers,
                        collate_fn=datasets_skin.collate_val)
    batches = tqdm(loader, desc=f"epoch {epoch} val", leave=False, dynamic_ncols=True, disable=not run.ranks.first)
    if run.args.val_protocol == "reference":
        result = val.validate_reference(checked_predict, batches, run.args.num_classes, run.device,
                                        gather=run.ranks.gather)
    else:
        result = val.validate(checked_predict, batches, run.args.num_classes, run.device, truths=run.truths,
                              gather=run.ranks.gather)
    if run.ranks.first:
        run.writer.add_image("val/prediction_over_gt", tb_images.prediction_grid(
            [run.val_set[i] for i in range(len(shown))], torch.stack(shown)), epoch)
    return {k: float(v) for k, v in result["mean"].items()}


def cpu_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def resume_state(run: Run, epoch: int) -> ResumeState:
    """The state at the end of ``epoch``: what --resume continues from (with where the labeled images' masks were
    accepted, when not in the mask folder)."""
    labeled = run.labeled_names
    return ResumeState(
        epoch, {k: getattr(run.args, k) for k in (*run.resume_keys, *MAY_CHANGE_ON_RESUME)},
        {n: p.detach().cpu().clone() for n, p in run.model.named_parameters() if p.requires_grad},
        run.optimizer.state_dict(), run.scaler.state_dict(), labeled, run.best_dice,
        run.best_path.name if run.best_path else "",
        {name: source for name, source in run.oracle.mask_sources.items() if name in labeled})


def save_state(run: Run, epoch: int) -> None:
    """last_state.pth (the crash point ``checkpoint_write`` lies between writing it and renaming it into place)."""
    state = resume_state(run, epoch)
    optimizer_tensors = {f"optimizer {key} of {i}": value for i, per in state.optimizer["state"].items()
                         for key, value in per.items() if torch.is_tensor(value)}
    check_finite(run, epoch, "saving last_state.pth", {**state.trainable, **optimizer_tensors})
    run.folder.save_state(state, before_rename=lambda: utils.crash_point("checkpoint_write", epoch))
    run.saved_epoch = epoch


def save_checkpoints(run: Run, epoch: int, metrics: Dict[str, float]) -> None:
    """The full state_dict as best_model_dice*.pth when validation Dice improves (from --save_from_epoch on),
    then last_state.pth; the older best is removed only after both are written (kept with --keep_best all)."""
    dice, old_best = metrics.get("dice", float("nan")), None
    if metrics and epoch >= run.args.save_from_epoch and dice > run.best_dice:
        full = cpu_state_dict(run.model)
        check_finite(run, epoch, "saving the best model", full)
        old_best, run.best_dice = run.best_path, dice
        run.best_path = run.run_dir / best_checkpoint_name(dice)
        atomic_torch_save(full, run.best_path)
        log.info("epoch %d: new best Dice %.4f -> %s", epoch, dice, run.best_path)
    save_state(run, epoch)
    run.folder.epoch_saved()
    if run.args.keep_best == "newest" and old_best is not None and old_best != run.best_path and old_best.exists():
        old_best.unlink()


def record_epoch(run: Run, epoch: int, numbers: Dict[str, Dict[str, Optional[float]]]) -> None:
    """Write the epoch's numbers, the one writer of them: ``numbers`` is group -> column -> value (the steps'
    returns: al, train, val, time); each goes to metrics.csv as ``column`` (its row written before the epoch's
    state, so a saved epoch always has its row) and to TensorBoard as ``group/column``, with the peak memory
    (memory/peak_memory_gb, on CUDA) and what the images selected so far cost (cost/..., ``cumulative_costs``). A
    validation skipped this epoch leaves its columns empty. Then the log line."""
    for level, line in run.train_set.mask_notes.news():  # 0/1 masks, other values, empty masks: once each
        log.log(level, line)
    numbers = {**numbers, "cost": cumulative_costs(run, epoch),
               "val": {**dict.fromkeys(val.METRIC_NAMES), **numbers.get("val", {})},
               "memory": {"peak_memory_gb": utils.peak_memory_gb(run.device)}}  # None off CUDA
    run.folder.write_metrics_row({"epoch": epoch, **{k: v for values in numbers.values() for k, v in values.items()}})
    for group, values in numbers.items():
        for column, value in values.items():
            if value is not None:
                run.writer.add_scalar(f"{group}/{column}", value, epoch)
    run.writer.flush()
    log.info(epoch_line(run, epoch, numbers))


def epoch_line(run: Run, epoch: int, numbers: Dict[str, Dict[str, Optional[float]]]) -> str:
    losses, metrics, times = numbers["train"], numbers["val"], numbers["time"]
    peak = numbers["memory"]["peak_memory_gb"]
    val_text = "val skipped" if metrics["dice"] is None else f"val dice {metrics['dice']:.4f} hd95 {metrics['hd95']:.2f}"
    return (f"epoch {epoch:3d}/{run.args.max_epochs} | labeled {numbers['al']['labeled']:4d}"
            f"{cost_text(numbers.get('cost', {}))} | loss {losses['loss']:.4f} (dec1 {losses['loss_dec1']:.4f}, "
            f"dec2 {losses['loss_dec2']:.4f}) | {val_text} | time scoring {times['scoring_s']:.1f}s train "
            f"{times['train_s']:.1f}s val {times['val_s']:.1f}s"
            + ("" if times.get("cost_s") is None else f" cost {times['cost_s']:.1f}s")
            + ("" if peak is None else f" | peak memory {peak:.2f} GiB"))


def cost_text(totals: Dict[str, Optional[int]]) -> str:
    """The cumulative costs known (``cumulative_costs``), for the epoch's line."""
    parts = []
    if totals.get("changed_pixels") is not None:
        parts.append(f"{totals['changed_pixels']:,} pixels changed")
    if totals.get("clicks_90") is not None:
        parts.append(f"{totals['clicks_90']} clicks to IoU 0.90 ({totals['not_reached_90']} images not reached)")
    return f" (so far {', '.join(parts)})" if parts else ""


@contextmanager
def timed(times: Dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    times[name] = time.perf_counter() - start


def stop_reason(run: Run) -> str:
    if run.args.label_budget is not None and len(run.labeled_names) >= run.args.label_budget:
        return f"the label budget of {run.args.label_budget} images is reached"
    return f"all {len(run.train_set)} training images are labeled: nothing left to select"


def result(run: Run, epochs: int, **extra) -> dict:
    return dict(run_dir=run.run_dir, best_path=run.best_path, best_dice=run.best_dice, epochs=epochs,
                labeled=run.labeled_names, **extra)


def finish_run(run: Run, epochs: int) -> dict:
    """Write last_model.pth (the full state_dict at the end of the run) and say where everything is."""
    final = cpu_state_dict(run.model)
    check_finite(run, epochs, "saving last_model.pth", final)
    atomic_torch_save(final, run.folder.file("last_model.pth"))
    no_best = "n/a (no Validation split)" if run.val_set is None else \
        "n/a (no checkpoint: none saved before --save_from_epoch)"
    log.info("done: %d epochs, %d labeled images; best Dice %s", epochs, len(run.labeled_names),
             f"{run.best_dice:.4f}" if run.best_path else no_best)
    log.info("TensorBoard logs: %s   (view: tensorboard --logdir %s)", run.run_dir / "log", run.run_dir / "log")
    log.info("selection log:    %s", run.folder.file("al_selection.csv"))
    log.info("metrics per epoch: %s", run.folder.file("metrics.csv"))
    log.info("final model:      %s", run.folder.file("last_model.pth"))
    if run.best_path:
        log.info("best checkpoint:  %s", run.best_path)
    return result(run, epochs)


def hand_over_round(run: Run, epoch: int, selection: Selection) -> Path:
    """A person's oracle: give them the round of ``epoch`` (the selected images with the model's proposals at
    their original size) and return its folder. last_state.pth holds the model and optimiser that made this
    selection (the end of epoch - 1), so that a resume continues this epoch exactly as an uninterrupted run
    would."""
    samples, ranks, chosen = run.train_set.samples, selection.ranks(), selection.chosen
    if not run.folder.file("last_state.pth").is_file():  # else it holds the end of epoch - 1 already
        save_state(run, epoch - 1)
    logits = predict(run, torch.stack([run.train_set[i]["image"] for i in chosen]))
    items = [RoundItem(samples[i], selection.scores[i], ranks[i], val.logits_to_label_map(one, samples[i].orig_size) > 0)
             for i, one in zip(chosen, logits)]
    figure = None if selection.figure is None else tb_images.to_png_array(selection.figure)
    return run.oracle.hand_over(run.folder, epoch, items, {samples[i].name: s for i, s in selection.scores.items()},
                                figure, selection.strategy)


def wait_for_round(run: Run, epoch: int, round_folder: Path) -> Selection:
    """--wait: the round of ``epoch`` is with a person; wait until it is done (the oracle polls, then pulls its
    masks into the round folder), take it as a resume would (``annotation_rounds.accept_round``, every check of its
    masks; skipped images go back to the unlabeled pool) and return its selection. RoundError when the masks that
    came back fail their checks (the run then stops; --resume continues once they are fixed)."""
    run.oracle.wait(round_folder)
    accepted, notes = accept_round(run.folder, resume_state(run, epoch - 1), run.train_set.samples, True, True)
    for note in notes:
        log.info(note)
    run.oracle.accept(accepted, run.folder, run.train_set)
    return resumed_selection(run, epoch)
