"""--oracle folder: the real active-learning loop with a person who annotates (issue 11).

The test plays the annotator: the training masks of a synthetic dataset are moved to a hidden folder; after each
round the requested masks are copied back into Training_GroundTruth and the run is resumed. It must give exactly
the al_selection.csv, final Dice and final model of an uninterrupted --oracle ground_truth run with the same seed.
The bad-input cases resume one shared waiting round (copied per test) and check that nothing changed.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import annotation_rounds
import label_studio
import trainer
import val
from datasets_skin import SampleFiles
from label_studio_helpers import annotation, brush_region, export_of
from run_copies import copy_runs
from run_folder import AWAITING
from sam_lora_image_encoder_prompt import build_model
from synthetic_isic import make_synthetic_isic

SIZE, ROUNDS = 64, 2
# No best checkpoint (--save_from_epoch past the end) unless a test asks for one: each is 136 MiB.
COMMON = ["--demo", "--gpu", "cpu", "--img_size", str(SIZE), "--max_epochs", str(ROUNDS), "--save_from_epoch",
          str(ROUNDS + 1), "--val_limit", "1"]
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


def copy_waiting_round(waiting_round, where: Path):
    """(data, answers, out): copies of the waiting round for one test to change."""
    data, answers, out, _ = waiting_round
    return shutil.copytree(data, where / "data"), answers, copy_runs(out, where / "out")


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
    assert (run_dir / AWAITING).is_file() and (run_dir / "last_state.pth").is_file()
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

def play_annotator(data: Path, answers: Path, out: Path, extra, in_round_folder: bool):
    """Resume after each round with the requested masks copied from ``answers`` (round 1's first mask saved
    as 0/1, as some tools do) until the run ends, saved in the round folder (``in_round_folder``, where
    label_studio.py import writes) or in the mask folder: the results of every call, and each mask's path and
    bytes as written."""
    results, masks = [trainer.main(folder_argv(data, out, *extra))], {}
    while "round_dir" in results[-1]:
        names = results[-1]["requested"]
        folder = results[-1]["round_dir"] if in_round_folder else data / "Training_GroundTruth"
        for name in names:  # to where the round asks for it (the CSV may name another copy's folder)
            shutil.copy(answers / f"{name}_segmentation.png", folder)
        if len(results) == 1:
            first_mask = folder / f"{names[0]}_segmentation.png"
            Image.fromarray((np.asarray(Image.open(first_mask)) > 127).astype(np.uint8)).save(first_mask)
        masks.update({folder / f"{n}_segmentation.png": (folder / f"{n}_segmentation.png").read_bytes()
                      for n in names})
        assert (out / f"Skin_{SIZE}" / AWAITING).is_file()
        results.append(trainer.main(folder_argv(data, out, *extra, "--resume")))
    return results, masks


@pytest.mark.parametrize("promptmode,in_round_folder", [("none", True), ("point", False)])
def test_annotator_in_the_loop_gives_exactly_the_simulation(promptmode, in_round_folder, ground_truth_data, tmp_path,
                                                            metrics_rows):
    """Round 2 trains on round 1's image again (--train_on labeled): its mask is read from where it was accepted
    (the round folder, or the mask folder) by a process that did not accept it."""
    extra = LOOP + ["--promptmode", promptmode]
    simulated = trainer.main(COMMON + extra + ["--data_root", str(ground_truth_data), "--output", str(tmp_path / "sim")])
    data, answers = unlabeled_copy(ground_truth_data, tmp_path)
    out = tmp_path / "out"
    results, masks = play_annotator(data, answers, out, extra, in_round_folder)
    assert len(results) == ROUNDS + 1 and results[-1]["epochs"] == ROUNDS
    sim_dir, run_dir = simulated["run_dir"], results[-1]["run_dir"]
    assert (run_dir / "al_selection.csv").read_text() == (sim_dir / "al_selection.csv").read_text()
    dice = [[r["dice"] for r in metrics_rows(d) if r["dice"] is not None] for d in (sim_dir, run_dir)]
    assert dice[1] == dice[0] and len(dice[0]) == 1
    want, got = (torch.load(d / "last_model.pth", weights_only=True) for d in (sim_dir, run_dir))
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert not (run_dir / AWAITING).exists()
    # what the person wrote is untouched, and nothing else lands in the mask folder
    assert sorted(p.name.replace("_segmentation.png", "") for p in masks) == results[-1]["labeled"]
    assert len(masks) == ROUNDS and {p: p.read_bytes() for p in masks} == masks
    assert {p.name for p in (data / "Training_GroundTruth").iterdir()} == \
           (set() if in_round_folder else {p.name for p in masks})
    state = torch.load(run_dir / "last_state.pth", weights_only=True)
    assert state["mask_sources"] == ({p.name.replace("_segmentation.png", ""): str(p.parent.relative_to(run_dir))
                                      for p in masks} if in_round_folder else {})
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
        assert f"already holds a run ({out / f'Skin_{SIZE}' / AWAITING})" in err and "--resume" in err
    else:
        argv = [a for a in folder_argv(data, out, *WAITING, "--resume") if a not in ("--oracle", "folder")]
        err = resume_fails(argv, capsys)
        assert "round 1" in err and "waits for masks" in err and "--oracle folder" in err
    assert snapshot(data, out) == before


def test_accept_partial_sends_skipped_images_back_and_no_validation_split_keeps_last_model(waiting_round, tmp_path,
                                                                                          capsys):
    """The round comes back from Label Studio: one image annotated, one skipped; --accept_partial trains on the
    annotated one (its mask in the round folder) and sends the skipped one back to the pool."""
    pytest.importorskip("label_studio_sdk.converter.brush")
    data, answers, out = copy_waiting_round(waiting_round, tmp_path)
    done, missing = waiting_round[3]["requested"]
    round_dir = out / f"Skin_{SIZE}" / "annotate" / "round_001"
    truth = np.asarray(Image.open(answers / f"{done}_segmentation.png")) > 127
    export = tmp_path / "export.json"
    export.write_text(json.dumps(export_of(round_dir, {
        f"{done}.jpg": [annotation([brush_region(truth)], 41, completed_by=7, lead_time=12.5)],
        f"{missing}.jpg": [annotation([], 42, cancelled=True)]})))
    assert label_studio.main(["import", "--export", str(export), "--round_dir", str(round_dir)]) == 0
    assert f"{missing}.jpg (skipped)" in capsys.readouterr().out
    shutil.rmtree(data / "Validation_Data"), shutil.rmtree(data / "Validation_GroundTruth")
    argv = folder_argv(data, out, *WAITING, "--resume", "--accept_partial", "--max_epochs", "1", "--save_from_epoch", "1")
    assert "Validation: 2 removed" in resume_fails(argv, capsys), "the run was made with a Validation split"
    (out / f"Skin_{SIZE}" / "images.json").unlink()  # as a run folder of a trainer before images.json: it resumes
    result = trainer.main(argv)
    run_dir = result["run_dir"]
    assert result["epochs"] == 1 and result["labeled"] == [done] and result["best_path"] is None
    rows = {row["image"]: row for row in annotation_rounds.read_round(round_dir)}
    assert (rows[f"{done}.jpg"]["completed_by"], rows[f"{done}.jpg"]["lead_time_s"]) == ("7", "12.500")
    assert rows[f"{missing}.jpg"]["status"] == "skipped"
    assert [line.split(",")[1] for line in (run_dir / "al_selection.csv").read_text().splitlines()[1:]] == [done]
    log_text = (run_dir / "log.txt").read_text()
    assert f"go back to the unlabeled pool: {missing}" in log_text
    assert log_text.count("no Validation split under") == 1 and "best Dice n/a (no Validation split)" in log_text
    assert "round 1: 1 masks accepted, 1 from the round folder, 0 from" in log_text
    state = torch.load(run_dir / "last_state.pth", weights_only=True)
    assert state["epoch"] == 1 and state["labeled_names"] == [done]
    assert state["mask_sources"] == {done: "annotate/round_001"}
    assert (run_dir / "last_model.pth").is_file() and not list(run_dir.glob("best_model_dice*.pth"))
    assert not (run_dir / AWAITING).exists()
    assert not list((data / "Training_GroundTruth").iterdir())


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


# ----------------------------------------------------------------------------- Label Studio; where masks are read from

def test_a_round_also_goes_out_as_label_studio_tasks_of_the_run(waiting_round):
    pytest.importorskip("label_studio_sdk.converter.brush")
    data, _, out, result = waiting_round
    folder = result["round_dir"]
    run_id = (out / f"Skin_{SIZE}" / "annotate" / "label_studio_run.txt").read_text().strip()
    assert run_id.startswith(f"Skin_{SIZE}-") and len(run_id) > len(f"Skin_{SIZE}-") + 8
    tasks = json.loads((folder / "label_studio_tasks.json").read_text())
    assert [t["data"]["mdsam_image"] for t in tasks] == [f"{n}.jpg" for n in result["requested"]]
    for task in tasks:  # served from the round folder, relative to the document root (by default --output)
        assert task["data"]["mdsam_run"] == run_id and task["data"]["mdsam_round"] == 1
        assert task["data"]["image"] == f"/data/local-files/?d=Skin_{SIZE}/annotate/round_001/" \
                                        f"{task['data']['mdsam_image']}"
    assert (folder / "label_studio_interface.xml").read_text() == label_studio.labelling_interface(1)
    said = (out / f"Skin_{SIZE}" / "log.txt").read_text()
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={os.path.abspath(out)})" in said
    assert f"label_studio.py import --export EXPORT.json --round_dir {folder}`" in said


@pytest.mark.parametrize("case", ["no sdk", "root elsewhere"])
def test_a_round_label_studio_cannot_take_is_the_png_round_and_says_why(case, ground_truth_data, tmp_path,
                                                                        monkeypatch):
    data, _ = unlabeled_copy(ground_truth_data, tmp_path)
    extra = list(WAITING)
    if case == "no sdk":
        for module in ("label_studio_sdk", "label_studio_sdk.converter", "label_studio_sdk.converter.brush"):
            monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    else:
        monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path / "elsewhere"))
    result = trainer.main(folder_argv(data, tmp_path / "out", *extra))
    assert (result["round_dir"] / "to_annotate.csv").is_file() and len(result["requested"]) == 2
    assert not list(result["round_dir"].glob("label_studio_*"))
    said = (result["run_dir"] / "log.txt").read_text()
    assert said.count("no Label Studio files for this round: ") == 1
    assert {"no sdk": "label-studio-sdk is not installed (to enable them: pip install -r requirements-labelstudio.txt)",
            "root elsewhere": f"is not inside the Label Studio document root {tmp_path / 'elsewhere'}"}[case] in said


def import_from_label_studio(round_dir: Path, masks: dict, capsys) -> None:
    """What a person does with Label Studio: the round's export (image file name -> its mask, H x W bool, or None:
    skipped) turned into masks in the round folder by the import command."""
    export = round_dir.parent / f"export_{round_dir.name}.json"
    export.write_text(json.dumps(export_of(round_dir, {
        name: [annotation([] if mask is None else [brush_region(mask)], 50 + number, completed_by=3,
                          lead_time=10.0 + number, cancelled=mask is None)]
        for number, (name, mask) in enumerate(masks.items())})))
    assert label_studio.main(["import", "--export", str(export), "--round_dir", str(round_dir)]) == 0
    capsys.readouterr()


def answer(answers: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(answers / f"{name}_segmentation.png")) > 127


@pytest.fixture(scope="module")
def round_two_waiting(waiting_round, tmp_path_factory):
    """Round 1 back (its first image from Label Studio into the round folder, its second saved in the mask folder)
    and trained on; the run stopped at round 2: (data, answers, out, result). Never modified."""
    pytest.importorskip("label_studio_sdk.converter.brush")
    data, answers, out = copy_waiting_round(waiting_round, tmp_path_factory.mktemp("round2"))
    first, second = waiting_round[3]["requested"]
    round_dir = out / f"Skin_{SIZE}" / "annotate" / "round_001"
    export = round_dir.parent / "export.json"
    export.write_text(json.dumps(export_of(round_dir, {f"{first}.jpg": [
        annotation([brush_region(answer(answers, first))], 61, completed_by=3, lead_time=9.5)]})))
    label_studio.main(["import", "--export", str(export), "--round_dir", str(round_dir)])
    shutil.copy(answers / f"{second}_segmentation.png", mask_path(data, second))
    result = trainer.main(folder_argv(data, out, *WAITING, "--resume", "--max_epochs", "3", "--save_from_epoch", "9"))
    assert result["round_dir"].name == "round_002", result
    return data, answers, out, result


def test_each_mask_is_taken_from_where_it_was_saved_and_that_place_recorded(waiting_round, round_two_waiting):
    data, _, out, result = round_two_waiting
    first, second = waiting_round[3]["requested"]
    run_dir = out / f"Skin_{SIZE}"
    state = torch.load(run_dir / "last_state.pth", weights_only=True)
    assert state["epoch"] == 1 and state["labeled_names"] == sorted([first, second])
    assert state["mask_sources"] == {first: "annotate/round_001"}  # the second: the mask folder (no entry)
    assert "round 1: 2 masks accepted, 1 from the round folder, 1 from " in (run_dir / "log.txt").read_text()
    assert [p.name for p in (data / "Training_GroundTruth").iterdir()] == [f"{second}_segmentation.png"]
    rows = {r["image"]: r for r in annotation_rounds.read_round(run_dir / "annotate" / "round_001")}
    assert [rows[f"{first}.jpg"][c] for c in ("status", "completed_by", "lead_time_s")] == ["annotated", "3", "9.500"]
    assert rows[f"{second}.jpg"]["status"] == "not_annotated"  # not in Label Studio's export: saved by hand
    # round 2 adds its tasks to the run's project: the same run id
    run_id = (run_dir / "annotate" / "label_studio_run.txt").read_text().strip()
    tasks = json.loads((result["round_dir"] / "label_studio_tasks.json").read_text())
    assert {(t["data"]["mdsam_run"], t["data"]["mdsam_round"]) for t in tasks} == {(run_id, 2)}


def test_a_changed_mask_of_an_earlier_round_is_refused_at_resume_naming_the_file(waiting_round, round_two_waiting,
                                                                                 tmp_path, capsys):
    """Issue 18, 3: masks accepted in round 1 are checked again (size, binary) where they were accepted."""
    data, answers, out = copy_waiting_round(round_two_waiting, tmp_path)
    first, second = waiting_round[3]["requested"]
    for name in round_two_waiting[3]["requested"]:
        shutil.copy(answers / f"{name}_segmentation.png", mask_path(data, name))
    in_round = out / f"Skin_{SIZE}" / "annotate" / "round_001" / f"{first}_segmentation.png"
    in_round.unlink()
    Image.new("L", (40, 30)).save(in_round)
    grey = np.asarray(Image.open(mask_path(data, second))).copy()
    grey[grey > 127], grey[:4] = 128, 37
    mask_path(data, second).unlink()
    Image.fromarray(grey).save(mask_path(data, second))
    before = snapshot(data, out)
    for waits in (True, False):  # a round waits, or none does (the run stopped after an epoch)
        err = resume_fails(folder_argv(data, out, *WAITING, "--resume", "--max_epochs", "3"), capsys)
        assert f"{in_round}: 40x30 pixels, but its image {first}.jpg is 96x" in err
        assert f"{mask_path(data, second)}: not binary (grey levels 0, 37, 128;" in err
        assert err.count("a mask accepted in an earlier round, read again for training") == 2
        assert snapshot(data, out) == before
        if waits:
            (out / f"Skin_{SIZE}" / AWAITING).rename(tmp_path / "awaiting.json")
            before = snapshot(data, out)


def test_a_mask_in_the_round_folder_and_in_the_mask_folder_is_an_error_naming_both(round_two_waiting, tmp_path,
                                                                                  capsys):
    data, answers, out = copy_waiting_round(round_two_waiting, tmp_path)
    first, second = round_two_waiting[3]["requested"]
    round_dir = out / f"Skin_{SIZE}" / "annotate" / "round_002"
    for name in (first, second):
        shutil.copy(answers / f"{name}_segmentation.png", mask_path(data, name))
    shutil.copy(answers / f"{second}_segmentation.png", round_dir)
    before = snapshot(data, out)
    err = resume_fails(folder_argv(data, out, *WAITING, "--resume", "--max_epochs", "3"), capsys)
    assert f"{round_dir / f'{second}_segmentation.png'} and {mask_path(data, second)}: two masks of {second}.jpg" in err
    assert str(mask_path(data, first)) not in err and snapshot(data, out) == before


def test_a_run_folder_without_the_record_reads_earlier_masks_from_the_mask_folder(waiting_round, round_two_waiting,
                                                                                  tmp_path, capsys):
    """A last_state.pth written before mask_sources existed: every earlier mask is the mask folder's."""
    data, answers, out = copy_waiting_round(round_two_waiting, tmp_path)
    first = waiting_round[3]["requested"][0]  # accepted from round 1's folder
    for name in round_two_waiting[3]["requested"]:
        shutil.copy(answers / f"{name}_segmentation.png", mask_path(data, name))
    state_path = out / f"Skin_{SIZE}" / "last_state.pth"
    state = torch.load(state_path, weights_only=True)
    del state["mask_sources"]
    state_path.unlink()  # a hard link to the fixture's file: write a new one
    torch.save(state, state_path)
    err = resume_fails(folder_argv(data, out, *WAITING, "--resume", "--max_epochs", "3"), capsys)
    assert f"{mask_path(data, first)}: the mask of an image labeled in an earlier round is gone" in err


@pytest.mark.parametrize("mode,pixels,problem", [
    ("RGB", (255, 0, 0), None),  # red on black: lesion where the largest channel is above 127
    ("P", (128, 0, 0), None),  # a palette mask: lesion where the colour is not black
    ("RGB", (90, 20, 20), "not binary (RGB levels (largest channel) 0, 90;"),
    ("CMYK", (0, 0, 0, 255), "unreadable (Mask"),
])
def test_a_returned_mask_is_read_by_its_mode(mode, pixels, problem, tmp_path):
    sample = SampleFiles("x", tmp_path / "x.jpg", tmp_path / "x_segmentation.png", (8, 12))  # (H, W)
    image = Image.new("RGB", (12, 8))
    image.paste(pixels[:3], (2, 2, 6, 6))
    mask = image if mode == "RGB" else image.quantize(4) if mode == "P" else Image.new(mode, (12, 8), pixels)
    mask.save(tmp_path / "m.png" if mode != "CMYK" else tmp_path / "m.jpg")
    path = tmp_path / ("m.jpg" if mode == "CMYK" else "m.png")
    found, _ = annotation_rounds.mask_problem(sample, path)
    assert (found is None) if problem is None else (problem in found and found.startswith(str(path)))


@pytest.mark.parametrize("orientation", [6, None])
def test_a_mask_drawn_on_the_turned_image_says_exif(orientation, tmp_path):
    """Issue 26: a mask in the orientation a viewer shows (the image turned by its EXIF tag) was refused with a size
    message that did not say why the sizes were swapped. Without the tag, the turned size is still pointed out."""
    image = tmp_path / "x.jpg"
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.new("RGB", (12, 8), (200, 150, 120)).save(image, exif=exif)
    sample = SampleFiles("x", image, tmp_path / "x_segmentation.png", (8, 12))  # (H, W)
    Image.new("L", (8, 12)).save(sample.mask_path)  # W x H swapped
    problem, _ = annotation_rounds.mask_problem(sample)
    said = "its EXIF orientation tag (6) shows it turned" if orientation else "drawn on a turned copy"
    assert problem.startswith(f"{sample.mask_path}: 8x12 pixels, but its image x.jpg is 12x8 (W x H); the mask has "
                              f"the image's size turned by 90 degrees: ") and said in problem, problem
    assert problem.endswith("masks follow the pixels as stored (read without the EXIF turn, as the reference "
                            "does): turn the mask back"), problem
    Image.new("L", (9, 12)).save(sample.mask_path)
    assert "EXIF" not in annotation_rounds.mask_problem(sample)[0]
