#!/usr/bin/env python3
"""Compare active-learning strategies: arms x seeds through trainer.py, learning curves, a Test table.

    python compare_strategies.py --data_root D --output runs/cmp \
        --strategies mask_difference entropy typiclust@all typiclust@all+mask_difference random --seeds 1 2 3 \
        [any trainer.py flag]
    python compare_strategies.py --demo          # synthetic data, 4 arms x 2 seeds, CPU

An arm (``Arm``) is a strategy with its own pool size and first round: ``[FIRST[@POOL]+]STRATEGY[@POOL]``, e.g.
``typiclust@all`` (TypiClust over every unlabeled image each epoch) or ``typiclust@all+mask_difference@10`` (epoch 1
by TypiClust over every unlabeled image, then mask difference on pools of 10); a part without @POOL uses --pool_size.
OUTPUT/<arm>/seed<k>/Skin_<img_size>/ is one trainer.py run (the same flags for all; only the arm's --strategy,
--pool_size and --first_round, and --seed differ), plus test_metrics.csv (its best checkpoint, else last_model.pth, on the Test split at original
resolution) and run.log (what the processes printed). OUTPUT/zero_shot/ holds the untrained model's validation
and Test metrics (the cold-start floor) and its annotation cost per validation image. Every run records what each
selected image cost to annotate (trainer.py --annotation_cost clicks, unless the flag is given otherwise). The
report: OUTPUT/curves.csv, OUTPUT/learning_curves.png, OUTPUT/summary.md (against labeled images and against
clicks); `tensorboard --logdir OUTPUT` shows every run's log side by side.

Runs execute as subprocesses, --jobs at once, each pinned to one device of --gpus (CUDA_VISIBLE_DEVICES), or with
--nproc_per_run N to N of them, the run under torchrun (one process per device; docs/several_gpus.md);
--print_commands prints the command lines of the missing runs for another scheduler; --collect only writes
the report. A rerun skips finished runs and resumes interrupted ones; runs made with other settings are an
error, never reused or overwritten. A run folder another process owns (folder_lock: another invocation's trainer
or scoring) is skipped and named, and the command exits 1. The report's tables, curves and statistics are
comparison_report.py's.
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from comparison_report import (TEST_CSV, VAL_COSTS_CSV, ZERO_SHOT, CompareError, Job, Plan, default_budgets,
                               run_state, write_report)
from folder_lock import FolderLocked

REPO = Path(__file__).resolve().parent
TRAINER = REPO / "trainer.py"
DEFAULT_STRATEGIES = ("mask_difference", "entropy", "random")
# --demo's arms (all: docs/comparing.md's command); fewer epochs than the trainer's demo, so that it stays under
# 5 minutes
DEMO_STRATEGIES = ("mask_difference", "mask_difference_diverse", "typiclust@all", "random")
DEMO_EPOCHS = 6
DEMO_OUTPUT = "./output_compare_demo"
DEMO_SEEDS = (1, 2)
DEMO_TEST_IMAGES = 8
DEMO_CPU_JOBS = 2
# The trainer's demo defaults, and every labeled image trained on each epoch (not the reference's one step on the
# epoch's selection), so that each curve shows all the labels its strategy chose; flags given explicitly win.
DEMO_TRAINER_FLAGS = ("--demo", "--train_on", "labeled")
# Every run records the clicks each selected image costs (the click axis of the report); flags given explicitly win.
COMPARISON_TRAINER_FLAGS = ("--annotation_cost", "clicks")
# Trainer settings that may differ between a finished run and the request (they do not change its results).
IGNORED_SETTINGS = {"gpu", "output", "resume", "num_workers", "max_image_pixels", "accept_new_images",
                    "label_studio_url", "label_studio_token_file", "wait", "label_studio_backend"}
PATH_SETTINGS = {"data_root", "checkpoint", "model_cfg", "lora_ckpt"}
OWNED_TRAINER_FLAGS = {"--strategy": "--strategies", "--seed": "--seeds", "--gpu": "--gpus",
                       "--first_round": "an arm FIRST+STRATEGY in --strategies (e.g. typiclust@all+mask_difference)",
                       "--resume": "nothing (a rerun resumes interrupted runs by itself)"}
ARM_SETTINGS = {"strategy", "pool_size", "first_round"}  # what an arm sets; the runs share every other setting

# ----------------------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare_strategies.py", allow_abbrev=False,  # --seed must reach the error, not become --seeds
        description="Run active-learning strategies x seeds through trainer.py and compare them: learning "
                    "curves, label-budget table, Test-split table. Every other flag is passed to trainer.py.")
    p.add_argument("--data_root", default=None, help="dataset root with Training, Validation and Test splits")
    p.add_argument("--output", default=None, help=f"comparison folder (default with --demo: {DEMO_OUTPUT})")
    from active_learning_strategies import ActiveLearningStrategyFactory

    names = ActiveLearningStrategyFactory.available_strategies()
    p.add_argument("--strategies", nargs="+", default=None, metavar="ARM",
                   help=f"arms to compare: [FIRST[@POOL]+]STRATEGY[@POOL], strategies {', '.join(names)}; POOL a number "
                        f"of images or all (default: --pool_size), FIRST the strategy of epoch 1, e.g. typiclust@all "
                        f"or typiclust@all+mask_difference (default: {' '.join(DEFAULT_STRATEGIES)}; --demo: "
                        f"{' '.join(DEMO_STRATEGIES)})")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="one run per strategy per seed (default 1 2 3; --demo: 1 2)")
    p.add_argument("--budgets", nargs="+", type=int, default=None,
                   help="label budgets of the summary table (default: 25/50/100%% of the final labeled count)")
    p.add_argument("--click_budgets", nargs="+", type=int, default=None,
                   help="click budgets of the summary's click table (default: 25/50/100%% of the range every arm "
                        "reaches: the smallest final cumulative clicks of the runs)")
    p.add_argument("--gpus", default=None, help="comma-separated CUDA devices, e.g. 0,1 (default: 0 when CUDA "
                   "is present, else the CPU)")
    p.add_argument("--jobs", type=int, default=None,
                   help=f"runs at once (default: one per --gpus device; CPU: 1, --demo: {DEMO_CPU_JOBS})")
    p.add_argument("--nproc_per_run", type=int, default=1, metavar="N",
                   help="processes per run: each run under torchrun on N devices of --gpus (one process each; on the "
                        "CPU, N processes sharing the cores); default 1: python3 trainer.py on one device")
    p.add_argument("--print_commands", action="store_true",
                   help="print one command line per missing run (for SLURM arrays etc.) and exit")
    p.add_argument("--collect", action="store_true", help="only write the report, from the finished runs")
    p.add_argument("--demo", action="store_true",
                   help="synthetic data with a Test split (written once, shared), trainer --demo sizes")
    worker = p.add_argument_group("what one job runs (printed by --print_commands)")
    worker.add_argument("--score_run", metavar="RUN_DIR", default=None,
                        help="score a finished trainer run on the Test split -> RUN_DIR/test_metrics.csv")
    worker.add_argument("--set_aside", metavar="RUN_DIR", default=None,
                        help="move a run that stopped in its first epoch to RUN_DIR.aborted<k> (owning it meanwhile)")
    worker.add_argument("--zero_shot", metavar="DIR", default=None,
                        help="validate the untrained model (trainer flags after --) -> DIR/val_metrics.csv, "
                             "DIR/test_metrics.csv")
    return p


def check_request(args: argparse.Namespace, trainer_flags: List[str]) -> None:
    """The comparison's own flags (before any trainer setting is looked at)."""
    if args.demo:
        args.output = args.output or DEMO_OUTPUT
        args.seeds = args.seeds or list(DEMO_SEEDS)
    args.seeds = args.seeds or [1, 2, 3]
    args.strategies = args.strategies or list(DEMO_STRATEGIES if args.demo else DEFAULT_STRATEGIES)
    args.arms = [Arm.parse(text) for text in args.strategies]
    if args.output is None:
        raise CompareError("--output is required (the folder for the runs and the report)")
    if args.data_root is None and not args.demo:
        raise CompareError("--data_root is required (a dataset with Training, Validation and Test splits); "
                           "or try --demo")
    for flag, values in (("--seeds", args.seeds), ("--strategies", args.strategies)):
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            raise CompareError(f"{flag} lists {', '.join(map(str, repeated))} more than once")
    for flag in trainer_flags:
        name = flag.split("=")[0]
        owned = next((f for f in OWNED_TRAINER_FLAGS if f == name or (len(name) > 3 and f.startswith(name))), None)
        if owned:  # an abbreviation too: the trainer's parser refuses it, but it reads as that flag to a person
            shown = name if name == owned else f"{name} ({owned} abbreviated)"
            raise CompareError(f"{shown} is set per run by compare_strategies.py; use {OWNED_TRAINER_FLAGS[owned]}")
    for flag, budgets in (("--budgets", args.budgets), ("--click_budgets", args.click_budgets)):
        if budgets is not None and min(budgets) < 1:
            raise CompareError(f"{flag} must be >= 1 (got {min(budgets)})")
    if args.jobs is not None and args.jobs < 1:
        raise CompareError(f"--jobs must be >= 1 (got {args.jobs})")
    if args.nproc_per_run < 1:
        raise CompareError(f"--nproc_per_run must be >= 1 (got {args.nproc_per_run})")
    if args.print_commands and args.collect:
        raise CompareError("--print_commands and --collect exclude each other")


def job_devices(gpus: Optional[str], jobs: Optional[int], cpu_jobs: int = 1, per_job: int = 1
                ) -> List[Optional[str]]:
    """The CUDA devices of each job slot, ``per_job`` of them ("0" or "0,1"; None = CPU; ``cpu_jobs`` slots unless
    --jobs); --gpus naming a missing device, or a number of devices that does not split into jobs of ``per_job``,
    is an error."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus is None:
        devices: List[Optional[str]] = [str(i) for i in range(min(per_job, count))] if count else [None]
    else:
        devices = [d.strip() for d in gpus.split(",")]
        if not all(d.isdigit() for d in devices) or len(set(devices)) != len(devices):
            raise CompareError(f"--gpus {gpus}: expected distinct CUDA device numbers such as 0,1")
        missing = [d for d in devices if int(d) >= count]
        if missing:
            present = ", ".join(map(str, range(count))) or "none (no CUDA on this machine)"
            raise CompareError(f"--gpus {gpus}: no device {', '.join(missing)}; devices present: {present}")
    if devices != [None]:
        if len(devices) % per_job:
            raise CompareError(f"--gpus {gpus or ','.join(devices)}: {len(devices)} device(s) do not make runs of "
                               f"--nproc_per_run {per_job} devices each; name a multiple of {per_job}")
        devices = [",".join(devices[i:i + per_job]) for i in range(0, len(devices), per_job)]
    jobs = jobs or (cpu_jobs if devices == [None] else len(devices))
    return [devices[i % len(devices)] for i in range(jobs)]


# ----------------------------------------------------------------------------- trainer settings

def resolve_trainer_args(argv: Sequence[str]) -> argparse.Namespace:
    """trainer.py's own parsing and checks of ``argv`` (a bad flag exits 2 with trainer.py's message)."""
    import settings

    parser = settings.build_parser()
    try:
        return settings.prepare_args(parser, parser.parse_args(argv), argv)
    except settings.UsageError as err:
        parser.error(str(err))


def normalized(key: str, value: str) -> str:
    if key in PATH_SETTINGS and value not in ("None", "none") and os.path.exists(value):
        return os.path.realpath(value)
    return value


def settings_of(args: argparse.Namespace) -> Dict[str, str]:
    """What trainer.py writes to config.txt, as ``key -> value`` text."""
    return {k: normalized(k, str(v)) for k, v in vars(args).items()}


def read_config(run_dir: Path) -> Dict[str, str]:
    """A run's config.txt, its paths normalised as in ``settings_of``; a setting an older trainer did not record
    reads as the value that reproduces how that run was made (settings.LEGACY)."""
    from run_folder import RunFolder
    from settings import LEGACY

    recorded = RunFolder(run_dir).read_config()
    return {key: normalized(key, str(value)) for key, value in {**LEGACY, **recorded}.items()}


def unused_settings(settings: Dict[str, str]) -> set:
    """Settings that change nothing in a run made with ``settings``: how prompt points are drawn, without prompts."""
    return {"prompt_draw"} if settings.get("promptmode") in ("none", None) else set()


def differences(want: Dict[str, str], have: Dict[str, str], ignore: set) -> List[str]:
    ignore = ignore | (unused_settings(want) & unused_settings(have))
    keys = sorted((set(want) | set(have)) - IGNORED_SETTINGS - ignore)
    return [f"{k} was {have.get(k, '(unset)')}, now {want.get(k, '(unset)')}"
            for k in keys if want.get(k) != have.get(k)]


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Arm:
    """One arm of the comparison, written ``[FIRST[@POOL]+]STRATEGY[@POOL]``: ``strategy`` selects every epoch (from
    pools of its POOL images, or every unlabeled image for "all"; without @POOL, --pool_size), after ``first``
    (when given) selected epoch 1 (trainer.py --first_round). ``text`` names its folder and its curves."""

    text: str
    strategy: object  # active_learning_strategies.StrategyChoice
    first: Optional[object] = None

    @classmethod
    def parse(cls, text: str) -> "Arm":
        from active_learning_strategies import StrategyChoice, StrategySettingError

        parts = text.split("+")
        try:
            if len(parts) > 2:
                raise StrategySettingError("at most one first round (FIRST+STRATEGY)")
            choices = [StrategyChoice.parse(part) for part in parts]
        except StrategySettingError as err:
            raise CompareError(f"--strategies {text}: {err}; an arm is [FIRST[@POOL]+]STRATEGY[@POOL], e.g. "
                               "typiclust@all+mask_difference") from None
        return cls(text, choices[-1], choices[0] if len(choices) == 2 else None)

    def trainer_flags(self) -> List[str]:
        pool = [] if self.strategy.pool_size is None else ["--pool_size", str(self.strategy.pool_size)]
        first = [] if self.first is None else ["--first_round", str(self.first)]
        return ["--strategy", self.strategy.name] + pool + first


def demo_data(output: Path) -> Path:
    """The demo's synthetic data set (with a Test split), written once into OUTPUT/demo_data (atomically)."""
    from settings import DEMO_DATA
    from synthetic_isic import ensure_synthetic_isic

    ensure_synthetic_isic(output / "demo_data", **dict(DEMO_DATA, n_test=DEMO_TEST_IMAGES))
    return output / "demo_data"


def count_split(data_root: str, split: str) -> int:
    from datasets_skin import DatasetError, discover_samples, find_split

    try:
        return len(discover_samples(*find_split(data_root, split), check_files=False))
    except DatasetError as err:
        raise CompareError(f"--data_root {data_root}: {err}") from None


def make_runs(args: argparse.Namespace, trainer_flags: List[str], output: Path, data_root: str
              ) -> Tuple[List[Job], Job]:
    base = list(COMPARISON_TRAINER_FLAGS) + list(DEMO_TRAINER_FLAGS if args.demo else ()) + list(trainer_flags) \
        + ["--data_root", data_root]
    runs = []
    if args.demo and not any(flag.split("=")[0] == "--max_epochs" for flag in trainer_flags):
        base += ["--max_epochs", str(DEMO_EPOCHS)]
    for seed in args.seeds:
        for arm in args.arms:
            folder = output / arm.text / f"seed{seed}"
            argv = base + arm.trainer_flags() + ["--seed", str(seed), "--output", str(folder)]
            targs = resolve_trainer_args(argv)
            runs.append(Job(arm.text, seed, folder / f"Skin_{targs.img_size}", argv, targs))
    first = runs[0]
    zero_argv = first.argv[:-1] + [str(output / ZERO_SHOT)]
    return runs, Job(ZERO_SHOT, first.seed, output / ZERO_SHOT, zero_argv, first.args)


def label_budgets(args: argparse.Namespace, targs: argparse.Namespace, n_train: int) -> Tuple[List[int], int]:
    """(--budgets or the default 25/50/100 % of the final labeled count, that final count)."""
    if targs.label_budget is not None and targs.label_budget > n_train:
        raise CompareError(f"--label_budget {targs.label_budget} is larger than the training set "
                           f"({n_train} images in --data_root {targs.data_root})")
    final = min(n_train, targs.max_epochs * targs.batch_size, targs.label_budget or n_train)
    if args.budgets is None:
        return default_budgets(final), final
    too_big = [b for b in args.budgets if b > final]
    if too_big:
        where = (f"larger than the training set ({n_train} images)" if max(too_big) > n_train else
                 f"more than the runs will label ({final} = min(training images {n_train}, --max_epochs "
                 f"{targs.max_epochs} x --batch_size {targs.batch_size}, --label_budget {targs.label_budget}))")
        raise CompareError(f"--budgets {' '.join(map(str, too_big))}: {where}")
    return sorted(set(args.budgets)), final


def make_plan(args: argparse.Namespace, trainer_flags: List[str]) -> Plan:
    """Every check, in order, before anything runs; the only thing written is the --demo data set."""
    check_request(args, trainer_flags)
    # the demo on a CPU: one single-threaded run per core (faster than one run using every core)
    devices = job_devices(args.gpus, args.jobs, min(DEMO_CPU_JOBS, os.cpu_count() or 1) if args.demo else 1,
                          args.nproc_per_run)
    output = Path(args.output).resolve()
    if output.exists() and not output.is_dir():
        raise CompareError(f"--output {args.output} is a file")
    if args.data_root is None:
        output.mkdir(parents=True, exist_ok=True)
        args.data_root = str(demo_data(output))
    data_root = os.path.realpath(args.data_root)
    runs, zero = make_runs(args, trainer_flags, output, data_root)
    n_train = count_split(data_root, "Training")
    count_split(data_root, "Test")
    budgets, final = label_budgets(args, runs[0].args, n_train)
    plan = Plan(output, list(args.strategies), list(args.seeds), budgets, runs, zero, devices, final, n_train,
                runs[0].args, args.nproc_per_run, args.click_budgets)
    check_existing(plan)
    return plan


def check_existing(plan: Plan) -> None:
    """Every run folder already in OUTPUT must have been made with the requested settings."""
    wanted = {(r.strategy, str(r.seed)): r for r in plan.runs}
    problems = []
    for config in sorted(plan.output.glob("*/seed*/*/config.txt")):
        run_dir = config.parent
        if not re.fullmatch(r"Skin_\d+", run_dir.name):
            continue  # e.g. a folder set aside after a first epoch that never finished
        strategy, seed = run_dir.parent.parent.name, run_dir.parent.name[len("seed"):]
        run = wanted.get((strategy, seed))
        ignore = set() if run is not None and run.run_dir == run_dir else ARM_SETTINGS | {"seed"}
        diff = differences(settings_of((plan.runs[0] if run is None else run).args), read_config(run_dir), ignore)
        if run is not None and run.run_dir != run_dir:
            diff.insert(0, f"run folder {run_dir.name}, now {run.run_dir.name}")
        if diff:
            problems.append(f"{run_dir.relative_to(plan.output)}: {'; '.join(diff)}")
    zero_config = plan.zero_shot.run_dir / "config.txt"
    if zero_config.is_file():
        diff = differences(settings_of(plan.zero_shot.args), read_config(zero_config.parent), ARM_SETTINGS)
        if diff:
            problems.append(f"{ZERO_SHOT}: {'; '.join(diff)}")
    if problems:
        raise CompareError(f"--output {plan.output} holds runs made with other settings (nothing was run or "
                           "changed; use another --output, or the settings of those runs):\n  "
                           + "\n  ".join(problems))


# ----------------------------------------------------------------------------- running

def set_aside_name(run_dir: Path) -> Path:
    n = 1
    while run_dir.with_name(f"{run_dir.name}.aborted{n}").exists():
        n += 1
    return run_dir.with_name(f"{run_dir.name}.aborted{n}")


def set_aside(run_dir: Path) -> Optional[Path]:
    """Move a run that stopped in its first epoch (nothing to continue) to RUN_DIR.aborted<k>, owning it meanwhile
    (``FolderLocked`` while another process does); None when RUN_DIR holds no run. A run in any other state is a
    CompareError: nothing is moved."""
    from run_folder import RunFolder

    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        return None
    with folder.lock:
        status = folder.status()
        if status == "new":
            return None
        if status != "dead":
            raise CompareError(f"--set_aside {run_dir}: it holds a run that is {status}, not one that stopped in "
                               "its first epoch; nothing was moved")
        aside = set_aside_name(folder.path)
        os.replace(folder.path, aside)
    return aside


def torchrun(nproc: int) -> List[str]:
    """The command that starts ``nproc`` processes of a program on this machine: torchrun (beside this Python), or
    the module it runs."""
    launcher = Path(sys.executable).with_name("torchrun")
    start = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return start + ["--standalone", "--nproc_per_node", str(nproc)]


def job_commands(run: Job, state: str, gpu: str, nproc: int = 1) -> List[List[str]]:
    """The processes of one job: trainer.py (fresh or --resume; with ``nproc`` > 1 under torchrun, each process on
    the GPU of its LOCAL_RANK) and the Test scoring; or the zero-shot. An aborted run is set aside first
    (``set_aside``)."""
    python, me = sys.executable, str(Path(__file__).resolve())
    if run.strategy == ZERO_SHOT:
        return [[python, me, "--zero_shot", str(run.run_dir), "--"] + run.argv]
    score = [python, me, "--score_run", str(run.run_dir)]
    if state == "trained":
        return [score]
    start = [python, str(TRAINER)] if nproc == 1 else torchrun(nproc) + [str(TRAINER)]
    train = start + run.argv + (["--gpu", gpu] if nproc == 1 else []) + (["--resume"] if state == "interrupted" else [])
    return ([[python, me, "--set_aside", str(run.run_dir)]] if state == "aborted" else []) + [train, score]


def pending(plan: Plan) -> List[Tuple[Job, str]]:
    """(run, state) of every run still to do, the zero-shot first."""
    todo = [(run, run_state(run)) for run in [plan.zero_shot] + plan.runs]
    return [(run, state) for run, state in todo if state != "finished"]


def owned_elsewhere(run: Job) -> Optional[str]:
    """"<run> (pid N on host)" when another process owns the run's folder (another invocation's job), else None."""
    from folder_lock import FolderLock

    owner = FolderLock.owner_of(run.run_dir)
    return None if owner is None else held_name(run, owner)


def held_name(run: Job, owner) -> str:
    return f"{run.name} ({owner.owner or 'by a process that has just started'})"


def print_commands(plan: Plan) -> List[str]:
    """One shell line per missing run (run anywhere, in any order; CUDA_VISIBLE_DEVICES picks the GPU, or the GPUs
    of a run under torchrun), except those another process owns now: returned, named."""
    held = []
    for run, state in pending(plan):
        owner = owned_elsewhere(run)
        if owner:
            held.append(owner)
        else:
            print(" && ".join(shlex.join(cmd) for cmd in job_commands(run, state, "0", plan.nproc_per_run)))
    return held


def job_env(device: Optional[str], slots: int, nproc: int = 1) -> Dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = "" if device is None else device
    if device is None and slots * nproc > 1:  # CPU processes share the cores instead of each taking all of them
        threads = str(max(1, (os.cpu_count() or 1) // (slots * nproc)))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def run_job(run: Job, device: Optional[str], slots: int, label: str, nproc: int = 1) -> bool:
    """Run one job's processes in order (output appended to its run.log), as the run's state is when it starts;
    False if one of them failed. ``FolderLocked`` when another process owns the run's folder (nothing is run)."""
    from folder_lock import FolderLock

    owner = FolderLock.owner_of(run.run_dir)
    if owner is not None:
        raise owner
    state = run_state(run)  # it may have changed while the job waited for a slot
    if state == "finished":
        print(f"{label} {run.name}: finished meanwhile (skipped)")
        return True
    if state == "lost":
        print(f"{label} {run.name}: FAILED: {run.run_dir} records finished epochs but its last_state.pth is gone: "
              "restore it (the run then resumes), or delete the run folder (it is then run afresh)", flush=True)
        return False
    if state == "aborted":
        aside = set_aside(run.run_dir)
        where = f"set aside as {aside.name}" if aside else "gone meanwhile"
        print(f"{label} {run.name}: stopped in its first epoch; {where}, starting afresh")
        state = "new"
    where = ("CPU" if device is None else f"GPU{'s' if ',' in device else ''} {device}") + \
        (f" ({nproc} processes)" if nproc > 1 else "")
    verb = {"interrupted": "resuming", "trained": "scoring on Test"}.get(state, "starting")
    print(f"{label} {run.name}: {verb} on {where} (log: {run.log_path})", flush=True)
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run.log_path, "a") as log:
        for cmd in job_commands(run, state, "cpu" if device is None else "0", nproc):
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  env=job_env(device, slots, nproc)).returncode
            if code:
                print(f"{label} {run.name}: FAILED (exit {code}) after {time.perf_counter() - start:.0f} s; "
                      f"see {run.log_path}", flush=True)
                return False
    print(f"{label} {run.name}: done in {time.perf_counter() - start:.0f} s", flush=True)
    return True


def execute(plan: Plan) -> Tuple[List[str], List[str]]:
    """Every pending job, len(plan.devices) at once, each on a free device slot: (the names of failed ones, those of
    runs skipped because another process owns their folder, with its pid)."""
    todo = pending(plan)
    finished = len(plan.runs) + 1 - len(todo)
    if finished:
        print(f"{finished} of {len(plan.runs) + 1} jobs already finished (skipped)")
    slots: "queue.Queue[Optional[str]]" = queue.Queue()
    for device in plan.devices:
        slots.put(device)

    def work(item: Tuple[int, Tuple[Job, str]]) -> Tuple[Optional[str], Optional[str]]:
        number, (run, _) = item
        label, device = f"[{number}/{len(todo)}]", slots.get()
        try:
            return (None if run_job(run, device, len(plan.devices), label, plan.nproc_per_run) else run.name), None
        except FolderLocked as owner:
            print(f"{label} {run.name}: skipped: {owner}", flush=True)
            return None, held_name(run, owner)
        except CompareError as err:  # its state changed under it (another invocation)
            print(f"{label} {run.name}: FAILED: {err}", flush=True)
            return run.name, None
        finally:
            slots.put(device)

    with ThreadPoolExecutor(max_workers=len(plan.devices)) as pool:
        outcomes = list(pool.map(work, enumerate(todo, start=1)))
    return [f for f, _ in outcomes if f], [h for _, h in outcomes if h]


# ----------------------------------------------------------------------------- scoring (one job's second step)

def pick_checkpoint(run_dir: Path, keep_best: str = "newest") -> Path:
    """The run's best checkpoint (with --keep_best all, the highest of those kept: their names order them by Dice),
    else last_model.pth (the final model, when no best was saved)."""
    from run_folder import BEST_PATTERN, LAST_MODEL, RunFolder

    best = RunFolder(run_dir).best_checkpoints()
    if len(best) > 1 and keep_best != "all":
        raise CompareError(f"{run_dir} holds {len(best)} {BEST_PATTERN} files; expected one (the run's keep_best is "
                           f"{keep_best})")
    if best:
        return best[-1]
    if not (run_dir / LAST_MODEL).is_file():
        raise CompareError(f"{run_dir}: no {BEST_PATTERN} and no {LAST_MODEL} (the run did not finish)")
    return run_dir / LAST_MODEL


def split_loader(settings: Dict[str, str], split: str, limit: Optional[int]):
    """Batches of ``split`` of the run's data (the first ``limit`` images), as val.validate takes them."""
    from torch.utils.data import DataLoader, Subset

    from datasets_skin import DEFAULT_MAX_IMAGE_PIXELS, ValSkinDataset, collate_val, find_split

    dataset = ValSkinDataset(*find_split(settings["data_root"], split), int(settings["img_size"]),
                             max_image_pixels=int(settings.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)))
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    return DataLoader(dataset, batch_size=int(settings["batch_size"]), shuffle=False,
                      num_workers=int(settings["num_workers"]), collate_fn=collate_val)


def validation_costs(model, targs: argparse.Namespace, loader) -> List[dict]:
    """What correcting the untrained model's proposal of each image of ``loader`` (the first --val_limit validation
    images) would cost, computed as the trainer computes a selected image's (``proposal_costs.run_costs``) against
    its ground truth: one row per image, its name and the cost cells (annotation_cost.COST_COLUMNS)."""
    from proposal_costs import COST_COLUMNS, run_costs
    from run_folder import cost_cell

    rows = []
    for batch in loader:
        costs = run_costs(model, batch["image"], batch["mask_orig"], targs)
        rows += [dict(name=name, **{c: cost_cell(row[c]) for c in COST_COLUMNS})
                 for name, row in zip(batch["name"], costs)]
    return rows


def worker_device():
    """The job's device: CUDA_VISIBLE_DEVICES (set by the runner or a scheduler) leaves one GPU, or none."""
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def load_run_model(settings: Dict[str, str], device, weights: Optional[Path] = None):
    """The model of a run's settings (its --module honoured), with ``weights`` (a trained full state_dict) if given."""
    from sam_lora_image_encoder_prompt import ModelInputError, build_model_from_settings

    try:
        return build_model_from_settings(settings, device, weights).eval()
    except ModelInputError as err:
        raise CompareError(f"{weights or settings.get('checkpoint')}: {err}") from None


def score_run(run_dir: Path) -> None:
    """RUN_DIR/test_metrics.csv: per-image val.py metrics of the run's checkpoint on the Test split, the run folder
    owned meanwhile (``FolderLocked`` while another process owns it)."""
    import torch

    import val
    from folder_lock import FolderLock

    run_dir = Path(run_dir)
    if not (run_dir / "config.txt").is_file():
        raise CompareError(f"--score_run {run_dir}: no config.txt there (not a trainer.py run folder)")
    with FolderLock(run_dir):
        settings = read_config(run_dir)
        device = worker_device()
        checkpoint = pick_checkpoint(run_dir, settings.get("keep_best", "newest"))
        model = load_run_model(settings, device, checkpoint)
        result = val.validate(torch.no_grad()(model.predict_logits), split_loader(settings, "Test", None),
                              int(settings["num_classes"]), device)  # float32, as val.py
        val.write_csv(result["rows"], run_dir / TEST_CSV)
    print(f"{checkpoint.name} on Test: Dice {result['mean']['dice']:.4f} over {len(result['rows'])} images")


def zero_shot(out_dir: Path, trainer_argv: Sequence[str]) -> None:
    """The untrained model (what trainer.py starts from) on Validation and Test: the cold-start floor; and what
    correcting its proposal of each validation image would cost (DIR/val_costs.csv)."""
    import torch

    import utils
    import val
    from run_folder import RunFolder

    targs = resolve_trainer_args(trainer_argv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(out_dir)
    folder.own()  # for the rest of this call (FolderLocked while another process owns it)
    if not (out_dir / "config.txt").is_file():
        folder.write_config(vars(targs))
    settings = settings_of(targs)
    device = worker_device()
    model = load_run_model(settings, device)

    @torch.no_grad()
    def validation(images: torch.Tensor) -> torch.Tensor:  # the precision of the trainer's validation
        with utils.autocast(device, enabled=targs.precision == "mixed"):
            return model.predict_logits(images)

    validation_images = split_loader(settings, "Validation", targs.val_limit)  # for the metrics and the costs
    for split, loader, name, predict in (("Validation", validation_images, "val_metrics.csv", validation),
                                         ("Test", split_loader(settings, "Test", None), TEST_CSV,
                                          torch.no_grad()(model.predict_logits))):
        result = val.validate(predict, loader, int(settings["num_classes"]), device)
        val.write_csv(result["rows"], out_dir / name)
        print(f"zero-shot on {split}: Dice {result['mean']['dice']:.4f} over {len(result['rows'])} images")
    costs = validation_costs(model, targs, validation_images)
    val.write_csv(costs, out_dir / VAL_COSTS_CSV)
    print(f"zero-shot annotation cost ({targs.annotation_cost}) of {len(costs)} validation images: {VAL_COSTS_CSV}")


# ----------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, trainer_flags = build_parser().parse_known_args(argv[:cut])
    from safe_io import WriteError  # after parsing: it imports torch

    try:
        if args.score_run or args.zero_shot or args.set_aside:
            return worker(args, argv[cut + 1:])
        plan = make_plan(args, trainer_flags)
        failed, held = [], []
        if args.print_commands:
            held = print_commands(plan)
        elif not args.collect:
            failed, held = execute(plan)
        if held:
            print(f"{len(held)} run(s) skipped: another process owns their folder (another invocation's job, still "
                  f"running): {', '.join(held)}. Run the same command again once it has ended.", file=sys.stderr)
        if failed:
            print(f"{len(failed)} job(s) failed: {', '.join(failed)}. Run the same command again to resume "
                  "them, or add --collect for a report of the finished runs.", file=sys.stderr)
        if failed or held:
            return 1
        if not args.print_commands:
            write_report(plan)
        return 0
    except (CompareError, FolderLocked, WriteError) as err:
        wait = "; wait until it ends" if isinstance(err, FolderLocked) else ""
        print(f"compare_strategies.py: error: {err}{wait}", file=sys.stderr)
        return 2


def worker(args: argparse.Namespace, trainer_argv: Sequence[str]) -> int:
    """One job's step, as --print_commands prints them: --set_aside, --score_run or --zero_shot."""
    if args.set_aside:
        aside = set_aside(Path(args.set_aside))
        print(f"{args.set_aside}: " + (f"set aside as {aside}" if aside else "holds no run; nothing to set aside"))
    elif args.score_run:
        score_run(Path(args.score_run))
    else:
        zero_shot(Path(args.zero_shot), trainer_argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
