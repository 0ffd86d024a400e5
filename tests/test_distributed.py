"""Issue 25: one run on several processes (torchrun; gloo on the CPU, 64 px, seeded weights made decisive) makes the
decisions of the same run in one process, and rank 0 alone writes.

Three trainer runs are shared by the tests: one in this process, the same flags under torchrun on 2 processes (each
change a process makes under --output and --data_root recorded, per rank), and the same on 2 processes with rank 1
SIGKILLed mid-epoch 2, then continued in one process (a torchrun restart: as --resume). The flags: epoch 1 by
TypiClust over the whole pool, then mask_difference; --train_on labeled with batches of 4 (split 2 + 2); decoder 2
trained on point prompts (drawn per image). One torchrun launch of tests/distributed_checks.py on 3 processes checks
the pieces: the loss and gradient of a batch of 4 split 2 + 1 + 1 (and of 2 split 1 + 1 + 0) against one batch,
every strategy's selection, errors reaching every rank.

Tolerances (measured on this CPU, gloo, 1 thread per process): selections identical; scores within 1e-6
(printed with 6 decimals); validation metrics within 1e-6 (measured: equal); loss parts within 1e-5 relative
(measured 8e-7); gradients of a split batch within 1e-6 of the largest gradient (measured 3e-7 to 5e-7); weights:
see test_weights_match_within_tolerance.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import compare_strategies
import distributed
import epoch_steps
import settings
import trainer
from annotation_rounds import hide_masks
from run_folder import ResumeState, RunFolder, SettingsDiffer
from sam_lora_image_encoder_prompt import build_model
from synthetic_isic import make_synthetic_isic

TESTS = Path(__file__).resolve().parent
TRAINER = TESTS.parent / "trainer.py"
SIZE, BASE_LR = 64, 1e-3
VALIDATION = ("dice", "jaccard", "threshold_jaccard", "sensitivity", "specificity", "accuracy", "hd95")
LOSSES = ("loss", "loss_dec1", "loss_dec2", "ce_dec1", "ce_dec2", "dice_dec1", "dice_dec2")


def torchrun(nproc: int, script: Path, args, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def shown(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_isic(tmp_path_factory.mktemp("ddp_data"), 16, 5, 0, size=SIZE, seed=4)


@pytest.fixture(scope="module")
def flags(data, decisive_checkpoint):
    return ["--data_root", data, "--model_cfg", "sam2.1_hiera_t", "--checkpoint", decisive_checkpoint,
            "--img_size", SIZE, "--batch_size", 4, "--pool_size", 8, "--first_round", "typiclust@all",
            "--strategy", "mask_difference", "--max_epochs", 3, "--train_on", "labeled", "--promptmode", "point",
            "--save_from_epoch", 1, "--keep_best", "all", "--base_lr", BASE_LR, "--gpu", "cpu"]


@pytest.fixture(scope="module")
def one_process(flags, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_process")
    trainer.main([str(f) for f in flags] + ["--output", str(out)])
    return out / f"Skin_{SIZE}"


@pytest.fixture(scope="module")
def two_processes(flags, data, tmp_path_factory):
    """(run folder, {rank: [what it changed under --output and --data_root]}, torchrun's process)."""
    out, audit = tmp_path_factory.mktemp("two_processes"), tmp_path_factory.mktemp("audit")
    done = torchrun(2, TESTS / "audited_trainer.py", [audit, f"{out}{os.pathsep}{data}", *flags, "--output", out])
    assert done.returncode == 0, shown(done)
    changes = {rank: (audit / f"rank{rank}.txt").read_text().splitlines() if (audit / f"rank{rank}.txt").exists()
               else [] for rank in (0, 1)}
    return out / f"Skin_{SIZE}", changes, done


@pytest.fixture(scope="module")
def killed_then_restarted(flags, tmp_path_factory):
    """Rank 1 of 2 SIGKILLed after its first training step of epoch 2; then the same command in one process, as
    torchrun --max-restarts would start it again (TORCHELASTIC_RESTART_COUNT=1: continued as --resume)."""
    out = tmp_path_factory.mktemp("killed")
    killed = torchrun(2, TRAINER, [*flags, "--output", out], env={"MDSAM_CRASH_AT": "train_batch:2@1"})
    state_epoch = torch.load(out / f"Skin_{SIZE}" / "last_state.pth", weights_only=True)["epoch"]
    os.environ[distributed.RESTART_VARIABLE] = "1"
    try:
        trainer.main([str(f) for f in flags] + ["--output", str(out)])
    finally:
        del os.environ[distributed.RESTART_VARIABLE]
    return out / f"Skin_{SIZE}", killed, state_epoch


def selection(run_dir: Path, selection_rows):
    return [(r["epoch"], r["image"], r["rank_in_pool"], r["strategy"]) for r in selection_rows(run_dir)]


# ----------------------------------------------------------------------------- the same decisions

def test_two_processes_select_what_one_process_selects(one_process, two_processes, selection_rows):
    rows = selection(one_process, selection_rows)
    assert [r[0] for r in rows] == ["1"] * 4 + ["2"] * 4 + ["3"] * 4
    assert {r[3] for r in rows} == {"typiclust", "mask_difference"}
    assert selection(two_processes[0], selection_rows) == rows
    scores = [float(r["score"]) for r in selection_rows(one_process)]
    assert [float(r["score"]) for r in selection_rows(two_processes[0])] == pytest.approx(scores, abs=1e-6)
    picked = [float(r["score"]) for r in selection_rows(one_process) if r["epoch"] != "1"]
    assert max(picked) - min(picked) > 0.01, "the scores decide (they are not ties)"


def test_two_processes_record_the_annotation_costs_one_process_records(one_process, two_processes, selection_rows,
                                                                       metrics_rows):
    """Issue 29 (--annotation_cost pixels, the default): each process computes the costs of its share of the chosen
    images, gathered in their order; epoch 1's come from the same untrained model, so they equal one process's, later
    ones from weights within the training tolerance; so do the totals."""
    one, two = selection_rows(one_process), selection_rows(two_processes[0])
    assert [r["image"] for r in two] == [r["image"] for r in one]
    for a, b in zip(one, two):
        if a["epoch"] == "1":
            assert (b["dice"], b["changed_fraction"]) == (a["dice"], a["changed_fraction"])
        assert float(b["changed_fraction"]) == pytest.approx(float(a["changed_fraction"]), abs=1e-3)
    assert len({r["changed_fraction"] for r in one}) > 1, "every image cost the same: the order shows nothing"
    assert [r["changed_pixels"] for r in metrics_rows(two_processes[0])] == \
        pytest.approx([r["changed_pixels"] for r in metrics_rows(one_process)], rel=1e-3)


def test_a_persons_round_taken_back_by_two_processes_costs_what_it_costs_in_one(data, decisive_checkpoint, tmp_path,
                                                                                 selection_rows):
    """A person's round (--oracle folder) taken back at --resume: rank 0 accepts the masks from the round folder,
    which the data set's mask folder does not hold, and every process's share of the cost step is computed against
    them (no shared file system: rank 0 reads them), giving one process's cost cells."""
    unlabeled = Path(shutil.copytree(data, tmp_path / "data"))
    truths = hide_masks(unlabeled / "Training_GroundTruth", tmp_path / "truths")
    person = ["--data_root", unlabeled, "--model_cfg", "sam2.1_hiera_t", "--checkpoint", decisive_checkpoint,
              "--img_size", SIZE, "--batch_size", 3, "--pool_size", 6, "--strategy", "random", "--max_epochs", 1,
              "--save_from_epoch", 9, "--oracle", "folder", "--gpu", "cpu"]
    rows = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        for again in ([], ["--resume"]):  # hand the round over; then take it back, annotated, and train on it
            argv = [*person, "--output", out, *again]
            if nproc == 1:
                trainer.main([str(a) for a in argv])
            else:
                done = torchrun(nproc, TRAINER, argv)
                assert done.returncode == 0, shown(done)
            for image in (out / f"Skin_{SIZE}" / "annotate" / "round_001").glob("ISIC_???????.jpg"):
                shutil.copy(truths / f"{image.stem}_segmentation.png", image.parent)
        rows[nproc] = [(r["image"], r["dice"], r["changed_fraction"]) for r in selection_rows(out / f"Skin_{SIZE}")]
    assert len(rows[1]) == 3 and all(dice and changed for _, dice, changed in rows[1])
    assert rows[2] == rows[1]


def test_validation_and_losses_match_within_tolerance(one_process, two_processes, metrics_rows):
    one, two = metrics_rows(one_process), metrics_rows(two_processes[0])
    assert [r["epoch"] for r in two] == [1, 2, 3] and [r["labeled"] for r in two] == [4, 8, 12]
    for a, b in zip(one, two):
        assert {k: b[k] for k in VALIDATION} == pytest.approx({k: a[k] for k in VALIDATION}, abs=1e-6)
        assert {k: b[k] for k in LOSSES} == pytest.approx({k: a[k] for k in LOSSES}, rel=1e-5)
    assert len({r["dice"] for r in one}) > 1, "validation Dice changes with training"


def weights_of(run_dir: Path):
    """Every checkpoint the run kept: the best of each improving epoch (--keep_best all), the final model."""
    files = sorted(run_dir.glob("best_model_dice*.pth")) + [run_dir / "last_model.pth"]
    return {p.name: torch.load(p, weights_only=True) for p in files}


def test_weights_match_within_tolerance(one_process, two_processes, flags, report_figure):
    """What the split changes is float rounding, which AdamW's elementwise normalisation (g / sqrt(v)) turns into
    steps of up to about the learning rate where a gradient is rounding noise itself (e.g. the attention key biases,
    whose gradient is 0 in exact arithmetic). So: each element within lr (measured 6.4e-5 after 6 steps at lr 1e-3),
    and the difference within 3e-4 of what training changed, over the whole model (measured 2.9e-5 to 3.8e-5)."""
    one, two = weights_of(one_process), weights_of(two_processes[0])
    assert sorted(one) == sorted(two) and len(one) >= 2
    start = build_model("sam2.1_hiera_t", str(flags[flags.index("--checkpoint") + 1]), SIZE, seed=1337).state_dict()
    for name, a in one.items():
        b = two[name]
        assert list(a) == list(b) and not [k for k in b if k.startswith("module.")]
        largest = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        changed = math.sqrt(sum(float(((a[k].float() - start[k].float()) ** 2).sum()) for k in a))
        apart = math.sqrt(sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in a))
        report_figure(f"issue 25: {name} of 2 processes vs 1: largest element difference {largest:.2e}, "
                      f"||difference|| / ||change by training|| {apart / changed:.2e}")
        assert largest <= BASE_LR
        assert apart <= 3e-4 * changed and changed > 0


def test_a_model_made_on_two_processes_loads_in_a_notebook(two_processes):
    net = build_model("sam2.1_hiera_t", None, SIZE, seed=0)
    net.load_state_dict(torch.load(two_processes[0] / "last_model.pth", weights_only=True))  # strict: same keys


# ----------------------------------------------------------------------------- rank 0 owns the folder

def test_rank_0_alone_writes_under_output_and_data_root(two_processes, data):
    run_dir, changes, done = two_processes
    assert changes[1] == [], f"rank 1 changed: {changes[1][:5]}"
    written = {Path(line.split(" ", 1)[1]).name for line in changes[0]}
    for name in ("owner.lock", "config.txt", "al_selection.csv", "metrics.csv", "last_model.pth", "images.json",
                 "pretrained_embeddings.pt", "log.txt"):
        assert name in written or any(w.startswith(f".tmp-{Path(name).stem}") for w in written), name
    assert not [line for line in changes[0] if str(data) in line], "nothing is written under --data_root"
    assert done.stdout.count("epoch   3/3 |") == 1, "one log: rank 0's"
    assert "torchrun: 2 processes (gloo), each on the CPU (--gpu is ignored); this log is rank 0's" \
        in (run_dir / "log.txt").read_text()


def test_a_refusal_is_one_line_from_rank_0_and_every_rank_stops(two_processes, flags):
    run_dir = two_processes[0]
    done = torchrun(2, TRAINER, [*flags, "--output", run_dir.parent])  # the folder holds a run: refused
    assert done.returncode == 1, shown(done)  # torchrun's code when a process failed, whatever its own code
    errors = [line for line in done.stderr.splitlines() if line.startswith("trainer.py: error:")]
    assert len(errors) == 1 and "already holds a run" in errors[0], shown(done)
    assert "exitcode  : 2" in done.stderr  # the ranks' own code, as torchrun reports it


def test_per_epoch_prompt_draws_are_refused_on_several_processes(flags):
    parser = settings.build_parser()
    argv = [str(f) for f in flags] + ["--prompt_draw", "per_epoch"]
    args = settings.prepare_args(parser, parser.parse_args(argv), argv)
    settings.check_processes(args, 1)
    with pytest.raises(settings.UsageError, match="--prompt_draw per_epoch .* one process"):
        settings.check_processes(args, 2)


def test_prompt_points_are_drawn_per_image_whatever_shares_its_batch(decisive):
    """The random point an image is prompted with (decoder 2's ``_r`` prediction) is the same whether the image is
    trained alone (on its rank) or with others; the draws of one generator per epoch (per_epoch) are not. Nothing
    learned depends on it: the loss reads decoder 2's centre-point prediction, not the random point's."""
    net = decisive(build_model("sam2.1_hiera_t", None, SIZE, seed=0)).eval()
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))

    def random_point_logits(draw: str, batch: list) -> torch.Tensor:
        run = types.SimpleNamespace(args=types.SimpleNamespace(prompt_draw=draw, seed=5))
        generators = epoch_steps.prompt_generators(run, 2, batch, np.random.default_rng([5, 2, 1]))
        with torch.no_grad():
            return net(images[batch], False, SIZE, 0, "point", generators)["low_res_logits2_r"][-1]

    torch.testing.assert_close(random_point_logits("per_image", [2]), random_point_logits("per_image", [0, 1, 2]),
                               atol=1e-4, rtol=0)
    assert (random_point_logits("per_epoch", [2]) - random_point_logits("per_epoch", [0, 1, 2])).abs().max() > 0.1


def test_an_older_prompted_run_folder_resumes_with_the_draw_it_was_made_with(tmp_path):
    """Prompt points are drawn per image now (which rank holds an image changes nothing); a run folder made before
    records no prompt_draw: prompted, it resumes only with --prompt_draw per_epoch (how it drew: settings.LEGACY);
    unprompted, nothing was drawn: no resume key (nor a difference for the comparison runner)."""
    parser = settings.build_parser()
    now = vars(parser.parse_args(["--promptmode", "point"]))
    prompted, unprompted = (settings.resume_keys("mask_difference", prompted=p) for p in (True, False))
    assert "prompt_draw" in prompted and "prompt_draw" not in unprompted
    older = {k: now[k] for k in prompted if k != "prompt_draw"}
    folder = RunFolder(tmp_path / "Skin_512")
    folder.path.mkdir()
    folder.save_state(ResumeState(1, older, {}, {}, {}, ["a"], -1.0, ""))
    folder.write_config(older)
    folder.append_selection([[1, "a", "0.5", 1, "mask_difference", "", "", "", "", ""]])
    folder.write_metrics_row(dict(epoch=1, labeled=1))
    with pytest.raises(SettingsDiffer) as differ:
        folder.open_for_run(now, prompted, settings.LEGACY, True)
    assert differ.value.changes == [("prompt_draw", "'per_epoch'", "'per_image'")]
    folder.release()
    assert folder.open_for_run(dict(now, prompt_draw="per_epoch"), prompted, settings.LEGACY, True)[1].epoch == 1
    folder.release()
    unprompted_now = {"promptmode": "none", "prompt_draw": "per_image"}
    assert compare_strategies.differences(unprompted_now, {"promptmode": "none", "prompt_draw": "per_epoch"},
                                          set()) == []
    assert compare_strategies.differences(dict(unprompted_now, promptmode="point"),
                                          {"promptmode": "point", "prompt_draw": "per_epoch"}, set()) == \
        ["prompt_draw was per_epoch, now per_image"]


# ----------------------------------------------------------------------------- faults

def test_one_rank_killed_then_restarted_selects_what_the_uninterrupted_run_selected(
        one_process, killed_then_restarted, selection_rows):
    run_dir, killed, state_epoch = killed_then_restarted
    assert killed.returncode == 1, shown(killed)
    assert state_epoch == 1, "killed in epoch 2: the state is epoch 1's"
    assert "torchrun restarted the run's processes (restart 1): continuing as with --resume" \
        in (run_dir / "log.txt").read_text()
    assert selection(run_dir, selection_rows) == selection(one_process, selection_rows)


# ----------------------------------------------------------------------------- the pieces, on 3 processes

@pytest.fixture(scope="module")
def checks(tmp_path_factory, decisive_checkpoint):
    out = tmp_path_factory.mktemp("checks")
    done = torchrun(3, TESTS / "distributed_checks.py", [out, decisive_checkpoint])
    assert done.returncode == 0, shown(done)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(3)]


def test_shares_are_contiguous_the_first_ranks_taking_one_more():
    assert [list(r) for r in distributed.shares(4, 3)] == [[0, 1], [2], [3]]
    assert [list(r) for r in distributed.shares(2, 3)] == [[0], [1], []]
    assert [list(r) for r in distributed.shares(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    one = distributed.Ranks()
    assert one.share([5, 6, 7]) == [5, 6, 7] and one.gather(lambda: [1, 2]) == [1, 2] and not one.active


def test_a_batch_split_across_processes_has_the_loss_and_gradient_of_the_whole_batch(checks, report_figure):
    """2 + 1 + 1 against one batch of 4, and 1 + 1 + 0 (a rank with no image) against one batch of 2; with
    --promptmode none (parameters unused in the loss: DDP must not wait for them) and point."""
    steps = checks[0]["steps"]
    assert [(s["batch"], s["promptmode"]) for s in steps] == [(4, "none"), (4, "point"), (2, "none"), (2, "point")]
    for step in steps:
        assert step["loss"] == pytest.approx(step["whole_loss"], rel=1e-6), step
        assert step["grad_diff"] <= 1e-6 * step["grad_scale"], step
        assert step["lora_grads"] == 48, "every LoRA matrix has a gradient"
        assert step["no_grad"] == step["whole_no_grad"] and step["no_grad"], "unused parameters keep no gradient"
        assert step["weight_diff"] <= 2 * 1e-3
        report_figure(f"issue 25: batch of {step['batch']} split over 3 processes ({step['promptmode']}): loss "
                      f"{abs(step['loss'] - step['whole_loss']):.1e} apart, gradients {step['grad_diff']:.1e} "
                      f"(largest {step['grad_scale']:.1e}), weights after the step {step['weight_diff']:.1e}")
    for other in checks[1:]:
        assert [s["loss"] for s in other["steps"]] == [s["loss"] for s in steps], "every rank has the same loss"
    assert any("point_embeddings" in n for n in steps[0]["no_grad"])
    assert not any("point_embeddings" in n for n in steps[1]["no_grad"])


def test_every_strategy_selects_on_three_processes_what_one_process_selects(checks):
    found = checks[0]["selections"]
    assert len(found) == 9
    for name, result in found.items():
        assert result["chosen"] == result["whole_chosen"], name
        assert result["scores"] == pytest.approx(result["whole_scores"], abs=1e-6), name
        if result["figure_diff"] is not None:
            assert result["figure_diff"] <= 1e-6, name
        for other in checks[1:]:
            assert other["selections"][name]["chosen"] == result["chosen"], name
            assert not other["selections"][name]["figure"], "pictures are drawn by rank 0 only"


def test_an_error_one_rank_finds_reaches_every_rank(checks):
    for rank in checks:
        assert rank["errors"]["gather"] == ["DatasetError", "'b.jpg' is damaged", None]
        assert rank["errors"]["from_first"] == ["RunStopped", "epoch 2: bad_file ('c.jpg' is damaged)",
                                                "'c.jpg' is damaged"]
