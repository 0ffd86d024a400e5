"""The report of a strategy comparison (compare_strategies.py): what its jobs are, and what their finished runs
show — learning curves, label-budget and Test tables, paired differences with their statistics.

``Plan`` and ``Job`` describe the comparison (compare_strategies.make_plan builds them); ``run_state`` reads a
job's state from its run folder; ``write_report`` writes OUTPUT/curves.csv, OUTPUT/learning_curves.png and
OUTPUT/summary.md from the finished runs only. Numbers come from each run's metrics.csv (validation metrics, and
the cumulative annotation cost: changed pixels, clicks to IoU 0.90) and test_metrics.csv, and the zero-shot
folder's val_metrics.csv, test_metrics.csv and val_costs.csv. Learning curves are drawn against labeled images
and against annotation cost (docs/annotation_cost.md).
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

BASELINES = ("mask_difference", "random")  # summary.md: every arm's paired difference to each of them
MIN_SEEDS_FOR_P = 6  # a two-sided Wilcoxon signed-rank p can go below 0.05 only from 6 pairs on (2/2^6)
TEST_CSV = "test_metrics.csv"
VAL_COSTS_CSV = "val_costs.csv"  # the zero-shot model's annotation cost of each validation image
ZERO_SHOT = "zero_shot"
BUDGET_FRACTIONS = (0.25, 0.5, 1.0)  # default budgets: these fractions of the final labeled count, or click range
CLICKS, CHANGED_PIXELS = "clicks_90", "changed_pixels"  # metrics.csv's cumulative costs (annotation_cost.TOTAL_COLUMNS)
REPORT_METRICS = (("dice", "Dice"), ("jaccard", "Jaccard"), ("threshold_jaccard", "thresholded Jaccard"),
                  ("hd95", "HD95 (px)"))


class CompareError(Exception):
    """A problem with the request; the message names the flag or file. Nothing has been run or written."""


# ----------------------------------------------------------------------------- the comparison's jobs

@dataclass
class Job:
    """One (arm, seed) trainer run and its Test scoring, or the zero-shot evaluation (strategy ``zero_shot``)."""

    strategy: str                 # the arm's text (its folder), or zero_shot
    seed: int
    run_dir: Path
    argv: List[str]               # trainer.py flags, without --gpu and --resume
    args: argparse.Namespace      # what trainer.py makes of them

    @property
    def name(self) -> str:
        return ZERO_SHOT if self.strategy == ZERO_SHOT else f"{self.strategy}/seed{self.seed}"

    @property
    def log_path(self) -> Path:
        return (self.run_dir if self.strategy == ZERO_SHOT else self.run_dir.parent) / "run.log"


@dataclass
class Plan:
    output: Path
    strategies: List[str]         # the arms' texts, in the order asked
    seeds: List[int]
    budgets: List[int]
    runs: List[Job]
    zero_shot: Job
    devices: List[Optional[str]]
    final_labeled: int
    n_train: int
    trainer_args: argparse.Namespace  # of the first run (what the runs share)
    nproc_per_run: int = 1  # processes (devices) per trainer run: under torchrun when more than one
    click_budgets: Optional[List[int]] = None  # --click_budgets; None: from the runs (``click_budgets``)


def run_state(run: Job) -> str:
    """new | aborted (stopped before its first epoch ended) | interrupted | trained (Test not scored) | finished |
    lost (records of finished epochs, but last_state.pth gone: neither continued nor restarted) (the trainer's run
    folder says which, run_folder.RunFolder.status)."""
    from run_folder import RunFolder

    d = run.run_dir
    if run.strategy == ZERO_SHOT:
        done = all((d / name).is_file() for name in ("val_metrics.csv", TEST_CSV, VAL_COSTS_CSV))
        return "finished" if done else "new"
    status = RunFolder(d).status()
    if status == "finished":
        return "finished" if (d / TEST_CSV).is_file() else "trained"
    return {"dead": "aborted", "waiting": "interrupted"}.get(status, status)


# ----------------------------------------------------------------------------- reading finished runs

def run_curve(run: Job) -> List[dict]:
    """One row per finished epoch (the run's metrics.csv): strategy, seed, epoch, labeled, the cumulative annotation
    costs (annotation_cost.TOTAL_COLUMNS; None where not recorded) and every validation metric (None where the epoch
    was not validated)."""
    import val
    from annotation_cost import TOTAL_COLUMNS
    from run_folder import RunFolder

    rows = RunFolder(run.run_dir).read_metrics()
    names = [k for k in (rows[0] if rows else {}) if val.is_metric_column(k)]
    return [dict(strategy=run.strategy, seed=run.seed, epoch=row["epoch"], labeled=row["labeled"],
                 **{c: row.get(c) for c in TOTAL_COLUMNS}, **{m: row.get(m) for m in names}) for row in rows]


def metric_rows(path: Path, names: Sequence[str], value: Callable[[str, str], object] = lambda _, text: float(text)
                ) -> List[Dict[str, float]]:
    """The per-image rows of a metrics CSV (val.write_csv's), the columns ``names`` as ``value(column, text)``
    gives them (numbers; ``run_folder.cost_value`` for cost cells); a CompareError naming the file when it cannot be
    read as one (no rows, a column or a value missing)."""
    try:
        with open(path, newline="") as f:
            rows = [{m: value(m, r[m]) for m in names} for r in csv.DictReader(f)]
    except KeyError as err:
        raise CompareError(f"{path} is damaged: it has no column {err}") from None
    except (OSError, csv.Error, TypeError, ValueError) as err:
        raise CompareError(f"{path} is damaged: {err}") from None
    if not rows:
        raise CompareError(f"{path} is damaged: it holds no image's row")
    return rows


def means(rows: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Mean over the images (rows), per metric."""
    return {m: float(np.mean([r[m] for r in rows])) for m in rows[0]}


def zero_shot_clicks(path: Path) -> Optional[Dict[str, float]]:
    """The untrained model's clicks to IoU 0.90 per validation image (val_costs.csv, zero_shot's): dict(mean, with
    "not reached" counted as MAX_CLICKS as in the runs' totals; not_reached, how many; images), or None when the
    clicks were not simulated (--annotation_cost other than clicks). A CompareError names a damaged file."""
    from annotation_cost import NOT_REACHED, clicks_spent
    from run_folder import cost_value

    clicks = [row[CLICKS] for row in metric_rows(path, [CLICKS], cost_value)]
    if None in clicks:
        return None
    spent = [clicks_spent(n) for n in clicks]
    return dict(mean=float(np.mean(spent)), not_reached=float(clicks.count(NOT_REACHED)), images=float(len(clicks)))


def run_results(run: Job, names: Sequence[str]) -> Tuple[List[dict], Dict[str, float], int]:
    """A finished run's curve (metrics.csv), its Test means and its number of Test images (test_metrics.csv);
    a CompareError naming the file when one is damaged."""
    from run_folder import RunFolderError

    try:
        curve = run_curve(run)
    except RunFolderError as err:
        raise CompareError(str(err)) from None
    test = metric_rows(run.run_dir / TEST_CSV, names)
    return curve, means(test), len(test)


# ----------------------------------------------------------------------------- statistics

def dice_at(curve: Sequence[dict], budget: int) -> Optional[float]:
    """Validation Dice of the first validated epoch with at least ``budget`` labeled images."""
    return next((r["dice"] for r in curve if r["labeled"] >= budget and r["dice"] is not None), None)


def dice_within(curve: Sequence[dict], budget: float, cost: str = CLICKS) -> Optional[float]:
    """Validation Dice of the last validated epoch whose cumulative ``cost`` is at or under ``budget`` (what that
    much annotation bought); None when there is none."""
    within = [r["dice"] for r in curve if r.get(cost) is not None and r[cost] <= budget and r["dice"] is not None]
    return within[-1] if within else None


def final_cost(curve: Sequence[dict], cost: str = CLICKS) -> Optional[float]:
    """The run's cumulative ``cost`` at its last epoch (None: not recorded)."""
    return curve[-1].get(cost) if curve else None


def cost_range(res: "Results", cost: str = CLICKS) -> Optional[float]:
    """The range every arm reaches: 0 to the smallest final cumulative ``cost`` of the finished runs (None when a
    run did not record it, or there are none)."""
    finals = [final_cost(curve, cost) for per_seed in res.curves.values() for curve in per_seed.values()]
    return None if not finals or None in finals else float(min(finals))


def area_under_cost_curve(curve: Sequence[dict], start_dice: Optional[float], end: Optional[float],
                          cost: str = CLICKS) -> Optional[float]:
    """Area under validation Dice against cumulative ``cost`` from 0 to ``end``, divided by ``end`` (in [0, 1]):
    linear between the validated epochs, from (0, ``start_dice``), the untrained model's Dice (what every run has
    before any annotation); the curve at ``end`` interpolated. None without ``start_dice``, for an empty range, or
    where the run did not record the cost."""
    if start_dice is None or not end or any(r.get(cost) is None for r in curve):
        return None
    points = [(0.0, start_dice)] + [(float(r[cost]), r["dice"]) for r in curve if r["dice"] is not None]
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= end:
            break
        if x1 > end:  # the segment's part up to ``end``
            y1, x1 = y0 + (y1 - y0) * (end - x0) / (x1 - x0), end
        area += (x1 - x0) * (y0 + y1) / 2
    if points[-1][0] < end:  # its last validated epoch is short of the range
        return None
    return area / end


def area_under_curve(curve: Sequence[dict]) -> Optional[float]:
    """Trapezoidal area under Dice vs labeled images over the validated epochs, divided by the labeled range
    (first to last validated epoch), so it lies in [0, 1]; one validated epoch: its Dice."""
    points = [(r["labeled"], r["dice"]) for r in curve if r["dice"] is not None]
    if len(points) < 2:
        return points[0][1] if points else None
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1; None for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None


def fmt(values: Sequence[Optional[float]], digits: int = 4) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    mean, std = mean_std(present)
    text = f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")
    return text + ("" if len(present) == len(values) else f" (n={len(present)})")


def paired_test(diffs: Sequence[float]) -> str:
    """Two-sided Wilcoxon signed-rank p of paired differences, only where it can be below 0.05."""
    if len(diffs) < MIN_SEEDS_FOR_P:
        return f"too few seeds (n={len(diffs)} < {MIN_SEEDS_FOR_P})"
    if not any(diffs):
        return "all differences 0"
    from scipy.stats import wilcoxon

    return f"{wilcoxon(diffs).pvalue:.3g}"


# ----------------------------------------------------------------------------- the report

@dataclass
class Results:
    curves: Dict[str, Dict[int, List[dict]]]        # strategy -> seed -> one row per epoch
    tests: Dict[str, Dict[int, Dict[str, float]]]   # strategy -> seed -> Test-split means
    zero: Optional[Dict[str, Optional[Dict[str, float]]]]  # the untrained model's {"val": means, "test": means,
                                                           # "clicks": zero_shot_clicks or None}
    missing: List[str]
    n_test: int = 0


def gather(plan: Plan) -> Results:
    """What the finished runs (and the zero-shot evaluation, if done) hold."""
    names = [m for m, _ in REPORT_METRICS]
    res = Results({s: {} for s in plan.strategies}, {s: {} for s in plan.strategies}, None, [])
    for run in plan.runs:
        state = run_state(run)
        if state != "finished":
            res.missing.append(f"{run.name} ({state})")
            continue
        if not (run.run_dir / "metrics.csv").is_file():
            res.missing.append(f"{run.name} (no metrics.csv: made by an older trainer.py; rerun it elsewhere)")
            continue
        try:
            curve, test, res.n_test = run_results(run, names)
        except CompareError as err:  # one damaged run does not hide the others: it is left out, and said so
            left_out(res, run.name, err)
            continue
        res.curves[run.strategy][run.seed], res.tests[run.strategy][run.seed] = curve, test
    if run_state(plan.zero_shot) != "finished":
        res.missing.append(f"{ZERO_SHOT} (not evaluated)")
        return res
    try:
        res.zero = dict(val=means(metric_rows(plan.zero_shot.run_dir / "val_metrics.csv", names)),
                        test=means(metric_rows(plan.zero_shot.run_dir / TEST_CSV, names)),
                        clicks=zero_shot_clicks(plan.zero_shot.run_dir / VAL_COSTS_CSV))
    except CompareError as err:
        left_out(res, ZERO_SHOT, err)
    return res


def left_out(res: Results, name: str, err: CompareError) -> None:
    """A finished run whose records are damaged: named in summary.md's "Not in this report" and on stderr."""
    res.missing.append(f"{name} (left out: {err}; repair or delete that file, then run the command again)")
    print(f"compare_strategies.py: {name} left out of the report: {err}", file=sys.stderr)


def curve_rows(res: Results) -> List[dict]:
    rows = [row for per_seed in res.curves.values() for seed in sorted(per_seed) for row in per_seed[seed]]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in columns} for row in rows]


def budget_table(plan: Plan, res: Results) -> List[str]:
    lines = ["| strategy | seeds | " + " | ".join(f"Dice @ {b}" for b in plan.budgets) + " | AUC |",
             "|---" * (len(plan.budgets) + 3) + "|"]
    for strategy, per_seed in res.curves.items():
        cells = [fmt([dice_at(per_seed[s], b) for s in sorted(per_seed)]) for b in plan.budgets]
        auc = fmt([area_under_curve(per_seed[s]) for s in sorted(per_seed)])
        lines.append(f"| {strategy} | {len(per_seed)} | " + " | ".join(cells) + f" | {auc} |")
    if res.zero:
        zero = f"{res.zero['val']['dice']:.4f}"
        lines.append("| zero-shot (untrained) | – | " + " | ".join([zero] * len(plan.budgets)) + " | – |")
    return lines


def default_budgets(final: float) -> List[int]:
    """BUDGET_FRACTIONS of ``final`` (the labeled count the runs reach, or the click range every arm reaches)."""
    return sorted({max(1, round(f * final)) for f in BUDGET_FRACTIONS})


def click_budgets(plan: Plan, res: Results) -> List[int]:
    """--click_budgets, else 25/50/100 % of the click range every arm reaches ([] when it is empty or unknown)."""
    if plan.click_budgets is not None:
        return sorted(set(plan.click_budgets))
    reach = cost_range(res)
    return default_budgets(reach) if reach else []


def start_dice(res: Results) -> Optional[float]:
    """The untrained model's validation Dice: every curve's value before any annotation (None: not evaluated)."""
    return res.zero["val"]["dice"] if res.zero else None


def click_measures(plan: Plan, res: Results) -> List[Tuple[str, object]]:
    """(label, curve -> value) of the click axis: Dice within each click budget, and the area under Dice against
    clicks over the range every arm reaches."""
    reach, start = cost_range(res), start_dice(res)
    return [(f"Dice @ {b} clicks", lambda curve, b=b: dice_within(curve, b)) for b in click_budgets(plan, res)] + \
        [("AUC (clicks)", lambda curve: area_under_cost_curve(curve, start, reach))]


def clicks_per_image(curve: Sequence[dict]) -> Optional[float]:
    """A run's clicks to IoU 0.90 per image it selected (its totals at the last epoch; not reached counted as 20)."""
    total = final_cost(curve)
    return None if total is None or not curve[-1]["labeled"] else total / curve[-1]["labeled"]


def click_table(plan: Plan, res: Results) -> List[str]:
    budgets, reach = click_budgets(plan, res), cost_range(res)
    if reach is None:
        return ["No click costs in these runs (trainer.py --annotation_cost clicks records them; compare_strategies.py "
                "passes it unless told otherwise)."]
    lines = [f"Range every arm reaches: 0 to {reach:g} clicks (the smallest final cumulative count).", "",
             "| strategy | seeds | " + "".join(f"Dice @ {b} clicks | " for b in budgets)
             + f"AUC (clicks, 0–{reach:g}) | clicks / image | not reached |",
             "|---" * (len(budgets) + 5) + "|"]
    for strategy, per_seed in res.curves.items():
        seeds = sorted(per_seed)
        cells = [fmt([measure(per_seed[s]) for s in seeds]) for _, measure in click_measures(plan, res)]
        cells += [fmt([clicks_per_image(per_seed[s]) for s in seeds], 2),
                  fmt([final_cost(per_seed[s], "not_reached_90") for s in seeds], 1)]
        lines.append(f"| {strategy} | {len(per_seed)} | " + " | ".join(cells) + " |")
    if res.zero:
        zero, clicks = f"{res.zero['val']['dice']:.4f}", res.zero["clicks"]
        per_image = ["–", "–"] if clicks is None else [f"{clicks['mean']:.2f}", f"{clicks['not_reached']:.0f} of "
                                                                              f"{clicks['images']:.0f}"]
        lines.append("| zero-shot (untrained) | – | " + "".join(f"{zero} | " for _ in budgets) + "– | "
                     + " | ".join(per_image) + " |")
    return lines


def test_table(res: Results) -> List[str]:
    lines = ["| strategy | seeds | " + " | ".join(label for _, label in REPORT_METRICS) + " |",
             "|---" * (len(REPORT_METRICS) + 2) + "|"]
    for strategy, per_seed in res.tests.items():
        cells = [fmt([per_seed[s][m] for s in sorted(per_seed)], 2 if m == "hd95" else 4) for m, _ in REPORT_METRICS]
        lines.append(f"| {strategy} | {len(per_seed)} | " + " | ".join(cells) + " |")
    if res.zero:
        cells = [fmt([res.zero["test"][m]], 2 if m == "hd95" else 4) for m, _ in REPORT_METRICS]
        lines.append("| zero-shot (untrained) | – | " + " | ".join(cells) + " |")
    return lines


def paired_table(plan: Plan, res: Results, baseline: str) -> List[str]:
    """Every other arm minus ``baseline`` for the same seed, at each label budget and in AUC, and on the click axis
    (``click_measures``)."""
    base = res.curves.get(baseline)
    if not base:
        return [f"No finished `{baseline}` runs, so no paired differences to it."]
    lines = ["| strategy | at | mean difference ± std | seeds | Wilcoxon p (two-sided) |", "|---|---|---|---|---|"]
    measures = [(f"Dice @ {b}", lambda curve, b=b: dice_at(curve, b)) for b in plan.budgets]
    measures += [("AUC", area_under_curve)] + click_measures(plan, res)
    for strategy, per_seed in res.curves.items():
        if strategy == baseline:
            continue
        for label, measure in measures:
            pairs = [(measure(per_seed[s]), measure(base[s])) for s in sorted(set(per_seed) & set(base))]
            diffs = [a - b for a, b in pairs if a is not None and b is not None]
            if diffs:
                lines.append(f"| {strategy} − {baseline} | {label} | {fmt(diffs)} | {len(diffs)} | "
                             f"{paired_test(diffs)} |")
    return lines


def pool_text(pool: object) -> str:
    return "every unlabeled image" if str(pool) == "all" else f"pools of {pool}"


def arms_table(plan: Plan) -> List[str]:
    """What each arm ran (from its first run's trainer settings): the strategy of epoch 1 and of later epochs,
    with their pools."""
    from active_learning_strategies import SelectionPlan

    lines = ["| arm | epoch 1 | epochs 2+ |", "|---|---|---|"]
    for arm in plan.strategies:
        selection = SelectionPlan.from_settings(vars(next(run.args for run in plan.runs if run.strategy == arm)))
        first, later = (f"{s.name} over {pool_text(s.pool_size)}" for s in (selection.for_epoch(1), selection.later))
        lines.append(f"| {arm} | {first} | {later} |")
    return lines


def summary_markdown(plan: Plan, res: Results) -> str:
    t = plan.trainer_args
    weights = "none (seeded random weights)" if t.checkpoint.lower() == "none" else Path(t.checkpoint).name
    lines = [
        "# Active-learning strategies compared", "",
        f"{len(plan.strategies)} arms × {len(plan.seeds)} seeds ({', '.join(map(str, plan.seeds))}); "
        f"trainer.py settings shared by every run: model {Path(t.model_cfg).name}, checkpoint {weights}, img_size "
        f"{t.img_size}, batch_size {t.batch_size}, max_epochs {t.max_epochs}, "
        f"label_budget {t.label_budget}, train_on {t.train_on}, val_limit {t.val_limit}; "
        f"{plan.n_train} training images, final labeled count {plan.final_labeled}. Each arm's strategy and pools:",
        ""] + arms_table(plan) + [""]
    if t.checkpoint.lower() == "none":
        lines += ["**No SAM2 checkpoint: every model started from random weights. These numbers show that the "
                  "pipeline works, not how the strategies compare on SAM2.1.**", ""]
    if res.missing:
        lines += [f"Not in this report: {', '.join(res.missing)}.", ""]
    lines += ["## Validation Dice at label budgets (mean ± std over seeds)", ""] + budget_table(plan, res)
    lines += ["", "## Validation Dice at click budgets (mean ± std over seeds)", ""] + click_table(plan, res)
    lines += ["", f"## Test split ({res.n_test} images, original resolution; mean ± std over seeds)", ""]
    lines += test_table(res)
    for baseline in BASELINES:
        lines += ["", f"## Paired difference to {baseline} (same seed)", ""] + paired_table(plan, res, baseline)
    lines += ["", "## How the numbers are made", "",
              "- Dice @ B: validation Dice (val.py; mean over the validation images) of the first validated epoch "
              "at which at least B images are labeled (columns of curves.csv: labeled, dice).",
              "- AUC: area under validation Dice against the number of labeled images (trapezoids between "
              "validated epochs) divided by the labeled range from the first to the last of them: in [0, 1].",
              "- mean ± std: over seeds; std is the sample standard deviation (n − 1); a single seed shows no std; "
              "(n=k) marks a cell with fewer seeds than the row.",
              "- Test: each run's best checkpoint (best_model_dice*.pth, else last_model.pth) on every Test "
              "image at its original resolution; the per-image values are in the run's test_metrics.csv. HD95 "
              "in pixels; thresholded Jaccard is 0 for images below 0.65.",
              f"- Paired differences: each arm minus {' and minus '.join(BASELINES)} (the method and the usual "
              "baseline) for the same seed. A two-sided Wilcoxon "
              f"signed-rank p (scipy) is given from {MIN_SEEDS_FOR_P} seeds on; with fewer, no p below 0.05 is "
              "possible, so none is claimed. A difference within the seeds' spread is no evidence either way.",
              "- Click axis (docs/annotation_cost.md): each selected image's clicks to IoU 0.90 by RITM's simulated "
              "annotator, from the model that selected it, against its ground truth; an image not reached in 20 "
              "clicks counts 20, and how many were not reached is its own column (curves.csv: clicks_90, "
              "not_reached_90, changed_pixels, cumulative per run).",
              "- Dice @ N clicks: validation Dice of the last validated epoch whose cumulative clicks are at or under "
              "N (missing when none is); default N: 25/50/100 % of the range every arm reaches (0 to the smallest "
              "final cumulative count of any run), or --click_budgets.",
              "- AUC (clicks): area under validation Dice against cumulative clicks over that range, linear between "
              "validated epochs from (0 clicks, the untrained model's Dice), divided by the range: in [0, 1]; it "
              "needs the zero-shot evaluation.",
              "- clicks / image: a run's cumulative clicks over its labeled images; zero-shot: the untrained "
              "model's mean over the validation images (what annotating each with plain SAM2 would cost).",
              "- zero-shot: the untrained model (what every run starts from) on the same images.", "",
              f"Curves: learning_curves.png, curves.csv. TensorBoard: `tensorboard --logdir {plan.output}`."]
    return "\n".join(lines) + "\n"


def band(per_seed: Dict[int, List[dict]], metric: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x = labeled counts; mean and sample std over the seeds validated there (std 0 for one seed)."""
    by_x: Dict[int, List[float]] = {}
    for curve in per_seed.values():
        for row in curve:
            if row.get(metric) is not None:
                by_x.setdefault(row["labeled"], []).append(row[metric])
    x = np.array(sorted(by_x))
    stats = [mean_std(by_x[v]) for v in x]
    return x, np.array([m for m, _ in stats]), np.array([s or 0.0 for _, s in stats])


def plot_cost_curves(ax, plan: Plan, res: Results, cost: str, label: str) -> None:
    """Validation Dice against the cumulative ``cost``: one line per run (its arm's colour), from (0, the untrained
    model's Dice) when it was evaluated; for clicks, the click budgets (dotted) and the range every arm reaches."""
    start = start_dice(res)
    drawn = False
    for i, (strategy, per_seed) in enumerate(res.curves.items()):
        for n, seed in enumerate(sorted(per_seed)):
            points = [(r[cost], r["dice"]) for r in per_seed[seed] if r.get(cost) is not None and r["dice"] is not None]
            if not points:
                continue
            x, y = zip(*([(0, start)] if start is not None else []) + points)
            ax.plot(x, y, marker="o", markersize=3, linewidth=1, alpha=0.8, color=f"C{i % 10}",
                    linestyle=("-", "--", ":")[i // 10 % 3], label=f"{strategy}" if n == 0 else None)
            drawn = True
    if res.zero:
        ax.axhline(res.zero["val"]["dice"], color="0.3", linestyle="--", linewidth=1)
    if cost == CLICKS and drawn:
        for b in click_budgets(plan, res):
            ax.axvline(b, color="0.6", linestyle=":", linewidth=1)
            ax.text(b, 1.0, f" {b}", transform=ax.get_xaxis_transform(), fontsize=8, color="0.4", va="bottom")
        reach = cost_range(res)
        if reach:
            ax.axvspan(0, reach, color="0.95", zorder=0, linewidth=0)
        ax.set_title("dotted: the click budgets of summary.md; shaded: the range every arm reaches", fontsize=9,
                     pad=14)
    if drawn and cost == CLICKS:
        ax.legend(loc="best", fontsize=8)
    if not drawn:
        ax.text(0.5, 0.5, f"no {label} recorded\n(trainer.py --annotation_cost)", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
    ax.set_xlabel(f"cumulative {label}")
    ax.set_ylabel("validation Dice (one line per run)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)


def plot_curves(plan: Plan, res: Results, path: Path) -> None:
    """learning_curves.png: validation Dice and HD95 against labeled images (mean ± std band per strategy); Dice
    against cumulative clicks to IoU 0.90 and against changed pixels (one line per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safe_io import atomic_path

    fig, grid = plt.subplots(2, 2, figsize=(12, 9.2), constrained_layout=True)
    axes = grid[0]
    panels = (("dice", "validation Dice (higher is better)"), ("hd95", "validation HD95, pixels (lower is better)"))
    for ax, (metric, label) in zip(axes, panels):
        for i, (strategy, per_seed) in enumerate(res.curves.items()):
            if not per_seed:
                continue
            x, mean, std = band(per_seed, metric)
            ax.plot(x, mean, marker="o", markersize=3, color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3],
                    label=f"{strategy} ({len(per_seed)} seeds)")
            ax.fill_between(x, mean - std, mean + std, color=f"C{i % 10}", alpha=0.2, linewidth=0)
        if res.zero:
            ax.axhline(res.zero["val"][metric], color="0.3", linestyle="--", linewidth=1,
                       label="zero-shot (untrained)")
        for b in plan.budgets:
            ax.axvline(b, color="0.6", linestyle=":", linewidth=1)
            ax.text(b, 1.0, f" {b}", transform=ax.get_xaxis_transform(), fontsize=8, color="0.4", va="bottom")
        ax.set_xlabel("labeled images (dotted: label budgets of summary.md)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[0].legend(loc="best", fontsize=8)
    plot_cost_curves(grid[1][0], plan, res, CLICKS, "clicks to IoU 0.90 (simulated, RITM's protocol)")
    plot_cost_curves(grid[1][1], plan, res, CHANGED_PIXELS, "changed pixels (at the photos' resolution)")
    fig.suptitle(f"Validation metrics against annotation cost: labeled images (mean ± std over seeds), clicks and "
                 f"changed pixels (each run) ({plan.trainer_args.img_size} px, "
                 f"{Path(plan.trainer_args.model_cfg).name})")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(plan: Plan) -> Results:
    """curves.csv, learning_curves.png and summary.md in OUTPUT, from the finished runs only."""
    import val
    from safe_io import atomic_write_text

    res = gather(plan)
    rows = curve_rows(res)
    if not rows:
        raise CompareError(f"--output {plan.output}: no finished runs to report on "
                           f"(unfinished: {', '.join(res.missing)})")
    val.write_csv(rows, plan.output / "curves.csv")
    plot_curves(plan, res, plan.output / "learning_curves.png")
    atomic_write_text(plan.output / "summary.md", summary_markdown(plan, res))
    print(f"report: {plan.output / 'summary.md'}, {plan.output / 'learning_curves.png'}, "
          f"{plan.output / 'curves.csv'}\nview the runs side by side: tensorboard --logdir {plan.output}")
    return res
