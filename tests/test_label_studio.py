"""label_studio.py: the Label Studio files of a round and the way back from a JSON export to masks (issue 19).

The brush RLE is Label Studio's SDK's; these tests check what our code does with it (sizes, channels, the alpha
threshold, merging), the tasks file's fields, and every refusal of the import, which leaves everything as it was.
The export format is the one a 1.23 server writes (tests/test_label_studio_server.py checks it against a real one).
"""
import errno
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

import annotation_rounds
import label_studio
import safe_io
from datasets_skin import discover_samples
from label_studio_helpers import ROUND, RUN_ID, annotation, brush_region, export_of, make_round
from synthetic_isic import make_synthetic_isic

brush = pytest.importorskip("label_studio_sdk.converter.brush")
REPO = Path(__file__).resolve().parents[1]
FULL_SIZE_MASKS = REPO.parent / "shared" / "isic-sample-full" / "masks"  # 3024 x 2016 ISIC masks, when present
FRONTEND_EXPORT = Path(__file__).parent / "data" / "label_studio_1.23_frontend_export.json"
BACKEND_REQUESTS = Path(__file__).parent / "data" / "label_studio_1.23_ml_backend_requests.json"  # what 1.23 sent


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A round of four synthetic images (300 px wide, ranks 1-4, the second with an empty proposal). Read-only."""
    return make_round(tmp_path_factory.mktemp("round"), n_synthetic=4, empty_proposal=1)


@pytest.fixture
def fresh(tmp_path):
    """A round of three synthetic images for one test to import into."""
    return make_round(tmp_path, n_synthetic=3, size=160)


def write_export(path: Path, tasks) -> Path:
    path.write_text(json.dumps(tasks))
    return path


def written_files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------- the RLE, by the SDK

def lesion_masks():
    """Real-size masks: the full-resolution ISIC masks when present, and a synthetic one with holes and specks."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:683, :1024]
    blob = ((yy - 300) ** 2 / 200 ** 2 + (xx - 500) ** 2 / 320 ** 2) < 1
    blob &= rng.random(blob.shape) > 0.02  # holes of one pixel: runs of length 1
    yield "synthetic 1024x683", blob
    for path in sorted(FULL_SIZE_MASKS.glob("*.png"))[:1]:
        yield path.name, np.asarray(Image.open(path).convert("L")) > 127


@pytest.mark.parametrize("name,mask", list(lesion_masks()), ids=lambda v: v if isinstance(v, str) else "")
def test_a_proposal_survives_the_sdk_rle_both_ways_at_full_size(name, mask):
    region = label_studio.brush_result(mask)
    height, width = mask.shape
    assert (region["original_width"], region["original_height"]) == (width, height)
    assert region["value"]["brushlabels"] == ["lesion"] and region["value"]["format"] == "rle"
    # Label Studio's layout: H x W x RGBA, row-major; our proposal is white and opaque (255 on all four channels)
    rgba = brush.decode_rle(region["value"]["rle"]).reshape(height, width, 4)
    np.testing.assert_array_equal(rgba, np.repeat(mask[..., None], 4, axis=2).astype(np.uint8) * 255)
    np.testing.assert_array_equal(label_studio.region_mask(region, (height, width), name), mask)


def rle_edge_masks():
    """Masks whose runs cross the RLE's field sizes (1, 2 and 64 pixels: 4, 8 and 256 values; 65 pixels: 260 values,
    the 16-bit field; 16384 and 16385 pixels: 65536 values and one more, a second run), all lesion, all skin, mixed."""
    for pixels in (1, 2, 3, 4, 64, 65, 16383, 16384, 16385, 40000):
        yield np.ones((1, pixels), bool)
        yield np.zeros((1, pixels), bool)
    yield np.arange(12).reshape(3, 4) % 2 == 0
    yield np.random.default_rng(4).random((40, 70)) > 0.3


@pytest.mark.parametrize("mask", [*rle_edge_masks(), *(m for _, m in lesion_masks())], ids=lambda m: str(m.shape))
def test_our_brush_rle_is_byte_for_byte_the_sdks(mask):
    """label_studio.mask_rle computes from runs of pixels what the SDK's mask2rle computes from every RGBA value."""
    assert label_studio.mask_rle(mask) == [int(v) for v in brush.mask2rle(mask.astype(np.uint8) * 255)]


def test_lesion_is_alpha_above_127_and_regions_are_merged():
    """A stroke's pixel is lesion when its alpha > 127 (ALPHA_THRESHOLD); two regions: their union."""
    left, right = np.zeros((40, 50), bool), np.zeros((40, 50), bool)
    left[5:30, 5:30], right[10:35, 20:45] = True, True  # overlapping
    faint, firm = brush_region(left, alpha=127), brush_region(left, alpha=128)
    assert not label_studio.region_mask(faint, (40, 50), "faint").any()
    np.testing.assert_array_equal(label_studio.region_mask(firm, (40, 50), "firm"), left)
    assert label_studio.ALPHA_THRESHOLD == 127


# ----------------------------------------------------------------------------- out: interface and tasks

def test_the_interface_is_one_lesion_brush_on_the_image():
    view = ET.fromstring(label_studio.labelling_interface(1))
    image, brushes = view.find("Image"), view.find("BrushLabels")
    assert image.get("name") == "image" and image.get("value") == "$image"
    assert brushes.get("name") == "lesion_mask" and brushes.get("toName") == "image"
    assert [label.get("value") for label in brushes.findall("Label")] == ["lesion"]
    # the smart tools of the ML backend (label_studio_backend.py): a click and a box labelled lesion
    for tag, name in (("KeyPointLabels", "lesion_click"), ("RectangleLabels", "lesion_box")):
        tool = view.find(tag)
        assert (tool.get("name"), tool.get("toName"), tool.get("smart")) == (name, "image", "true")
        assert [(label.get("value"), label.get("smart")) for label in tool.findall("Label")] == [("lesion", "true")]
    for classes in (0, 2, 3):
        with pytest.raises(label_studio.ClassCountError, match=f"one foreground class; got {classes}"):
            label_studio.labelling_interface(classes)


def test_each_selected_image_is_a_task_with_its_proposal_and_selection_order(made):
    tasks = json.loads((made.round_dir / label_studio.TASKS_FILE).read_text())
    assert (made.round_dir / label_studio.INTERFACE_FILE).read_text() == label_studio.labelling_interface(1)
    assert len(tasks) == len(made.items) == 4
    for task, item in zip(tasks, made.items):
        data, (prediction,) = task["data"], task["predictions"]
        name = item.sample.image_path.name
        assert data["mdsam_run"] == RUN_ID and data["mdsam_round"] == ROUND and data["mdsam_image"] == name
        assert data["rank_in_pool"] == item.rank_in_pool and data["uncertainty"] == pytest.approx(item.score)
        # Local Files: /data/local-files/?d=<path below the document root> of the round folder's copy
        assert data["image"].startswith("/data/local-files/?d=")
        served = made.document_root / unquote(data["image"].split("?d=", 1)[1])
        assert served == made.round_dir / name and served.read_bytes() == item.sample.image_path.read_bytes()
        assert prediction["model_version"] == RUN_ID
        if item.proposal.any():
            (region,) = prediction["result"]
            np.testing.assert_array_equal(label_studio.region_mask(region, item.sample.orig_size, name),
                                          item.proposal)
        else:
            assert prediction["result"] == []  # an empty proposal is no region to delete
    # Label Studio lists low scores first ("prediction score" ascending): the most uncertain image first; it shows
    # a score as a percentage of confidence: k images get 0, 1/k, ..., (k - 1)/k in selection order
    by_score = sorted(tasks, key=lambda t: t["predictions"][0]["score"])
    uncertainties = [t["data"]["uncertainty"] for t in by_score]
    assert uncertainties == sorted(uncertainties, reverse=True) and len(set(uncertainties)) == 4
    assert [t["predictions"][0]["score"] for t in by_score] == [0, 0.25, 0.5, 0.75]
    assert not safe_io.stale_temp_files(made.round_dir)


def test_prediction_scores_follow_the_rank_not_the_list_order():
    """score = place / k, the place in the rank order (a set selection may list a round in any order)."""
    items = [SimpleNamespace(rank_in_pool=rank) for rank in (3, 1, 7, 2)]
    assert label_studio.prediction_scores(items) == [2 / 4, 0 / 4, 3 / 4, 1 / 4]


def test_the_round_folder_must_be_below_the_document_root(made, tmp_path):
    for root in (tmp_path, made.round_dir):  # outside it; the root itself (Label Studio refuses that storage)
        with pytest.raises(label_studio.RoundFolderError, match="not inside the Label Studio document root"):
            label_studio.write_round_files(made.round_dir, made.items, RUN_ID, ROUND, root)
    spaced = label_studio.local_files_url(made.document_root / "a b" / "c#1.jpg", made.document_root)
    assert spaced == "/data/local-files/?d=a%20b/c%231.jpg"


def test_the_trainers_rounds_share_one_run_id_and_a_document_root(made, tmp_path, monkeypatch):
    """write_trainer_round: one run id per run (kept in annotate/), URLs below the trainer's --output, or below
    LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT when the trainer's environment sets it; refusals write nothing."""
    output = tmp_path / "out"
    annotate = output / "Skin_512" / "annotate"
    for number in (1, 2):
        shutil.copytree(made.round_dir, annotate / f"round_{number:03d}")
    monkeypatch.delenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", raising=False)
    with pytest.raises(label_studio.ClassCountError):
        label_studio.write_trainer_round(annotate / "round_001", made.items, 1, output, num_classes=2)
    assert not (annotate / "label_studio_run.txt").exists()
    ids = set()
    for number in (1, 2):
        tasks, root = label_studio.write_trainer_round(annotate / f"round_{number:03d}", made.items, number, output, 1)
        data = json.loads(tasks.read_text())[0]["data"]
        assert root == output and data["image"].startswith(f"/data/local-files/?d=Skin_512/annotate/round_{number:03d}/")
        ids.add(data["mdsam_run"])
    assert ids == {(annotate / "label_studio_run.txt").read_text().strip()} and ids != {RUN_ID}
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    tasks, root = label_studio.write_trainer_round(annotate / "round_002", made.items, 2, output, 1)
    assert root == tmp_path and json.loads(tasks.read_text())[0]["data"]["image"].startswith(
        "/data/local-files/?d=out/Skin_512/annotate/round_002/")
    again = tmp_path / "again" / "Skin_512" / "annotate"  # another run folder of the same name: another run
    shutil.copytree(made.round_dir, again / "round_001")
    label_studio.write_trainer_round(again / "round_001", made.items, 1, tmp_path, 1)
    assert (again / "label_studio_run.txt").read_text().strip() not in ids


def test_without_the_sdk_the_module_imports_and_says_how_to_enable():
    code = ("import sys, numpy, label_studio as ls\n"
            "print('label_studio_sdk' in sys.modules)\n"  # imported on first use only (it takes seconds)
            "sys.modules['label_studio_sdk'] = None\n"  # from here on, as if it were not installed
            "region = ls.brush_result(numpy.ones((2, 2), bool))\n"  # our own RLE: no SDK needed
            "try:\n    ls.region_mask(region, (2, 2), 'an export')\n"  # the SDK decodes what Label Studio drew
            "except ls.SdkMissingError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported_at_once, message = done.stdout.splitlines()
    assert imported_at_once == "False"
    assert "pip install -r requirements-labelstudio.txt" in message


# ----------------------------------------------------------------------------- back: the export to masks

def test_an_export_becomes_masks_and_who_and_how_long(fresh, tmp_path):
    first, second, third = (item.sample.image_path.name for item in fresh.items)
    truth = fresh.answers[first]
    top, bottom = truth.copy(), truth.copy()
    top[truth.shape[0] // 2:], bottom[:truth.shape[0] // 3] = False, False  # two overlapping strokes = the truth
    export = write_export(tmp_path / "export.json", export_of(fresh.round_dir, {
        first: [annotation([brush_region(top), brush_region(bottom)], 11, completed_by=4, lead_time=31.5)],
        second: [annotation([], 12, completed_by=5, lead_time=2.0)],  # no stroke: the image has no lesion
        third: [annotation([], 13, cancelled=True)]}))  # skipped
    before = (fresh.round_dir / "to_annotate.csv").read_text()
    result = label_studio.import_export(export, fresh.round_dir)
    names = [fresh.round_dir / f"{Path(n).stem}_segmentation.png" for n in (first, second)]
    assert result.written == names and result.not_returned == {third: "skipped"}
    np.testing.assert_array_equal(np.asarray(Image.open(names[0])), truth.astype(np.uint8) * 255)
    lesion_free = np.asarray(Image.open(names[1]))
    assert lesion_free.shape == fresh.answers[second].shape and not lesion_free.any()
    assert not (fresh.round_dir / f"{Path(third).stem}_segmentation.png").exists()
    # the round's to_annotate.csv: the trainer's columns as they were, then what came back
    trainer_columns = [line.split(",") for line in before.splitlines()]
    merged = [line.split(",") for line in (fresh.round_dir / "to_annotate.csv").read_text().splitlines()]
    assert [row[:4] for row in merged] == trainer_columns
    assert [row[4:] for row in merged] == [
        ["status", "mask", "completed_by", "lead_time_s", "task_id", "annotation_id"],
        ["annotated", names[0].name, "4", "31.500", "100", "11"],
        ["annotated", names[1].name, "5", "2.000", "101", "12"],
        ["skipped", "", "1", "7.250", "102", "13"]]  # a skip keeps its task, who skipped and after how long
    assert result.csv_path == fresh.round_dir / "to_annotate.csv"
    assert list((fresh.data_root / "Training_GroundTruth").iterdir()) == []


def test_the_smart_tools_clicks_and_box_are_prompts_the_import_leaves_aside(fresh, tmp_path):
    """An annotation made with the ML backend keeps the annotator's clicks and box (regions as Label Studio 1.23.2
    sent them to the backend, recorded in tests/data) beside the brush region the backend answered: the mask is the
    brush alone, whatever the prompts."""
    recorded = json.loads(BACKEND_REQUESTS.read_text())
    prompts = [*recorded["predict_clicks"]["params"]["context"]["result"],
               *recorded["predict_box"]["params"]["context"]["result"]]
    assert sorted({r["type"] for r in prompts}) == ["keypointlabels", "rectanglelabels"]
    first = fresh.items[0].sample.image_path.name
    truth = fresh.answers[first]
    export = write_export(tmp_path / "export.json", export_of(fresh.round_dir, {
        first: [annotation(prompts[:1] + [brush_region(truth)] + prompts[1:], 21)]}))
    result = label_studio.import_export(export, fresh.round_dir)
    written = fresh.round_dir / f"{Path(first).stem}_segmentation.png"
    assert result.written == [written]
    np.testing.assert_array_equal(np.asarray(Image.open(written)), truth.astype(np.uint8) * 255)


def test_a_click_region_of_another_tool_name_is_still_refused(fresh, tmp_path):
    recorded = json.loads(BACKEND_REQUESTS.read_text())
    click = dict(recorded["predict_click"]["params"]["context"]["result"][0], from_name="somebody_elses_points")
    export = write_export(tmp_path / "export.json", export_of(fresh.round_dir, {
        fresh.items[0].sample.image_path.name: [annotation([click], 22)]}))
    with pytest.raises(label_studio.ExportError, match="a keypointlabels region somebody_elses_points->image"):
        label_studio.import_export(export, fresh.round_dir)


def test_strokes_drawn_in_label_studios_own_editor_come_back_as_their_union(tmp_path):
    """A JSON export written by Label Studio 1.23.2 (captured once, tests/data): in task 3 an annotator kept the
    proposal's region and drew one brush stroke with the mouse in the labelling view (headless Chromium; the editor
    anti-aliases a stroke's edge, alpha 8-255); task 1 was annotated and task 2 skipped through the REST API. Its
    round (run-A, round 1: three synthetic images, seed 1, 300 px) is made again here."""
    data = make_synthetic_isic(tmp_path / "data", n_train=3, n_val=1, size=300, seed=1)
    annotation_rounds.hide_masks(data / "Training_GroundTruth", tmp_path / "answers")
    samples = discover_samples(data / "Training_Data", data / "Training_GroundTruth", unlabeled_ok=True)
    round_dir = tmp_path / "root" / "run" / "annotate" / "round_001"
    items = [annotation_rounds.RoundItem(s, 1.0, rank + 1, np.zeros(s.orig_size, bool))
             for rank, s in enumerate(samples)]
    annotation_rounds.write_round(round_dir, items)
    label_studio.write_round_files(round_dir, items, "run-A", 1, tmp_path / "root")
    result = label_studio.import_export(FRONTEND_EXPORT, round_dir)
    assert result.not_returned == {"ISIC_0000001.jpg": "skipped"} and len(result.written) == 2
    drawn = json.loads(FRONTEND_EXPORT.read_text())[2]["annotations"][0]["result"]
    alphas = [brush.decode_rle(r["value"]["rle"]).reshape(204, 300, 4)[..., 3] for r in drawn]
    assert len(alphas) == 2 and ((alphas[1] > 0) & (alphas[1] <= 127)).any()  # the proposal, a soft-edged stroke
    want = (alphas[0] > 127) | (alphas[1] > 127)
    np.testing.assert_array_equal(np.asarray(Image.open(round_dir / "ISIC_0000002_segmentation.png")) > 0, want)
    api_made = np.zeros((219, 300), bool)
    api_made[50:120, 60:200] = True
    np.testing.assert_array_equal(np.asarray(Image.open(round_dir / "ISIC_0000000_segmentation.png")) > 0, api_made)


def test_unannotated_images_are_not_returned_and_earlier_rounds_are_left_aside(fresh, tmp_path):
    first = fresh.items[0].sample.image_path.name
    tasks = export_of(fresh.round_dir, {first: [annotation([brush_region(fresh.answers[first])])]})
    earlier = json.loads(json.dumps(tasks[0]))
    earlier["data"].update(mdsam_round=ROUND - 1, mdsam_image="ISIC_9999999.jpg")  # the run's project, round 2
    result = label_studio.import_export(write_export(tmp_path / "e.json", [earlier] + tasks), fresh.round_dir)
    assert [p.name for p in result.written] == [f"{Path(first).stem}_segmentation.png"]
    assert result.earlier_round_tasks == 1
    assert result.not_returned == {item.sample.image_path.name: "not_annotated" for item in fresh.items[1:]}


def good_task(fresh):
    name = fresh.items[0].sample.image_path.name
    return export_of(fresh.round_dir, {name: [annotation([brush_region(fresh.answers[name])], 21)]})[0]


def edited(task, **data):
    task = json.loads(json.dumps(task))
    task["data"].update(data)
    return task


BAD_EXPORTS = {
    "two annotations": (lambda t: {**t, "annotations": t["annotations"] * 2}, "2 annotations \\(ids 21, 21\\)"),
    "another image": (lambda t: edited(t, mdsam_image="ISIC_7777777.jpg"), "ISIC_7777777.jpg is not one of round 3"),
    "another run": (lambda t: edited(t, mdsam_run="run-B"), "a task of another run \\('run-B'"),
    "a later round": (lambda t: edited(t, mdsam_round=ROUND + 1), "a task of round 4, after this round 3"),
    "no round number": (lambda t: edited(t, mdsam_round="3"), "its mdsam_round is '3', not a round number"),
    "not our task": (lambda t: {**t, "data": {"image": t["data"]["image"]}}, "not a task of a trainer round"),
    "another size": (lambda t: {**t, "annotations": [annotation([brush_region(np.ones((9, 7), bool))])]},
                     "drawn on a 7x9 image, but the round's image is 160x"),
    "another tool": (lambda t: {**t, "annotations": [annotation([{**brush_region(np.ones((9, 7), bool)),
                                                                  "type": "rectanglelabels"}])]},
                     "a rectanglelabels region"),
    "another label": (lambda t: {**t, "annotations": [annotation([brush_region(np.ones((9, 7), bool),
                                                                               label="nevus")])]},
                      "labelled \\['nevus'\\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_EXPORTS))
def test_an_export_that_does_not_fit_the_round_is_one_error_and_writes_nothing(fresh, tmp_path, case):
    change, message = BAD_EXPORTS[case]
    before = written_files(fresh.round_dir)
    export = write_export(tmp_path / "export.json", [change(good_task(fresh))])
    with pytest.raises(label_studio.ExportError, match=message):
        label_studio.import_export(export, fresh.round_dir)
    assert written_files(fresh.round_dir) == before


def test_the_same_image_annotated_in_two_tasks_is_an_error(fresh, tmp_path):
    task = good_task(fresh)
    twice = [task, {**task, "id": 555, "annotations": [annotation([], 22)]}]
    with pytest.raises(label_studio.ExportError, match="annotated in two tasks \\(100 and 555"):
        label_studio.import_export(write_export(tmp_path / "e.json", twice), fresh.round_dir)


@pytest.mark.parametrize("content,message", [
    ("{not json", "cannot read it as a Label Studio JSON export"),
    (json.dumps([{"image": "x.jpg", "lesion_mask": []}]), "not JSON_MIN, CSV or masks"),  # JSON_MIN's shape
    (json.dumps([]), "no task of round 3"),
])
def test_a_file_that_is_not_a_json_export_of_this_round_is_refused(fresh, tmp_path, content, message):
    (tmp_path / "export.json").write_text(content)
    with pytest.raises(label_studio.ExportError, match=message):
        label_studio.import_export(tmp_path / "export.json", fresh.round_dir)


def test_a_target_inside_the_data_sets_mask_folder_is_refused(fresh, tmp_path):
    inside = fresh.data_root / "Training_GroundTruth" / "round_003"
    export = write_export(tmp_path / "e.json", [good_task(fresh)])
    for folder in (inside, tmp_path / "ISIC-2017_Training_Part1_GroundTruth" / "r"):
        shutil.copytree(fresh.round_dir, folder)
        with pytest.raises(label_studio.RoundFolderError, match="inside the data set's mask folder"):
            label_studio.import_export(export, folder)
        assert not list(folder.glob("*_segmentation.png"))
    with pytest.raises(label_studio.RoundFolderError, match="has no label_studio_tasks.json"):
        label_studio.import_export(export, tmp_path)
    listed = (fresh.round_dir / "to_annotate.csv").read_text()
    for damaged in (listed.rsplit("\n", 2)[0] + "\n", listed.replace("save_mask_as", "saved")):
        (fresh.round_dir / "to_annotate.csv").write_text(damaged)  # a row or the trainer's column lost
        with pytest.raises(label_studio.RoundFolderError, match="does not list the images of label_studio_tasks"):
            label_studio.import_export(export, fresh.round_dir)
    (fresh.round_dir / "to_annotate.csv").unlink()
    with pytest.raises(label_studio.RoundFolderError, match="to_annotate.csv: missing or unreadable"):
        label_studio.import_export(export, fresh.round_dir)
    (fresh.round_dir / fresh.items[1].sample.image_path.name).unlink()
    with pytest.raises(label_studio.RoundFolderError, match="an image of the round is missing or unreadable"):
        label_studio.import_export(export, fresh.round_dir)


def test_existing_masks_are_never_overwritten_one_error_lists_them(fresh, tmp_path):
    first, second, _ = (item.sample.image_path.name for item in fresh.items)
    export = write_export(tmp_path / "e.json", export_of(fresh.round_dir, {
        first: [annotation([brush_region(fresh.answers[first])], 31)],
        second: [annotation([brush_region(fresh.answers[second])], 32)]}))
    person_made = fresh.round_dir / f"{Path(first).stem}_segmentation.png"
    Image.fromarray(np.full(fresh.answers[first].shape, 255, np.uint8)).save(person_made)
    in_dataset = fresh.data_root / "Training_GroundTruth" / f"{Path(second).stem}_segmentation.png"
    Image.fromarray(fresh.answers[second].astype(np.uint8) * 255).save(in_dataset)
    before = written_files(fresh.round_dir)
    with pytest.raises(label_studio.MaskClashError, match="2 mask file") as error:
        label_studio.import_export(export, fresh.round_dir)
    assert str(person_made) in str(error.value) and str(in_dataset) in str(error.value)
    assert written_files(fresh.round_dir) == before
    # the same export once the clashes are gone, then again: identical masks are left as they are
    person_made.unlink()
    in_dataset.unlink()
    assert len(label_studio.import_export(export, fresh.round_dir).written) == 2
    again = label_studio.import_export(export, fresh.round_dir)
    assert again.written == [] and len(again.unchanged) == 2
    header = (fresh.round_dir / "to_annotate.csv").read_text().splitlines()[0]
    assert header == "image,score,rank_in_pool,save_mask_as,status,mask,completed_by,lead_time_s,task_id,annotation_id"


def test_a_mask_that_appears_during_the_write_is_kept(tmp_path):
    target = tmp_path / "x_segmentation.png"
    with pytest.raises(FileExistsError):
        with safe_io.atomic_path(target, replace=False) as tmp:
            tmp.write_bytes(b"ours")
            target.write_bytes(b"the person's")
    assert target.read_bytes() == b"the person's" and not safe_io.stale_temp_files(tmp_path)
    with safe_io.atomic_path(tmp_path / "new.png", replace=False) as tmp:
        tmp.write_bytes(b"ours")
    assert (tmp_path / "new.png").read_bytes() == b"ours"


def test_the_command_writes_masks_or_says_in_one_line_what_is_wrong(fresh, tmp_path, capsys):
    export = write_export(tmp_path / "e.json", [good_task(fresh)])
    assert label_studio.main(["import", "--export", str(export), "--round_dir", str(fresh.round_dir)]) == 0
    said = capsys.readouterr().out
    assert f"mask(s) written to {fresh.round_dir}: 1" in said and "--accept_partial" in said
    # two images not returned: the command that continues the run is the one that takes them back to the pool
    assert said.strip().splitlines()[-1].endswith("trainer.py <the run's flags> --resume --accept_partial")
    write_export(export, [edited(good_task(fresh), mdsam_run="run-B")])
    with pytest.raises(SystemExit) as exit_info:
        label_studio.main(["import", "--export", str(export), "--round_dir", str(fresh.round_dir)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("label_studio.py import: --export: ") and "another run" in err


# ----------------------------------------------------------------------------- issue 26: hostile inputs, round 2

def test_a_round_of_an_image_named_with_230_characters_is_written_and_imported(tmp_path):
    """Its mask's name (230 + 17 characters) fits the file system, but the temporary file it was written through
    did not: "round folder not writable", whatever space was freed (safe_io names temporary files to fit)."""
    data = make_synthetic_isic(tmp_path / "data", n_train=1, n_val=1, size=96, seed=2)
    image_dir, mask_dir = data / "Training_Data", data / "Training_GroundTruth"
    (image,) = image_dir.iterdir()
    stem = "ISIC_" + "7" * 225
    image.rename(image_dir / f"{stem}.jpg")
    truth = np.asarray(Image.open(next(mask_dir.iterdir()))) > 127
    shutil.rmtree(mask_dir)
    (sample,) = discover_samples(image_dir, mask_dir, unlabeled_ok=True)
    item = annotation_rounds.RoundItem(sample, 0.5, 1, np.zeros(sample.orig_size, bool))
    round_dir = tmp_path / "root" / "round_003"
    annotation_rounds.write_round(round_dir, [item])
    label_studio.write_round_files(round_dir, [item], RUN_ID, ROUND, tmp_path / "root")
    export = write_export(tmp_path / "e.json",
                          export_of(round_dir, {f"{stem}.jpg": [annotation([brush_region(truth)])]}))
    (written,) = label_studio.import_export(export, round_dir).written
    assert written.name == f"{stem}_segmentation.png" and len(written.name) == 247
    np.testing.assert_array_equal(np.asarray(Image.open(written)) > 0, truth)
    assert (round_dir / f"{stem}_proposal.png").is_file() and not safe_io.stale_temp_files(round_dir)


def first_region(task, **changes):
    """``task`` with its first annotation's first region changed."""
    task = json.loads(json.dumps(task))
    task["annotations"][0]["result"][0].update(changes)
    return task


MALFORMED_EXPORTS = {  # AttributeError / TypeError tracebacks before; now the task and the field are named
    "annotations text": (lambda t: {**t, "annotations": "done"}, "its annotations is text \\('done'\\), not a list"),
    "annotations an object": (lambda t: {**t, "annotations": {"id": 21}},
                              "its annotations is an object \\({'id': 21}\\), not a list"),
    "an annotation not an object": (lambda t: {**t, "annotations": [21]},
                                    "its annotation 1 is a whole number \\(21\\), not an object"),
    "result an object": (lambda t: {**t, "annotations": [{**t["annotations"][0], "result": {"a": 1}}]},
                         "annotation 21: its result is an object \\({'a': 1}\\), not a list"),
    "value a list": (lambda t: first_region(t, value=[1, 2]),
                     "annotation 21, region 1: its value is a list \\(\\[1, 2\\]\\), not an object"),
    "mdsam_image a list": (lambda t: edited(t, mdsam_image=["a.jpg"]),
                           ": its mdsam_image is a list \\(\\['a.jpg'\\]\\), not text"),
    "original_width text": (lambda t: first_region(t, original_width=str(t["annotations"][0]["result"][0]
                                                                      ["original_width"])),
                            "annotation 21, region 1: its original_width is text \\('160'\\), not a whole number"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_EXPORTS))
def test_an_export_of_another_structure_names_the_task_and_field_and_writes_nothing(fresh, tmp_path, case):
    change, message = MALFORMED_EXPORTS[case]
    before = written_files(fresh.round_dir)
    export = write_export(tmp_path / "export.json", [change(good_task(fresh))])
    with pytest.raises(label_studio.ExportError, match=f"^{export}: task 100.*{message}; "):
        label_studio.import_export(export, fresh.round_dir)
    assert written_files(fresh.round_dir) == before


def test_an_import_into_a_read_only_round_folder_is_one_line_and_writes_nothing(fresh, tmp_path, capsys, monkeypatch):
    """A WriteError traceback with exit 1 before. (CI runs as root: the read-only file system is injected where a
    file of the round folder would be made.)"""
    export = write_export(tmp_path / "e.json", [good_task(fresh)])
    before = written_files(fresh.round_dir)
    made = safe_io.tempfile.mkstemp

    def read_only_round(*args, dir=None, **kwargs):
        if Path(dir) == fresh.round_dir:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(fresh.round_dir))
        return made(*args, dir=dir, **kwargs)

    monkeypatch.setattr(safe_io.tempfile, "mkstemp", read_only_round)
    with pytest.raises(SystemExit) as exit_info:
        label_studio.main(["import", "--export", str(export), "--round_dir", str(fresh.round_dir)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == (
        f"label_studio.py import: --round_dir: cannot write into {fresh.round_dir} (read-only file system): make it "
        "writable and import again; nothing was written\n")
    assert written_files(fresh.round_dir) == before


def test_a_disk_that_fills_up_during_the_import_is_one_line(fresh, tmp_path, capsys, monkeypatch):
    export = write_export(tmp_path / "e.json", [good_task(fresh)])
    before = written_files(fresh.round_dir)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(label_studio, "check_writable", lambda round_dir: None)  # the disk fills up after the probe
    monkeypatch.setattr(safe_io.tempfile, "mkstemp", full)
    with pytest.raises(SystemExit) as exit_info:
        label_studio.main(["import", "--export", str(export), "--round_dir", str(fresh.round_dir)])
    mask = fresh.round_dir / f"{Path(fresh.items[0].sample.image_path.name).stem}_segmentation.png"
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"label_studio.py import: --round_dir: cannot write {mask}: the disk is full (No space left on device); "
        "nothing half-written is left\n")
    assert written_files(fresh.round_dir) == before
