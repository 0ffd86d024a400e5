#!/usr/bin/env python3
"""MD-SAM-AL trainer: cold-start active learning with SAM2 (LoRA image encoder, two mask decoders).

Every epoch:

    unlabeled images --(random pool of --pool_size)--> the strategy selects --batch_size images
        --> the oracle gives their masks (read only now) --> both decoders (+ LoRA, prompt encoder) are
        fine-tuned --> validation (decoder 1, no prompt) --> checkpoints and the resume state

    python trainer.py --data_root /data/ISIC2017 --output ./output --gpu 0
    python trainer.py --demo        # synthetic data, sam2.1_hiera_t, CPU, no download
    torchrun --standalone --nproc_per_node 4 trainer.py <the same flags>   # one run on 4 GPUs (docs/several_gpus.md)

This file holds the set-up and the loop. The flags and their checks are settings.py, the steps of an epoch
epoch_steps.py, the run folder's files and rules run_folder.py, the oracles oracles.py, the strategies
active_learning_strategies.py. Nothing below this file reads command-line flags; every error of the command line
or its inputs ends as one line naming the flag or file, exit code 2 (UsageError -> Ranks.exit in main). Under torchrun
every process runs this file (``distributed.Ranks``); rank 0 owns the run folder, and prints any rank's error.
"""
from __future__ import annotations

import logging
import shlex
import sys
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

import annotation_rounds
import datasets_skin
import label_studio
import label_studio_api
import oracles
import utils
from active_learning_strategies import Selection, SelectionPlan
from distributed import Ranks, restart_count
from epoch_steps import (Run, RunStopped, annotate, annotation_costs, close_writers, epoch_seed, finish_run,
                         hand_over_round, labels_left, labels_wanted, log_base_lr_change, log_start, open_writers,
                         parallel_model, record_epoch, restore, restore_training, result, resumed_selection,
                         save_checkpoints, select_batch, start_afresh, stop_reason, timed, train_one_epoch,
                         validate_epoch, wait_for_round)
from run_folder import (DeadRunUnchecked, FolderInUse, FolderLocked, LostState, ResumeState, RunFolder, RunFolderError,
                        SettingsDiffer, run_dir_of)
from safe_io import WriteError, first_names
from sam_lora_image_encoder_prompt import ModelInputError, build_model_from_settings
from settings import (DEMO_DATA, LEGACY, REPO, Settings, UsageError, build_parser, check_processes, demo_data_root,
                      prepare_args, resume_keys)
from synthetic_isic import ensure_synthetic_isic

log = logging.getLogger("trainer")


# ----------------------------------------------------------------------------- set-up

def open_run_folder(args: Settings, folder: RunFolder, keys: Sequence[str],
                    create: bool = False) -> Optional[Tuple[bool, Optional[ResumeState]]]:
    """Own the folder: (whether it holds a dead run to start afresh, the state to continue with --resume; ``keys``:
    the settings a resume must repeat), or with ``create`` make it (still new, if new when checked); every problem
    as one line naming the flag (nothing written)."""
    try:
        if create:
            return folder.own(create=True)
        return folder.open_for_run(vars(args), keys, LEGACY, args.resume)
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
    except LostState as err:
        raise UsageError(f"--output {args.output}: {err}; restore last_state.pth to continue it with --resume, or "
                         "choose another --output (or move the folder aside)") from None
    except DeadRunUnchecked as err:
        raise UsageError(f"--output {args.output}: {err}; restore those lines (the run then starts afresh), or "
                         "remove the folder, or choose another --output") from None
    except RunFolderError as err:
        raise UsageError(f"--resume: {err}") from None


def pick_device(args: Settings, ranks: Ranks) -> torch.device:
    """--gpu; under torchrun the GPU of the process's LOCAL_RANK (or the CPU without CUDA), --gpu ignored."""
    if ranks.active:
        return ranks.device()
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


def write_demo_data(args: Settings) -> None:
    """With --demo, its synthetic data set, written once (by rank 0 under torchrun)."""
    root = demo_data_root(args)
    try:
        if root is not None and ensure_synthetic_isic(root, seed=args.seed, **DEMO_DATA):
            log.info("demo: wrote synthetic ISIC-format data to %s", root)
    except OSError as err:
        raise UsageError(f"--output: cannot write the demo data {root} ({err.strerror or err}); remove {root} "
                         "or choose another --output") from None


def load_data(args: Settings) -> Tuple[datasets_skin.SemiSupervisedSkinDataset, Optional[torch.utils.data.Dataset]]:
    """The training set and the validation subset (None: no Validation split, --oracle folder only)."""
    try:
        return datasets_skin.training_and_validation(args.data_root, args.img_size, args.oracle != "ground_truth",
                                                     args.val_limit, args.num_workers > 0, args.decode == "draft",
                                                     args.max_image_pixels)
    except datasets_skin.ImageTooLargeError as err:
        raise UsageError(f"--data_root {args.data_root}: {err.describe('pass a larger --max_image_pixels')}") from None
    except datasets_skin.DatasetError as err:
        raise UsageError(f"--data_root {args.data_root}: {err}") from None


def round_error(err: annotation_rounds.RoundError, oracle: str) -> UsageError:
    """A round that cannot go on, as the one message naming what to do."""
    if err.reason == "needs_person_oracle":
        return UsageError(f"--resume: {err}; continue it with --oracle folder or --oracle label_studio; nothing was "
                          "changed")
    if err.reason == "oracle_switch":
        return UsageError(f"--oracle {oracle}: {err}; resume it with the oracle it was made with; nothing was changed")
    if err.reason == "nothing_to_select":
        return UsageError(f"--oracle {oracle}: {err}; train on them with --oracle ground_truth, or add images "
                          "without masks")
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
                train_set: datasets_skin.SemiSupervisedSkinDataset) -> oracles.Oracle:
    """The oracle of --oracle, after every check of its masks (nothing is written before, but a waiting round's
    masks pulled from Label Studio into its round folder)."""
    try:
        client = label_studio_client(args) if args.oracle == oracles.LabelStudioOracle.name else None
        return oracles.make_oracle(args.oracle, folder, state, train_set, args.accept_partial, Path(args.output),
                                   client, args.label_studio_backend, args.wait)
    except annotation_rounds.RoundError as err:
        raise round_error(err, args.oracle) from None
    except RunFolderError as err:
        raise UsageError(f"--resume: {err}") from None
    except (label_studio.LabelStudioError, label_studio_api.ApiError) as err:
        raise label_studio_error(args, err) from None


def label_studio_client(args: Settings) -> label_studio_api.Client:
    """--oracle label_studio: the server of --label_studio_url with the token of --label_studio_token_file (or
    $LABEL_STUDIO_API_KEY), checked now; Label Studio's SDK is needed (it encodes and decodes the masks)."""
    label_studio.brush_module()
    return label_studio_api.connect(args.label_studio_url, label_studio_api.read_token(args.label_studio_token_file))


def label_studio_error(args: Settings, err: Exception) -> UsageError:
    """An error of Label Studio or of a round through it, as one line naming the flag (or variable) it is about.
    Nothing is half-written: a round is pushed before the run says it waits, and pulled before it is checked."""
    flag = label_studio.error_flag(err, args, "--output") or ("--resume" if args.resume else "--oracle label_studio")
    if isinstance(err, label_studio.SdkMissingError):
        flag = "--oracle label_studio"
    return UsageError(f"{flag}: {err}")


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


def start_run(args: Settings, argv: Sequence[str], ranks: Ranks) -> Run:
    """Own and check the run folder, load data and model, then create (or reopen, with --resume) the run folder.
    Everything that can fail on bad input fails before the folder is created; rank 0 alone owns it (torchrun)."""
    folder, plan = RunFolder(run_dir_of(args.output, args.img_size)), SelectionPlan.from_settings(vars(args))
    keys = resume_keys(*(selector.name for selector in plan.selectors), prompted=args.promptmode != "none")
    dead, state = ranks.from_first(open_run_folder, args, folder, keys)
    device = pick_device(args, ranks)
    utils.seed_everything(args.seed, deterministic=args.deterministic)
    ranks.from_first(write_demo_data, args)  # the demo's data: written by rank 0, read by every rank (one machine)
    with warnings.catch_warnings(record=True) as data_warnings:  # e.g. images left out for lack of a mask
        warnings.simplefilter("always")
        train_set, val_set = ranks.together(load_data, args)
    oracle = oracles.shared(lambda: make_oracle(args, folder, state, train_set), train_set, ranks)
    model = ranks.together(make_model, args, device)
    model.set_grad_checkpointing(args.grad_ckpt)
    if args.compile:
        model.compile_image_encoder()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.base_lr,
                                  weight_decay=0.01)
    fp16 = args.precision == "mixed" and utils.amp_dtype(device) == torch.float16
    run = Run(args, folder, device, plan, train_set, val_set, model, optimizer,
              torch.amp.GradScaler("cuda", enabled=fp16), oracle, keys, ranks=ranks)
    ranks.together(take_over_folder, run, dead, state, argv, data_warnings)
    run.parallel = parallel_model(run)
    return run


def take_over_folder(run: Run, dead: bool, state: Optional[ResumeState], argv: Sequence[str],
                     data_warnings: Sequence[warnings.WarningMessage]) -> None:
    """Rank 0 (or the one process): create or reopen the run folder, its log (with the data's warnings) and writers,
    and continue from ``state`` (--resume) or start afresh. The other ranks take the state's training part."""
    args, folder = run.args, run.folder
    if not run.ranks.first:
        try:
            return restore_training(run, state) if state is not None else None
        except RunFolderError as err:
            raise UsageError(f"--resume: {err}") from None
    open_run_folder(args, folder, run.resume_keys, create=True)
    add_log_handler(logging.FileHandler(folder.file("log.txt"), mode="a"))
    for caught in data_warnings:  # said now, so that log.txt has them too
        log.warning("warning: %s", caught.message)
    if args.resume and "--resume" not in argv:
        log.info("torchrun restarted the run's processes (restart %d): continuing as with --resume", restart_count())
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
        lr = args.base_lr
        return DivergenceError(f"training diverged in epoch {err.epoch} ({err.where}): NaN or inf in "
                               f"{first_names(err.names)}, at "
                               f"--base_lr {lr:g}; " + how_to_go_on(err.epoch, f"choose a lower --base_lr (e.g. "
                                                                               f"{lr / 10:g})"))
    return UsageError(f"--data_root {args.data_root}: {err.where} (found in epoch {err.epoch}); "
                      + how_to_go_on(err.epoch, "replace or remove that file"))


def interrupted(run: Optional[Run]) -> str:
    """What a run interrupted by the user keeps, and how to go on."""
    if run is None or run.saved_epoch == 0:
        return "no epoch was finished, so nothing is kept to continue: run the same command again (it starts afresh)"
    return (f"last_state.pth and the best checkpoint are those of epoch {run.saved_epoch}, untouched: run the same "
            "command with --resume to continue from there")


def stop_for_annotation(run: Run, epoch: int, folder: Path, selection: Selection, argv: Sequence[str]) -> dict:
    """The round handed to a person: say where each mask goes and the one command that continues; stop."""
    for line in run.oracle.instructions(folder, epoch):
        log.info(line)
    script = "trainer.py" if Path.cwd().resolve() == REPO else str(REPO / "trainer.py")
    kept = [a for a in argv if a not in ("--accept_partial", "--accept_new_images")]  # answers to this round only
    again = shlex.join(["python3", script, *kept, *([] if "--resume" in kept else ["--resume"])])
    log.info("then continue with:\n  %s", again)
    return result(run, epoch - 1, round_dir=folder, requested=[run.train_set.names[i] for i in selection.chosen])


def as_restarted(args: Settings, ranks: Ranks) -> Settings:
    """torchrun --max-restarts runs the same command again after a process failed: a restart continues the run its
    folder holds, as --resume does (a folder still without a run starts it; other settings are refused)."""
    if restart_count() == 0 or args.resume:
        return args
    status = ranks.from_first(lambda: RunFolder(run_dir_of(args.output, args.img_size)).status())
    return args if status == "new" else Settings(**{**vars(args), "resume": True})


# ----------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ranks = Ranks.from_environment()  # torchrun's processes, or this one alone
    parser = build_parser()
    if not ranks.first:  # the same checks; their messages (help, errors) are rank 0's to print
        parser._print_message = lambda message, file=None: None
    add_log_handler(logging.StreamHandler(sys.stdout) if ranks.first else logging.NullHandler())
    run = None
    try:
        args = prepare_args(parser, parser.parse_args(argv), argv, writes_output=ranks.first)
        check_processes(args, ranks.size)
        args = as_restarted(args, ranks)
        run = start_run(args, argv, ranks)  # ranks.together / from_first below: an error of any rank stops them all

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
                selection = resumed_selection(run, epoch) or ranks.together(select_batch, run, epoch, wanted)

            # 2) the oracle: ground_truth has the masks; a person's oracle hands the round over and the run stops
            #    (with --wait, the run waits until the person's masks are back, then goes on with them)
            if not run.oracle.has_masks(epoch):
                round_folder = ranks.from_first(hand_over_round, run, epoch, selection)  # --wait: one process
                if not args.wait:
                    return ranks.from_first(stop_for_annotation, run, epoch, round_folder, selection, argv)
                selection = wait_for_round(run, epoch, round_folder)
            with timed(times, "cost_s"):  # what correcting each proposal costs (only now are the masks read)
                costs = ranks.together(annotation_costs, run, epoch, selection.chosen)
            labeled = ranks.together(annotate, run, epoch, selection, costs)
            utils.crash_point("selected", epoch)

            # 3) fine-tune both decoders (+ LoRA, prompt encoder) on the labeled set or this epoch's selection
            with timed(times, "train_s"):
                losses = ranks.together(train_one_epoch, run, epoch, selection.chosen)

            # 4) validate with decoder 1, no prompt (how the model is used); always after the last selection
            last = epoch == args.max_epochs or labels_left(run) == 0
            with timed(times, "val_s"):
                metrics = ranks.together(validate_epoch, run, epoch) if epoch % args.val_every == 0 or last else {}

            # 5) record the epoch's numbers, then checkpoint: the best full state_dict, the resume state (rank 0)
            ranks.from_first(record_epoch, run, epoch, dict(al=labeled, train=losses, val=metrics, time=times))
            ranks.from_first(save_checkpoints, run, epoch, metrics)
            utils.crash_point("epoch_end", epoch)

        return ranks.from_first(finish_run, run, epoch)
    except RunStopped as err:
        ranks.exit(f"{parser.prog}: error: {stopped(args, err)}")
    except (UsageError, WriteError) as err:  # one line: the message names the flag or file
        ranks.exit(f"{parser.prog}: error: {err}{AFTER_WRITE_ERROR if isinstance(err, WriteError) else ''}")
    except annotation_rounds.RoundError as err:  # the masks of a round waited for (--wait)
        ranks.exit(f"{parser.prog}: error: {round_error(err, args.oracle)}")
    except (label_studio.LabelStudioError, label_studio_api.ApiError) as err:
        ranks.exit(f"{parser.prog}: error: {label_studio_error(args, err)}")
    except KeyboardInterrupt:  # under torchrun the signal reaches torchrun and every process
        ranks.exit(f"{parser.prog}: interrupted (Ctrl-C); {interrupted(run)}", code=130)
    finally:
        if run is not None:
            close_writers(run)
        for handler in list(log.handlers):  # the console and log.txt
            log.removeHandler(handler)
            handler.close()
        ranks.close()


if __name__ == "__main__":
    main()
