"""compare_strategies.py end to end at the smallest settings (64 px, 2 strategies x 2 seeds x 2 epochs).

One comparison (module fixture) is shared by the tests; the resume test copies it, removes one run, kills that
run at the end of its first epoch (MDSAM_CRASH_AT) and reruns the command: the finished runs must not be
touched and the report must equal the uninterrupted one.
"""
import csv
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import active_learning_strategies
import compare_strategies as cs
import comparison_report as report
from run_copies import copy_runs

STRATEGIES, SEEDS, EPOCHS, BATCH, POOL, BUDGET = ("mask_difference", "random"), (1, 2), 2, 2, 4, 3
N_TRAIN, N_VAL, N_TEST = 8, 4, 3
TRAINER_FLAGS = ["--demo", "--img_size", "64", "--batch_size", str(BATCH), "--pool_size", str(POOL),
                 "--max_epochs", str(EPOCHS), "--label_budget", str(BUDGET), "--val_limit", str(N_VAL)]


def labeled_after(epoch: int) -> int:
    """--batch_size per epoch, the last selection cut to end at --label_budget."""
    return min(BATCH * epoch, BUDGET)
REPORT = ("curves.csv", "learning_curves.png", "summary.md")


def request(data: Path, out: Path, *extra: str) -> list:
    return (["--data_root", str(data), "--output", str(out), "--strategies", *STRATEGIES,
             "--seeds", *map(str, SEEDS), "--jobs", "2"] + TRAINER_FLAGS + list(extra))


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table_row(summary: str, section: str, first_cell: str) -> list:
    """The cells of the markdown table row starting with ``first_cell`` in the section titled ``section``."""
    text = summary.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in section {section!r}")


def snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from synthetic_isic import make_synthetic_isic

    return make_synthetic_isic(tmp_path_factory.mktemp("data"), N_TRAIN, N_VAL, N_TEST, size=96, seed=5)


@pytest.fixture(scope="module")
def comparison(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmp")
    assert cs.main(request(data, out)) == 0
    return out


def test_every_artefact_is_written(comparison, tensorboard):
    from PIL import Image

    with Image.open(comparison / "learning_curves.png") as im:
        im.load()  # decodes the whole image
        assert im.format == "PNG" and im.width > 600 and im.height > 300
    rows = read_csv(comparison / "curves.csv")
    assert list(rows[0])[:7] == ["strategy", "seed", "epoch", "labeled", "changed_pixels", "clicks_90",
                                 "not_reached_90"]
    assert {"dice", "jaccard", "threshold_jaccard", "sensitivity", "specificity", "accuracy", "hd95"} <= set(rows[0])
    assert sorted((r["strategy"], int(r["seed"]), int(r["epoch"])) for r in rows) == \
        sorted((s, k, e) for s in STRATEGIES for k in SEEDS for e in range(1, EPOCHS + 1))
    assert all(int(r["labeled"]) == labeled_after(int(r["epoch"])) and r["dice"] != "" for r in rows)
    for strategy in STRATEGIES:
        for seed in SEEDS:
            run_dir = comparison / strategy / f"seed{seed}" / "Skin_64"
            assert (run_dir / "last_model.pth").is_file()
            assert len(read_csv(run_dir / "test_metrics.csv")) == N_TEST
            # the runner asks every run for the clicks (issue 29): each selected image has them, each epoch the sums
            selected = read_csv(run_dir / "al_selection.csv")
            assert "annotation_cost: clicks" in (run_dir / "config.txt").read_text()
            assert all(r["clicks_90"] != "" and r["changed_fraction"] != "" for r in selected)
            curve = [r for r in rows if (r["strategy"], int(r["seed"])) == (strategy, seed)]
            assert [int(r["clicks_90"]) for r in curve] == \
                [sum(20 if s["clicks_90"] == "not reached" else int(s["clicks_90"]) for s in selected
                     if int(s["epoch"]) <= int(r["epoch"])) for r in curve]
            events = tensorboard(run_dir / "log")  # under OUTPUT: `tensorboard --logdir OUTPUT` shows them all
            why = events["images"].get("al/why_selected", [])
            assert why == (list(range(1, EPOCHS + 1)) if strategy == "mask_difference" else [])
    assert len(read_csv(comparison / "zero_shot" / "val_metrics.csv")) == N_VAL
    assert len(read_csv(comparison / "zero_shot" / "test_metrics.csv")) == N_TEST
    costs = read_csv(comparison / "zero_shot" / "val_costs.csv")
    assert [r["name"] for r in costs] == [r["name"] for r in read_csv(comparison / "zero_shot" / "val_metrics.csv")]
    assert all(r["clicks_90"] != "" and r["dice"] != "" for r in costs)
    summary = (comparison / "summary.md").read_text()
    assert "Not in this report" not in summary
    assert "too few seeds (n=2 < 6)" in summary and "No SAM2 checkpoint" in summary
    assert not [p for p in comparison.rglob("*") if p.name.startswith(".tmp-")], "a temporary file was left"


def test_summary_numbers_are_recomputed_from_curves_csv_and_test_csvs(comparison):
    """Formulas: Dice @ B = dice of the first epoch with labeled >= B; AUC = trapezoid area / labeled range;
    mean ± sample std over seeds; Test = mean over the run's per-image rows."""
    rows = read_csv(comparison / "curves.csv")
    summary = (comparison / "summary.md").read_text()
    final = labeled_after(EPOCHS)
    budgets = sorted({max(1, round(f * final)) for f in (0.25, 0.5, 1.0)})
    assert table_row(summary, "Validation Dice", "strategy")[2:-1] == [f"Dice @ {b}" for b in budgets]

    def curve(strategy, seed):
        picked = [r for r in rows if r["strategy"] == strategy and int(r["seed"]) == seed]
        return [(int(r["labeled"]), float(r["dice"])) for r in sorted(picked, key=lambda r: int(r["epoch"]))]

    def mean_pm_std(values, digits=4):
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    def dice_at(points, budget):
        return next(d for labeled, d in points if labeled >= budget)

    def auc(points):
        area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
        return area / (points[-1][0] - points[0][0])

    for strategy in STRATEGIES:
        cells = table_row(summary, "Validation Dice", strategy)
        assert cells[2] == mean_pm_std([dice_at(curve(strategy, k), budgets[0]) for k in SEEDS])
        assert cells[-1] == mean_pm_std([auc(curve(strategy, k)) for k in SEEDS])
        tests = [read_csv(comparison / strategy / f"seed{k}" / "Skin_64" / "test_metrics.csv") for k in SEEDS]
        cells = table_row(summary, "Test split", strategy)
        assert cells[2] == mean_pm_std([statistics.mean(float(r["dice"]) for r in t) for t in tests])
        assert cells[5] == mean_pm_std([statistics.mean(float(r["hd95"]) for r in t) for t in tests], 2)
    diffs = [dice_at(curve("mask_difference", k), final) - dice_at(curve("random", k), final) for k in SEEDS]
    paired = [line for line in summary.splitlines() if line.startswith(f"| mask_difference − random | Dice @ {final} |")]
    assert len(paired) == 1 and paired[0].endswith(f"| {mean_pm_std(diffs)} | 2 | too few seeds (n=2 < 6) |")
    against = [line for line in summary.splitlines() if line.startswith(f"| random − mask_difference | Dice @ {final} |")]
    assert len(against) == 1 and against[0].endswith(f"| {mean_pm_std([-d for d in diffs])} | 2 | too few seeds "
                                                     "(n=2 < 6) |"), "the paired difference to mask_difference"
    zero = statistics.mean(float(r["dice"]) for r in read_csv(comparison / "zero_shot" / "val_metrics.csv"))
    assert table_row(summary, "Validation Dice at label", "zero-shot (untrained)")[2] == f"{zero:.4f}"


def test_the_click_table_is_recomputed_from_curves_csv(comparison):
    """Issue 29, formulas: the range every arm reaches is 0 to the smallest final cumulative clicks_90 C; the
    budgets 25/50/100 % of C; Dice @ N clicks = dice of the last epoch with clicks_90 <= N (missing: "–"); AUC = the
    area under dice against clicks_90 from (0, zero-shot Dice), linear, up to C, over C; clicks / image = final
    clicks_90 / labeled; the zero-shot row: its mean clicks per validation image (not reached = 20); the paired
    differences as on the image axis."""
    rows = read_csv(comparison / "curves.csv")
    summary = (comparison / "summary.md").read_text()
    zero = statistics.mean(float(r["dice"]) for r in read_csv(comparison / "zero_shot" / "val_metrics.csv"))

    def curve(strategy, seed):
        picked = [r for r in rows if r["strategy"] == strategy and int(r["seed"]) == seed]
        return [(int(r["clicks_90"]), float(r["dice"]), int(r["labeled"]))
                for r in sorted(picked, key=lambda r: int(r["epoch"]))]

    reach = min(curve(a, k)[-1][0] for a in STRATEGIES for k in SEEDS)
    budgets = sorted({max(1, round(f * reach)) for f in (0.25, 0.5, 1.0)})
    header = table_row(summary, "Validation Dice at click", "strategy")
    assert header[2:] == [f"Dice @ {b} clicks" for b in budgets] + [f"AUC (clicks, 0–{reach})", "clicks / image",
                                                                   "not reached"]

    def within(points, budget):
        inside = [d for clicks, d, _ in points if clicks <= budget]
        return inside[-1] if inside else None

    def auc(points):
        xs, ys = [0] + [c for c, _, _ in points], [zero] + [d for _, d, _ in points]
        return float(np.mean(np.interp(np.linspace(0, reach, 100001), xs, ys)))  # the mean height over [0, C]

    def cell(values, digits=4):
        present = [v for v in values if v is not None]
        if not present:
            return "–"
        text = f"{statistics.mean(present):.{digits}f} ± {statistics.stdev(present):.{digits}f}"
        return text + ("" if len(present) == len(values) else f" (n={len(present)})")

    for strategy in STRATEGIES:
        cells = table_row(summary, "Validation Dice at click", strategy)
        points = [curve(strategy, k) for k in SEEDS]
        assert cells[2:2 + len(budgets)] == [cell([within(p, b) for p in points]) for b in budgets]
        assert float(cells[-3].split(" ± ")[0]) == pytest.approx(statistics.mean(auc(p) for p in points), abs=1e-4)
        assert cells[-2] == cell([p[-1][0] / p[-1][2] for p in points], 2)
    costs = read_csv(comparison / "zero_shot" / "val_costs.csv")
    per_image = statistics.mean(20 if r["clicks_90"] == "not reached" else int(r["clicks_90"]) for r in costs)
    zero_row = table_row(summary, "Validation Dice at click", "zero-shot (untrained)")
    assert zero_row[-2:] == [f"{per_image:.2f}", f"{sum(r['clicks_90'] == 'not reached' for r in costs)} of {N_VAL}"]
    assert zero_row[2] == f"{zero:.4f}"
    diffs = [auc(curve("mask_difference", k)) - auc(curve("random", k)) for k in SEEDS]
    paired = [line for line in summary.splitlines() if line.startswith("| mask_difference − random | AUC (clicks) |")]
    assert len(paired) == 1 and float(paired[0].split("|")[3].split(" ± ")[0]) == \
        pytest.approx(statistics.mean(diffs), abs=1e-4)


def test_every_strategy_of_a_seed_draws_the_same_pools(comparison, data):
    """Epoch 1 scores the same pool for every strategy of a seed; later pools are drawn by the same
    (seed, epoch) generator from each run's own unlabeled set."""
    import datasets_skin

    names = datasets_skin.SemiSupervisedSkinDataset(*datasets_skin.find_split(data, "Training"), img_size=64).names
    for seed in SEEDS:
        for strategy in STRATEGIES:
            rows = read_csv(comparison / strategy / f"seed{seed}" / "Skin_64" / "al_selection.csv")
            labeled = set()
            for epoch in range(1, EPOCHS + 1):
                unlabeled = [i for i in range(len(names)) if i not in labeled]
                pool = {names[i] for i in active_learning_strategies.draw_pool(unlabeled, POOL, seed, epoch)}
                chosen = {r["image"] for r in rows if int(r["epoch"]) == epoch}
                assert len(chosen) == labeled_after(epoch) - len(labeled) and chosen <= pool, (strategy, seed, epoch)
                labeled |= {names.index(n) for n in chosen}


def test_two_strategies_that_label_the_same_images_train_the_same_model(data, tmp_path, metrics_rows):
    """pool == batch: every strategy labels the same images in epoch 1, so with training draws seeded per
    (seed, epoch) the trained models must be identical although the strategies ran different scoring."""
    import trainer

    results = []
    for strategy in ("mask_difference", "random"):
        out = tmp_path / strategy
        results.append(trainer.main(["--demo", "--gpu", "cpu", "--data_root", str(data), "--output", str(out),
                                     "--img_size", "64", "--batch_size", "2", "--pool_size", "2", "--max_epochs",
                                     "1", "--val_limit", "1", "--promptmode", "point", "--seed", "3",
                                     "--strategy", strategy]))
    assert sorted(results[0]["labeled"]) == sorted(results[1]["labeled"])
    epochs = [metrics_rows(r["run_dir"]) for r in results]
    for key in ("loss", "loss_dec2", "dice"):
        assert [e[key] for e in epochs[0]] == [e[key] for e in epochs[1]], key
    models = [torch.load(r["run_dir"] / "last_model.pth", weights_only=True) for r in results]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_a_killed_run_resumes_and_finished_runs_are_not_rerun(comparison, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    copy_runs(comparison, out)
    shutil.rmtree(out / "random" / "seed2")
    for name in REPORT:
        (out / name).unlink()
    others = {p: v for p, v in snapshot(out).items() if "demo_data" not in str(p)}

    monkeypatch.setenv("MDSAM_CRASH_AT", "epoch_end:1")
    assert cs.main(request(data, out)) == 1
    run_dir = out / "random" / "seed2" / "Skin_64"
    assert (run_dir / "last_state.pth").is_file() and not (run_dir / "last_model.pth").exists()
    assert {r["epoch"] for r in read_csv(run_dir / "al_selection.csv")} == {"1"}
    assert not any((out / name).exists() for name in REPORT), "a report was written although a run failed"
    assert "random/seed2: FAILED (exit 3)" in capsys.readouterr().out

    monkeypatch.delenv("MDSAM_CRASH_AT")
    assert cs.main(request(data, out)) == 0
    printed = capsys.readouterr().out
    assert "4 of 5 jobs already finished (skipped)" in printed and "random/seed2: resuming" in printed
    assert "resumed at epoch 2" in (run_dir / "config.txt").read_text()
    after = snapshot(out)
    assert {p: after[p] for p in others} == others, "a finished run was touched"
    want, got = read_csv(comparison / "curves.csv"), read_csv(out / "curves.csv")
    assert [list(r) for r in got] == [list(r) for r in want]
    for a, b in zip(got, want):
        assert a["strategy"] == b["strategy"]
        assert all(float(a[k]) == pytest.approx(float(b[k]), abs=1e-6) for k in a if k != "strategy"), (a, b)
    assert (out / "summary.md").read_text().replace(str(out), "OUT") == \
        (comparison / "summary.md").read_text().replace(str(comparison), "OUT")


def test_print_commands_lists_missing_runs_and_collect_reports_the_finished_ones(comparison, data, tmp_path,
                                                                                 capsys):
    out = tmp_path / "cmp"
    copy_runs(comparison, out, ignore=shutil.ignore_patterns(*REPORT))
    shutil.rmtree(out / "random" / "seed2")
    shutil.rmtree(out / "zero_shot")
    assert cs.main(request(data, out, "--print_commands")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "--zero_shot" in lines[0]
    assert "trainer.py" in lines[1] and "--strategy random --seed 2" in lines[1] and " && " in lines[1]
    assert "--score_run" in lines[1] and not (out / "random" / "seed2").exists(), "--print_commands ran something"

    assert cs.main(request(data, out, "--collect")) == 0
    assert len(read_csv(out / "curves.csv")) == (len(STRATEGIES) * len(SEEDS) - 1) * EPOCHS
    summary = (out / "summary.md").read_text()
    assert "Not in this report: random/seed2 (new), zero_shot (not evaluated)." in summary
    assert table_row(summary, "Validation Dice", "random")[1] == "1"


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "1", "1"], "--seeds lists 1 more than once"),
    (["--budgets", "50"], "--budgets 50: larger than the training set (8 images)"),
    (["--click_budgets", "10", "0"], "--click_budgets must be >= 1 (got 0)"),
    (["--budgets", "4"], "--budgets 4: more than the runs will label (3 = min("),
    (["--label_budget", "9"], "--label_budget 9 is larger than the training set (8 images"),
    (["--gpus", "7"], "--gpus 7: no device 7"),
    (["--seed", "3"], "--seed is set per run by compare_strategies.py; use --seeds"),
    (["--resu"], "--resu (--resume abbreviated) is set per run by compare_strategies.py; use nothing"),
])
def test_bad_input_is_one_clear_error_before_anything_runs(data, tmp_path, capsys, extra, message):
    out = tmp_path / "new"
    assert cs.main(request(data, out) + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("compare_strategies.py: error: ") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("arm, message", [
    ("margin", "--strategies margin: unknown strategy 'margin' in 'margin'; choose one of alps, coreset"),
    ("typiclust@0", "--strategies typiclust@0: expected a number of images >= 1 or 'all', got '0'"),
    ("alps+typiclust+random", "--strategies alps+typiclust+random: at most one first round (FIRST+STRATEGY)"),
])
def test_unknown_strategy_or_bad_arm_is_one_clear_error(data, tmp_path, capsys, arm, message):
    assert cs.main(request(data, tmp_path / "new") + ["--strategies", "entropy", arm]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compare_strategies.py: error: ") and message in err, err
    assert not (tmp_path / "new").exists()


def test_an_arm_sets_its_own_pool_and_first_round_and_the_summary_says_so(data, tmp_path, capsys):
    """Arms [FIRST[@POOL]+]STRATEGY[@POOL]: each run gets its arm's --strategy, --pool_size and --first_round (and
    nothing else differs); summary.md's table says what each arm ran."""
    arms = ["typiclust@all+mask_difference@3", "coreset@all", "random"]
    assert cs.main(request(data, tmp_path / "arms", "--print_commands") + ["--strategies", *arms]) == 0
    trainer_lines = [line for line in capsys.readouterr().out.splitlines() if "--zero_shot" not in line]
    assert len(trainer_lines) == len(arms) * len(SEEDS)
    first = next(line for line in trainer_lines if "typiclust@all+mask_difference@3/seed1" in line)
    assert "--strategy mask_difference --pool_size 3 --first_round typiclust@all --seed 1" in first
    assert "--strategy coreset --pool_size all --seed 2" in next(line for line in trainer_lines if "coreset@all/seed2" in line)
    plain = next(line for line in trainer_lines if "random/seed1" in line)
    assert "--strategy random --seed 1" in plain and "--first_round" not in plain and plain.count("--pool_size") == 1
    args, flags = cs.build_parser().parse_known_args(request(data, tmp_path / "arms") + ["--strategies", *arms])
    plan = cs.make_plan(args, flags)
    summary = report.summary_markdown(plan, report.Results({a: {} for a in arms}, {a: {} for a in arms}, None, []))
    assert "| typiclust@all+mask_difference@3 | typiclust over every unlabeled image | mask_difference over pools of " \
           "3 |" in summary
    assert "| coreset@all | coreset over every unlabeled image | coreset over every unlabeled image |" in summary
    assert f"| random | random over pools of {POOL} | random over pools of {POOL} |" in summary
    assert "## Paired difference to mask_difference" in summary and "## Paired difference to random" in summary


def test_click_budgets_as_asked_and_runs_without_clicks_said(data, tmp_path):
    """--click_budgets sets the click table's budgets; runs that recorded no clicks (--annotation_cost pixels) give
    no click table but a line saying why, and no click rows in the paired differences."""
    args, flags = cs.build_parser().parse_known_args(request(data, tmp_path / "c") + ["--click_budgets", "50", "5"])
    plan = cs.make_plan(args, flags)
    assert "--annotation_cost clicks" in " ".join(plan.runs[0].argv) and plan.trainer_args.annotation_cost == "clicks"

    def curve(clicks, dice):
        return [dict(labeled=2 * (e + 1), clicks_90=c, not_reached_90=0, dice=d) for e, (c, d) in
                enumerate(zip(clicks, dice))]

    res = report.Results({"mask_difference": {1: curve([4, 40], [0.3, 0.5])}, "random": {1: curve([6, 60], [0.2, 0.4])}},
                         {"mask_difference": {}, "random": {}}, None, [])
    summary = report.summary_markdown(plan, res)
    assert "Range every arm reaches: 0 to 40 clicks (the smallest final cumulative count)." in summary
    assert table_row(summary, "Validation Dice at click", "strategy")[2:5] == ["Dice @ 5 clicks", "Dice @ 50 clicks",
                                                                              "AUC (clicks, 0–40)"]
    default = report.summary_markdown(dataclasses.replace(plan, click_budgets=None), res)  # 25/50/100 % of 40
    assert table_row(default, "Validation Dice at click", "strategy")[2:5] == \
        ["Dice @ 10 clicks", "Dice @ 20 clicks", "Dice @ 40 clicks"]
    assert table_row(summary, "Validation Dice at click", "random")[2:4] == ["–", "0.2000"]
    assert table_row(summary, "Validation Dice at click", "mask_difference")[2:6] == ["0.3000", "0.5000", "–", "10.00"]
    assert "| mask_difference − random | Dice @ 50 clicks | 0.3000 | 1 |" in summary
    res = report.Results({"random": {1: curve([None, None], [0.2, 0.4])}}, {"random": {}}, None, [])
    summary = report.summary_markdown(plan, res)
    assert "No click costs in these runs (trainer.py --annotation_cost clicks records them" in summary
    assert "clicks |" not in summary.split("## Paired difference", 1)[1]


def test_nproc_per_run_starts_each_run_under_torchrun_on_its_share_of_the_gpus(data, tmp_path, capsys, monkeypatch):
    assert cs.main(request(data, tmp_path / "ddp", "--print_commands", "--nproc_per_run", "2")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "--zero_shot" not in line]
    assert len(lines) == len(STRATEGIES) * len(SEEDS)
    for line in lines:
        train = line.split(" && ")[0]
        assert "torch" in train.split(" --standalone")[0] and " --standalone --nproc_per_node 2 " in train, train
        assert "trainer.py" in train and "--gpu" not in train  # each process takes the GPU of its LOCAL_RANK
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert cs.job_devices("0,1,2,3", None, per_job=2) == ["0,1", "2,3"]
    assert cs.job_devices(None, None, per_job=2) == ["0,1"]
    with pytest.raises(cs.CompareError, match="--gpus 0,1,2: 3 device.* --nproc_per_run 2 .* multiple of 2"):
        cs.job_devices("0,1,2", None, per_job=2)
    assert cs.job_env("2,3", 2, 2)["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert cs.job_env(None, 2, 2)["OMP_NUM_THREADS"] == "2"  # 8 cores for 2 runs of 2 processes


def test_the_demo_shows_its_arms_in_fewer_epochs(tmp_path, capsys):
    assert cs.main(["--demo", "--output", str(tmp_path), "--print_commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for arm in cs.DEMO_STRATEGIES:
        assert sum(f"/{arm}/seed" in line for line in lines) == len(cs.DEMO_SEEDS), arm
    assert all(f"--max_epochs {cs.DEMO_EPOCHS}" in line for line in lines)
    assert "typiclust@all" in cs.DEMO_STRATEGIES and "mask_difference_diverse" in cs.DEMO_STRATEGIES


def test_output_holding_runs_of_other_settings_is_refused_untouched(comparison, data, capsys):
    before = snapshot(comparison)
    assert cs.main(request(data, comparison) + ["--max_epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds runs made with other settings" in err and "mask_difference/seed1/Skin_64: max_epochs was 2, now 3" in err
    assert snapshot(comparison) == before


def test_checkpoint_choice_and_curve_statistics(tmp_path):
    (tmp_path / "last_model.pth").write_bytes(b"")
    assert cs.pick_checkpoint(tmp_path).name == "last_model.pth"
    (tmp_path / "best_model_dice0.5000.pth").write_bytes(b"")
    assert cs.pick_checkpoint(tmp_path).name == "best_model_dice0.5000.pth"
    (tmp_path / "best_model_dice0.6000.pth").write_bytes(b"")  # --keep_best all keeps every improving one
    assert cs.pick_checkpoint(tmp_path, "all").name == "best_model_dice0.6000.pth"
    with pytest.raises(cs.CompareError, match="holds 2 best_model_dice"):
        cs.pick_checkpoint(tmp_path)  # two with keep_best newest: something else wrote one
    curve = [dict(labeled=2, dice=0.2), dict(labeled=4, dice=None), dict(labeled=6, dice=0.6)]
    assert report.dice_at(curve, 3) == 0.6 and report.dice_at(curve, 2) == 0.2 and report.dice_at(curve, 7) is None
    assert report.area_under_curve(curve) == pytest.approx((6 - 2) * (0.2 + 0.6) / 2 / (6 - 2))
    # the click axis: Dice within a budget is the last epoch at or under it; the area from (0, the zero-shot Dice)
    clicked = [dict(labeled=2, clicks_90=10, dice=0.2), dict(labeled=4, clicks_90=30, dice=None),
               dict(labeled=6, clicks_90=50, dice=0.6)]
    assert report.dice_within(clicked, 9) is None and report.dice_within(clicked, 10) == 0.2
    assert report.dice_within(clicked, 49) == 0.2 and report.dice_within(clicked, 50) == 0.6
    # 0..10: (0.1 + 0.2) / 2 x 10; 10..30: the line from (10, 0.2) to (50, 0.6) reaches 0.4 at 30
    assert report.area_under_cost_curve(clicked, 0.1, 30) == pytest.approx((1.5 + (0.2 + 0.4) / 2 * 20) / 30)
    assert report.area_under_cost_curve(clicked, 0.1, 50) == pytest.approx((1.5 + (0.2 + 0.6) / 2 * 40) / 50)
    assert report.area_under_cost_curve(clicked, None, 30) is None, "no zero-shot Dice: no start"
    assert report.area_under_cost_curve(clicked, 0.1, 60) is None, "the curve ends before the range"
    assert report.area_under_cost_curve([dict(clicks_90=None, dice=0.5)], 0.1, 30) is None, "no clicks recorded"
    assert report.paired_test([0.1] * 5).startswith("too few seeds")
    assert report.paired_test([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == "0.0312"  # 2 / 2^6: every difference positive


# ----------------------------------------------------------------------------- issue 18: one owner per run folder

HOLDER = ("import sys\nfrom pathlib import Path\nfrom folder_lock import FolderLock\n"
          "lock = FolderLock(Path(sys.argv[1])).acquire()\nprint('owner', flush=True)\nsys.stdin.read()\n")


def test_runs_another_process_owns_are_skipped_and_named_and_aborted_runs_are_set_aside_by_us(comparison, data,
                                                                                              tmp_path, capsys):
    """Another invocation (here a real process holding the folder's lock) owns random/seed2, which only needs its
    Test scoring: the run is skipped, named with that process's pid, nothing is run, the exit code is 1; so with
    --print_commands, --score_run and --set_aside. An aborted run's printed command sets it aside with --set_aside
    (it was a bare mv)."""
    out = tmp_path / "cmp"
    copy_runs(comparison, out, ignore=shutil.ignore_patterns(*REPORT))
    held = out / "random" / "seed2" / "Skin_64"
    (held / "test_metrics.csv").unlink()
    aborted = out / "mask_difference" / "seed2" / "Skin_64"
    finished = ("last_state.pth", "last_model.pth", "test_metrics.csv", "al_selection.csv", "metrics.csv")
    for name in finished[:3]:
        (aborted / name).unlink()
    for name in finished[3:]:  # killed in its first epoch: records of epoch 1 at most
        lines = (aborted / name).read_text().splitlines(keepends=True)
        (aborted / name).unlink()
        (aborted / name).write_text("".join(line for line in lines if line[:2] in ("ep", "1,")))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(held)], cwd=cs.REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "owner"
        assert cs.main(request(data, out, "--print_commands")) == 1
        printed, err = capsys.readouterr()
        assert f"random/seed2 (pid {holder.pid} on " in err and "another process owns their folder" in err
        lines = printed.splitlines()
        assert len(lines) == 1 and f"--score_run {held}" not in lines[0]
        assert lines[0].startswith(f"{sys.executable} {cs.REPO / 'compare_strategies.py'} --set_aside {aborted} && ")
        for worker in (["--score_run", str(held)], ["--set_aside", str(held)]):
            assert cs.main(worker) == 2
            assert f"{held} is in use by another process (pid {holder.pid} on " in capsys.readouterr().err
        assert cs.main(["--set_aside", str(aborted)]) == 0
        assert not aborted.exists() and (aborted.parent / "Skin_64.aborted1" / "config.txt").is_file()
        shutil.move(aborted.parent / "Skin_64.aborted1", aborted)  # finished again: the held run is all there is to do
        for name in finished:
            shutil.copy(comparison / "mask_difference" / "seed2" / "Skin_64" / name, aborted / name)
        assert cs.main(request(data, out)) == 1
        printed, err = capsys.readouterr()
        assert f"random/seed2: skipped: {held} is in use by another process (pid {holder.pid} on " in printed
        assert "1 run(s) skipped: another process owns their folder" in err and f"random/seed2 (pid {holder.pid}" \
            in err
        assert not (held / "test_metrics.csv").exists() and not any((out / name).exists() for name in REPORT)
    finally:
        holder.communicate("", timeout=60)


def test_the_zero_shot_clicks_count_not_reached_as_20_and_a_damaged_file_is_one_error(tmp_path):
    """val_costs.csv's clicks to IoU 0.90: the mean counts an image that did not reach it as MAX_CLICKS = 20 clicks;
    a row with too few cells, a missing column, no row or a count out of 0..20 is a CompareError naming the file."""
    path = tmp_path / "val_costs.csv"
    path.write_text("name,dice,changed_fraction,clicks_85,clicks_90\na,0.5,0.1,3,not reached\nb,0.5,0.1,2,4\n")
    assert report.zero_shot_clicks(path) == dict(mean=(20 + 4) / 2, not_reached=1.0, images=2.0)
    path.write_text("name,clicks_90\na,\n")
    assert report.zero_shot_clicks(path) is None  # clicks not simulated (--annotation_cost pixels)
    for text, said in (("name,dice,changed_fraction,clicks_85,clicks_90\na,0.5,0.1,3\n", "clicks_90 has no cell"),
                       ("name,dice\na,0.5\n", "it has no column 'clicks_90'"),
                       ("name,clicks_90\n", "it holds no image's row"),
                       ("name,clicks_90\na,21\n", "is neither 0..20 clicks")):
        path.write_text(text)
        with pytest.raises(report.CompareError) as refused:
            report.zero_shot_clicks(path)
        assert str(refused.value).startswith(f"{path} is damaged: ") and said in str(refused.value), text
