"""--oracle folder: the real active-learning loop with a person who annotates (issue 11).

The test plays the annotator: the training masks of a synthetic dataset are moved to a hidden folder; after each
round the requested masks are copied back into Training_GroundTruth and the run is resumed. It must give exactly
the al_selection.csv, final Dice and final model of an uninterrupted --oracle ground_truth run with the same seed.
The bad-input cases resume one shared waiting round (copied per test) and check that nothing changed.
"""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import annotation_rounds
import trainer
import val
from sam_lora_image_encoder_prompt import build_model
from synthetic_isic import make_synthetic_isic

SIZE, ROUNDS = 64, 2
COMMON = ["--demo", "--gpu", "cpu", "--img_size", str(SIZE), "--max_epochs", str(ROUNDS), "--save_from_epoch", "1",
          "--val_limit", "1"]
LOOP = ["--batch_size", "1", "--pool_size", "2", "--val_every", str(ROUNDS)]  # one image a round; Dice at the end
WAITING = ["--batch_size", "2", "--pool_size", "2"]  # the shared waiting round: two images (one may be missing)


@pytest.fixture(scope="module")
def ground_truth_data(tmp_path_factory) -> Path:
    """8 training / 2 validation images with all their masks. Read-only."""
    return make_synthetic_isic(tmp_path_factory.mktemp("gt") / "data", n_train=8, n_val=2, size=96, seed=5)


def unlabeled_copy(ground_truth_data: Path, where: Path):
    """A copy of the dataset whose training masks are hidden in where/answers: (data root, answers folder)."""
    data = shutil.copytree(ground_truth_data, where / "data")
    return data, annotation_rounds.hide_masks(data / "Training_GroundTruth", where / "answers")


def folder_argv(data: Path, out: Path, *extra: str) -> list:
    return COMMON + ["--oracle", "folder", "--data_root", str(data), "--output", str(out), *extra]


@pytest.fixture(scope="module")
def waiting_round(ground_truth_data, tmp_path_factory):
    """A folder run stopped at round 1 (--promptmode none): (data, answers, out, result). Never modified:
    tests work on copies (``copy_waiting_round``)."""
    where = tmp_path_factory.mktemp("waiting")
    data, answers = unlabeled_copy(ground_truth_data, where)
    (data / "Training_GroundTruth").rmdir()  # photos only: the run creates the (empty) mask folder
    result = trainer.main(folder_argv(data, where / "out", *WAITING))
    return data, answers, where / "out", result


def link_or_copy(src: str, dst: str) -> None:
    """Checkpoints are hard-linked (the trainer only ever replaces them, atomically); the rest is copied (logs
    are appended to)."""
    (os.link if src.endswith(".pth") else shutil.copy2)(src, dst)


def copy_waiting_round(waiting_round, where: Path):
    """(data, answers, out): copies of the waiting round for one test to change."""
    data, answers, out, _ = waiting_round
    return (shutil.copytree(data, where / "data"), answers,
            shutil.copytree(out, where / "out", copy_function=link_or_copy))


def snapshot(*folders: Path) -> dict:
    """Every file under ``folders`` with its inode, size and mtime: any write, replacement or removal shows (the
    run folder's owner lock aside: a refused run owns the folder while it checks it)."""
    return {p: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "owner.lock"}


def resume_fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- the round a person receives

def test_a_round_holds_images_proposals_overlays_and_where_each_mask_goes(waiting_round):
    data, _, out, result = waiting_round
    run_dir = out / f"Skin_{SIZE}"
    folder = run_dir / "annotate" / "round_001"
    assert result["round_dir"] == folder and result["epochs"] == 0 and result["labeled"] == []
    assert (run_dir / trainer.AWAITING_FILE).is_file() and (run_dir / "last_state.pth").is_file()
    rows = annotation_rounds.read_round(folder)
    assert list(rows[0]) == ["image", "score", "rank_in_pool", "save_mask_as"]
    assert [int(r["rank_in_pool"]) for r in rows] == [1, 2]
    assert [Path(r["image"]).stem for r in rows] == result["requested"]
    for row in rows:
        name = Path(row["image"]).stem
        original = data / "Training_Data" / row["image"]
        assert (folder / row["image"]).read_bytes() == original.read_bytes()
        assert Path(row["save_mask_as"]) == (data / "Training_GroundTruth" / f"{name}_segmentation.png").resolve()
        assert not Path(row["save_mask_as"]).exists(), "the program wrote into the mask folder"
        with Image.open(original) as im:
            size = im.size
        proposal = np.asarray(Image.open(folder / f"{name}_proposal.png"))
        assert proposal.shape == size[::-1] and set(np.unique(proposal)) <= {0, 255}
        assert Image.open(folder / f"{name}_overlay.jpg").size == size
    assert list((data / "Training_GroundTruth").iterdir()) == []
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    # what the console (and log.txt) says: where each mask goes, and the one command that continues
    said = (run_dir / "log.txt").read_text()
    for row in rows:
        assert f"  {row['image']} -> {row['save_mask_as']}\n" in said
    command = said.split("then continue with:\n  ")[1].splitlines()[0]
    assert command.startswith("python3 ") and command.endswith(" --batch_size 2 --pool_size 2 --resume")
    assert f" --oracle folder --data_root {data} --output {out} " in command


def test_round_one_proposals_are_the_untrained_models_masks(waiting_round):
    """Epoch 1's proposal is decoder 1, unprompted, of the model as built (zero-shot SAM2 with a checkpoint),
    upsampled to the image's size as validation does."""
    import datasets_skin

    data, _, out, result = waiting_round
    model = build_model("sam2.1_hiera_t", None, SIZE, seed=1337).eval()
    train_set = datasets_skin.SemiSupervisedSkinDataset(
        *datasets_skin.find_split(data, "Training", masks_optional=True), SIZE, unlabeled_ok=True)
    covered = []
    for name in result["requested"]:
        sample = train_set[train_set.names.index(name)]
        with torch.no_grad():
            logits = model.predict_logits(sample["image"][None], 1)[0]
        want = val.logits_to_label_map(logits, sample["orig_size"]) > 0
        got = np.asarray(Image.open(out / f"Skin_{SIZE}/annotate/round_001/{name}_proposal.png")) > 0
        np.testing.assert_array_equal(got, want)
        covered.append(want.mean())
    assert any(0 < c < 1 for c in covered), "every proposal is empty or full: the comparison shows nothing"


def test_the_overlay_draws_the_proposal_outline_over_the_image():
    image = np.full((60, 80, 3), 100, np.uint8)
    proposal = np.zeros((60, 80), bool)
    proposal[20:40, 30:60] = True
    drawn = annotation_rounds.proposal_overlay(image, proposal)
    outline = (drawn != image).any(axis=2)
    assert outline[20, 45] and outline[39, 45] and outline[30, 30] and outline[19, 45]  # the edge, both sides
    assert not outline[30, 45] and not outline[5, 5]  # inside and outside stay the image
    assert (drawn[outline] == annotation_rounds.OUTLINE_RGB).all()


# ----------------------------------------------------------------------------- the same loop as the simulation

def play_annotator(data: Path, answers: Path, out: Path, extra):
    """Resume after each round with the requested masks copied from ``answers`` (round 1's first mask saved
    as 0/1, as some tools do) until the run ends: the results of every call, and each mask's bytes as written."""
    results, masks = [trainer.main(folder_argv(data, out, *extra))], {}
    while "round_dir" in results[-1]:
        names = results[-1]["requested"]
        for name in names:  # to where the round asks for it (the CSV may name another copy's folder)
            shutil.copy(answers / f"{name}_segmentation.png", data / "Training_GroundTruth")
        if len(results) == 1:
            first_mask = data / "Training_GroundTruth" / f"{names[0]}_segmentation.png"
            Image.fromarray((np.asarray(Image.open(first_mask)) > 127).astype(np.uint8)).save(first_mask)
        masks.update({n: (data / "Training_GroundTruth" / f"{n}_segmentation.png").read_bytes() for n in names})
        assert (out / f"Skin_{SIZE}" / trainer.AWAITING_FILE).is_file()
        results.append(trainer.main(folder_argv(data, out, *extra, "--resume")))
    return results, masks


@pytest.mark.parametrize("promptmode", ["none", "point"])
def test_annotator_in_the_loop_gives_exactly_the_simulation(promptmode, ground_truth_data, tmp_path, metrics_rows):
    extra = LOOP + ["--promptmode", promptmode]
    simulated = trainer.main(COMMON + extra + ["--data_root", str(ground_truth_data), "--output", str(tmp_path / "sim")])
    data, answers = unlabeled_copy(ground_truth_data, tmp_path)
    out = tmp_path / "out"
    results, masks = play_annotator(data, answers, out, extra)
    assert len(results) == ROUNDS + 1 and results[-1]["epochs"] == ROUNDS
    sim_dir, run_dir = simulated["run_dir"], results[-1]["run_dir"]
    assert (run_dir / "al_selection.csv").read_text() == (sim_dir / "al_selection.csv").read_text()
    dice = [[r["dice"] for r in metrics_rows(d) if r["dice"] is not None] for d in (sim_dir, run_dir)]
    assert dice[1] == dice[0] and len(dice[0]) == 1
    want, got = (torch.load(d / "last_model.pth", weights_only=True) for d in (sim_dir, run_dir))
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert not (run_dir / trainer.AWAITING_FILE).exists()
    # what the person wrote is untouched, and nothing else lands in the mask folder
    assert sorted(masks) == results[-1]["labeled"] and len(masks) == ROUNDS
    assert {p.name: p.read_bytes() for p in (data / "Training_GroundTruth").iterdir()} == \
           {f"{n}_segmentation.png": b for n, b in masks.items()}
    assert "a 0/1 mask, read as 0 = skin, 1 = lesion" in (run_dir / "log.txt").read_text()


# ----------------------------------------------------------------------------- bad input: clear message, nothing changed

def test_folder_oracle_with_every_image_annotated_has_nothing_to_select(ground_truth_data, tmp_path, capsys):
    err = resume_fails(folder_argv(ground_truth_data, tmp_path / "out"), capsys)
    assert "every image in" in err and "Training_Data already has a mask" in err and "nothing to select" in err
    assert not (tmp_path / "out").exists()


def mask_path(data: Path, name: str) -> Path:
    return data / "Training_GroundTruth" / f"{name}_segmentation.png"


def test_resume_before_any_mask_is_saved_lists_them_all(waiting_round, tmp_path, capsys):
    data, _, out = copy_waiting_round(waiting_round, tmp_path)
    before = snapshot(data, out)
    err = resume_fails(folder_argv(data, out, *WAITING, "--resume"), capsys)
    for name in waiting_round[3]["requested"]:
        assert f"{mask_path(data, name)}: missing" in err
    assert "round 1" in err and "nothing was changed" in err and "or pass --accept_partial" in err
    assert snapshot(data, out) == before


def test_wrong_size_and_non_binary_masks_are_named_and_a_deleted_one_is_requested_again(waiting_round, tmp_path,
                                                                                        capsys):
    data, answers, out = copy_waiting_round(waiting_round, tmp_path)
    first, second = waiting_round[3]["requested"]
    Image.new("L", (20, 10)).save(mask_path(data, first))
    grey = np.asarray(Image.open(answers / f"{second}_segmentation.png")).copy()
    grey[:3] = 128
    Image.fromarray(grey).save(mask_path(data, second))
    before = snapshot(data, out)
    err = resume_fails(folder_argv(data, out, *WAITING, "--resume"), capsys)
    assert f"{mask_path(data, first)}: 20x10 pixels, but its image {first}.jpg is 96x" in err
    assert f"{mask_path(data, second)}: not binary (grey levels 0, 128" in err
    assert "or pass --accept_partial" not in err, "no mask is missing: the hint does not apply"
    assert snapshot(data, out) == before
    mask_path(data, first).unlink()  # the person deletes a bad mask: it is asked for again
    err = resume_fails(folder_argv(data, out, *WAITING, "--resume"), capsys)
    assert f"{mask_path(data, first)}: missing (the mask of {first}.jpg)" in err


def test_an_image_removed_between_rounds_is_named(waiting_round, tmp_path, capsys):
    data, answers, out = copy_waiting_round(waiting_round, tmp_path)
    for name in waiting_round[3]["requested"]:
        shutil.copy(answers / f"{name}_segmentation.png", mask_path(data, name))
    gone = data / "Training_Data" / f"{waiting_round[3]['requested'][1]}.jpg"
    gone.unlink()
    before = snapshot(data, out)
    err = resume_fails(folder_argv(data, out, *WAITING, "--resume"), capsys)
    assert f"{gone}: the image of this round is gone" in err
    assert snapshot(data, out) == before


@pytest.mark.filterwarnings("ignore:.*have no mask")  # the simulation's discovery leaves the unlabeled images out
@pytest.mark.parametrize("how", ["plain rerun", "ground_truth oracle"])
def test_a_waiting_round_is_a_live_run(how, waiting_round, tmp_path, capsys):
    data, answers, out = copy_waiting_round(waiting_round, tmp_path)
    for name in waiting_round[3]["requested"]:
        shutil.copy(answers / f"{name}_segmentation.png", mask_path(data, name))
    before = snapshot(data, out)
    if how == "plain rerun":
        err = resume_fails(folder_argv(data, out, *WAITING), capsys)
        assert f"already holds a run ({out / f'Skin_{SIZE}' / trainer.AWAITING_FILE})" in err and "--resume" in err
    else:
        argv = [a for a in folder_argv(data, out, *WAITING, "--resume") if a not in ("--oracle", "folder")]
        err = resume_fails(argv, capsys)
        assert "round 1" in err and "waits for masks" in err and "--oracle folder" in err
    assert snapshot(data, out) == before


def test_accept_partial_sends_missing_images_back_and_no_validation_split_keeps_last_model(waiting_round, tmp_path,
                                                                                           capsys):
    data, answers, out = copy_waiting_round(waiting_round, tmp_path)
    done, missing = waiting_round[3]["requested"]
    shutil.copy(answers / f"{done}_segmentation.png", mask_path(data, done))
    shutil.rmtree(data / "Validation_Data"), shutil.rmtree(data / "Validation_GroundTruth")
    argv = folder_argv(data, out, *WAITING, "--resume", "--accept_partial", "--max_epochs", "1")
    assert "Validation: 2 removed" in resume_fails(argv, capsys), "the run was made with a Validation split"
    (out / f"Skin_{SIZE}" / "images.json").unlink()  # as a run folder of a trainer before images.json: it resumes
    result = trainer.main(argv)
    run_dir = result["run_dir"]
    assert result["epochs"] == 1 and result["labeled"] == [done] and result["best_path"] is None
    assert [line.split(",")[1] for line in (run_dir / "al_selection.csv").read_text().splitlines()[1:]] == [done]
    log_text = (run_dir / "log.txt").read_text()
    assert f"go back to the unlabeled pool: {missing}" in log_text
    assert log_text.count("no Validation split under") == 1 and "best Dice n/a (no Validation split)" in log_text
    state = torch.load(run_dir / "last_state.pth", weights_only=True)
    assert state["epoch"] == 1 and state["labeled_names"] == [done]
    assert (run_dir / "last_model.pth").is_file() and not list(run_dir.glob("best_model_dice*.pth"))
    assert not (run_dir / trainer.AWAITING_FILE).exists()
    assert not mask_path(data, missing).exists()


def test_next_round_command_leaves_accept_partial_out_and_masks_saved_early_are_said(waiting_round, tmp_path):
    """Issue 18: --accept_partial answers the round it accepts; the command printed for the next round used to repeat
    it. A mask saved ahead for an image no round asked for used to be waited for without a word."""
    data, answers, out = copy_waiting_round(waiting_round, tmp_path)
    requested = waiting_round[3]["requested"]
    shutil.copy(answers / f"{requested[0]}_segmentation.png", mask_path(data, requested[0]))
    early = next(p.name for p in sorted(answers.iterdir()) if p.name[:-len("_segmentation.png")] not in requested)
    shutil.copy(answers / early, data / "Training_GroundTruth" / early)
    result = trainer.main(folder_argv(data, out, *WAITING, "--resume", "--accept_partial"))
    assert result["round_dir"].name == "round_002" and result["labeled"] == requested[:1]
    said = (result["run_dir"] / "log.txt").read_text()
    assert (f"1 masks are saved for images no round has selected yet; they are not used until a round selects their "
            f"image: {early}\n") in said
    command = said.split("then continue with:\n  ")[-1].splitlines()[0]
    assert "--accept_partial" not in command and command.endswith(" --batch_size 2 --pool_size 2 --resume")


def test_discovery_keeps_images_without_masks_for_annotation_and_0_1_masks_decode_as_lesion(tmp_path):
    import datasets_skin

    data = make_synthetic_isic(tmp_path / "data", n_train=3, n_val=0, size=64, seed=1)
    images, masks = datasets_skin.find_split(data, "Training")
    mask_path(data, "ISIC_0000001").unlink()
    kept = datasets_skin.discover_samples(images, masks, unlabeled_ok=True)
    assert [s.name for s in kept] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert kept[1].mask_path == mask_path(data, "ISIC_0000001") and kept[1].orig_size[1] == 64
    with pytest.warns(UserWarning, match="1 of 3 images"):
        assert len(datasets_skin.discover_samples(images, masks)) == 2  # the simulation leaves it out
    full = datasets_skin.decode_mask(mask_path(data, "ISIC_0000000"), None)
    assert 0 < full.mean() < 1
    Image.fromarray(full).save(tmp_path / "zero_one.png")  # 0/1 levels, as some tools save masks
    np.testing.assert_array_equal(datasets_skin.decode_mask(tmp_path / "zero_one.png", None), full)
    np.testing.assert_array_equal(datasets_skin.decode_mask(tmp_path / "zero_one.png", 32),
                                  datasets_skin.decode_mask(mask_path(data, "ISIC_0000000"), 32))
