"""val: metrics agree with the official ISIC scorer and medpy; batched validation; the CLI."""
from __future__ import annotations

import csv
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter
from torch.utils.data import DataLoader

import datasets_skin as ds
import safe_io
import val
from sam_lora_image_encoder_prompt import build_model

ISIC_KEYS = ("accuracy", "sensitivity", "specificity", "jaccard", "threshold_jaccard", "dice")


def random_blobs(rng: np.random.Generator, shape, fill: float) -> np.ndarray:
    """Irregular blobs covering roughly ``fill`` of the image (possibly several components, touching borders)."""
    noise = gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(1.5, 6))
    return noise > np.quantile(noise, 1 - fill)


def mask_pairs(seed: int = 0, count: int = 120):
    """Random and edge-case (pred, gt) pairs of various shapes."""
    rng = np.random.default_rng(seed)
    shape = (37, 53)
    empty, full = np.zeros(shape, bool), np.ones(shape, bool)
    dot = empty.copy()
    dot[5, 7] = True
    other_dot = empty.copy()
    other_dot[30, 50] = True
    blob = random_blobs(rng, shape, 0.3)
    pairs = [
        (empty, empty), (empty, blob), (blob, empty), (full, full), (full, blob), (blob, full),
        (blob, blob), (dot, dot), (dot, other_dot), (full, empty), (empty, full), (~blob, blob),
    ]
    for i in range(count):
        shape = tuple(rng.integers(8, 120, 2))
        gt = random_blobs(rng, shape, rng.uniform(0.01, 0.6))
        kind = i % 4
        if kind == 0:
            pred = random_blobs(rng, shape, rng.uniform(0.01, 0.6))
        elif kind == 1:
            pred = binary_dilation(gt, iterations=int(rng.integers(1, 4)))
        elif kind == 2:
            pred = binary_erosion(gt, iterations=1) | (rng.random(shape) < 0.02)
        else:
            pred = rng.random(shape) < rng.uniform(0.05, 0.9)
        pairs.append((pred, gt))
    return pairs


def test_metrics_agree_with_isic_challenge_scorer():
    from isic_challenge_scoring import metrics as isic
    from isic_challenge_scoring.confusion import create_binary_confusion_matrix

    thresholded_below, thresholded_above = 0, 0
    for pred, gt in mask_pairs():
        ours = val.segmentation_metrics(pred, gt)
        cm = create_binary_confusion_matrix(truth_binary_values=gt, prediction_binary_values=pred)
        official = dict(
            accuracy=isic.binary_accuracy(cm), sensitivity=isic.binary_sensitivity(cm),
            specificity=isic.binary_specificity(cm), jaccard=isic.binary_jaccard(cm),
            threshold_jaccard=isic.binary_threshold_jaccard(cm, threshold=0.65), dice=isic.binary_dice(cm),
        )
        for key in ISIC_KEYS:
            assert ours[key] == pytest.approx(float(official[key]), abs=1e-12), key
        thresholded_below += official["threshold_jaccard"] == 0 and official["jaccard"] > 0
        thresholded_above += official["threshold_jaccard"] > 0
    assert thresholded_below > 5 and thresholded_above > 5  # both sides of the 0.65 threshold were exercised


def test_empty_conventions():
    empty, blob = np.zeros((30, 40), bool), np.zeros((30, 40), bool)
    blob[10:20, 5:15] = True
    both = val.segmentation_metrics(empty, empty)
    assert both["dice"] == both["jaccard"] == both["threshold_jaccard"] == 1.0 and both["hd95"] == 0.0
    missed = val.segmentation_metrics(empty, blob)
    assert missed["dice"] == 0.0 and missed["sensitivity"] == 0.0 and missed["hd95"] == pytest.approx(50.0)
    spurious = val.segmentation_metrics(blob, empty, spacing=(0.5, 2.0))
    assert spurious["sensitivity"] == 1.0 and spurious["hd95"] == pytest.approx(np.hypot(15.0, 80.0))
    with pytest.raises(ValueError, match="differ in size"):
        val.segmentation_metrics(blob, blob[:, :10])
    with pytest.raises(ValueError, match="2-D"):
        val.segmentation_metrics(blob[None], blob[None])


@pytest.mark.parametrize("spacing", [None, 0.25, (0.5, 2.0)])
def test_hd95_agrees_with_medpy_on_full_images(spacing):
    from medpy.metric.binary import hd95 as medpy_hd95

    checked = 0
    for pred, gt in mask_pairs(seed=1, count=60):
        if not pred.any() or not gt.any():
            continue
        ours = val.segmentation_metrics(pred, gt, spacing=spacing)["hd95"]
        assert ours == pytest.approx(medpy_hd95(pred, gt, voxelspacing=spacing), rel=1e-12, abs=1e-12)
        checked += 1
    assert checked > 50


def test_metrics_accept_tensors_and_any_nonzero():
    gt = np.zeros((20, 20), np.uint8)
    gt[5:15, 5:15] = 255
    pred = torch.zeros(20, 20, dtype=torch.long)
    pred[5:15, 5:10] = 1
    m = val.segmentation_metrics(pred, gt)
    assert m["dice"] == pytest.approx(2 * 50 / (50 + 100)) and m["specificity"] == 1.0


# ---------------------------------------------------------------------------------------------- fast path


def softmax_argmax(logits: torch.Tensor, size) -> np.ndarray:
    """The definition: upsample every channel (bilinear, align_corners=False), softmax (float64), argmax."""
    upsampled = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return upsampled.double().softmax(0).argmax(0).numpy()


def tied_logits(channels: int, low: int, zero_background: bool, seed: int) -> torch.Tensor:
    """Random logits on a coarse grid (so exact ties happen after upsampling) with plateaus and equal channels."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-2, 3, (channels, low, low), generator=gen).float() / 2
    logits[:, : low // 4, : low // 4] = 0.0  # every channel 0: a tie of all classes
    if channels > 2:
        logits[2, low // 2 :] = logits[1, low // 2 :]  # classes 1 and 2 tie in the lower half
        logits[3, :, low // 2 :] = logits[0, :, low // 2 :]  # class 3 ties background on the right
    if zero_background:
        logits[0] = 0.0
    return logits


@pytest.mark.parametrize("channels, low, size, zero_background", [
    (2, 128, (2000, 3008), True),  # LoRA_Sam at 512 px, a 3008 x 2000 ISIC photo: the thresholded path
    (2, 37, (1022, 767), False),  # one class, a background logit that is not zero
    (4, 64, (767, 1022), False),  # three classes
])
def test_fast_label_map_is_the_softmax_argmax_at_full_size(channels, low, size, zero_background):
    logits = tied_logits(channels, low, zero_background, seed=channels + low)
    expected = softmax_argmax(logits, size)
    masks = val.class_masks(logits, size)
    assert len(masks) == channels - 1 and all(m.shape == size and m.dtype == torch.bool for m in masks)
    labels = val.logits_to_label_map(logits, size)
    np.testing.assert_array_equal(labels, expected)
    for c, mask in enumerate(masks, start=1):
        np.testing.assert_array_equal(mask.numpy(), expected == c)
    upsampled = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    tied = (upsampled == upsampled.max(0).values).sum(0) > 1
    assert tied.sum() > 1000 and (expected[tied.numpy()] == 0).any()  # ties happened, some kept background
    assert len(np.unique(expected)) == channels  # every class is predicted somewhere


def test_image_metrics_equal_the_metrics_of_the_argmax_map():
    """image_metrics (what validate runs per image) == class_metrics_row of the plain argmax label map."""
    rng = np.random.default_rng(3)
    for channels, size in ((2, (301, 455)), (3, (240, 320))):
        gt = random_blobs(rng, size, 0.3).astype(np.uint8)
        if channels == 3:
            gt[random_blobs(rng, size, 0.2)] = 2
        logits = torch.from_numpy(rng.standard_normal((channels, 24, 24)).astype(np.float32)) * 4
        expected = val.class_metrics_row(softmax_argmax(logits, size), gt, channels - 1)
        assert val.image_metrics(logits, gt, channels - 1) == pytest.approx(expected, rel=1e-12)
        truth = val.prepare_ground_truth(gt, channels - 1)
        assert val.image_metrics(logits, torch.from_numpy(gt), channels - 1, truth=truth) == pytest.approx(expected)
    with pytest.raises(ValueError, match="must be 2 x h x w"):
        val.image_metrics(logits, gt, 2 - 1)


def test_device_resident_path_gives_the_host_results(monkeypatch):
    """The accelerator code path (torch tensors end to end, ground truth kept as a tensor), run on the CPU."""
    rng = np.random.default_rng(5)
    cases = []
    for channels, size in ((2, (203, 310)), (4, (180, 240))):
        gt = random_blobs(rng, size, 0.3).astype(np.uint8) * rng.integers(1, channels, size).astype(np.uint8)
        logits = torch.from_numpy(rng.standard_normal((channels, 20, 20)).astype(np.float32)) * 4
        logits[0] = 0.0 if channels == 2 else logits[0]
        cases.append((logits, gt, channels - 1, val.image_metrics(logits, gt, channels - 1, spacing=0.5)))
    for pred, _ in mask_pairs(seed=4, count=8):
        assert val.boundary_points(torch.from_numpy(pred)).tolist() == val.boundary_points(pred).tolist()
    monkeypatch.setattr(val, "_device_resident", lambda device: True)
    for logits, gt, num_classes, host_row in cases:
        truth = val.prepare_ground_truth(gt, num_classes, "cpu")
        assert isinstance(truth.labels, torch.Tensor)  # kept "on the device" once
        assert val.image_metrics(logits, gt, num_classes, spacing=0.5, truth=truth) == host_row
        assert val.image_metrics(logits, gt, num_classes, spacing=0.5) == host_row


def test_boundary_points_are_argwhere_of_the_boundary():
    for pred, gt in mask_pairs(seed=2, count=40):
        for mask in (pred, gt):
            np.testing.assert_array_equal(val.boundary_points(mask), np.argwhere(val.boundary(mask)).reshape(-1, 2))


# ---------------------------------------------------------------------------------------------- validate


def val_loader(root: Path, batch_size: int, img_size: int = 64) -> DataLoader:
    dataset = ds.ValSkinDataset(*ds.find_split(root, "Validation"), img_size)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=ds.collate_val)


def test_validate_constant_prediction_matches_per_image_metrics(synthetic_root):
    """Foreground logit +3 everywhere -> every pixel is lesion at the original size."""
    loader = val_loader(synthetic_root, batch_size=2)
    result = val.validate(lambda x: torch.stack([torch.zeros(len(x), 8, 8), torch.full((len(x), 8, 8), 3.0)], 1),
                          loader, 1, "cpu")
    dataset = loader.dataset
    assert [r["name"] for r in result["rows"]] == dataset.names
    for row, i in zip(result["rows"], range(len(dataset))):
        gt = dataset.original_mask(i)
        expected = val.segmentation_metrics(np.ones_like(gt), gt)
        assert row == pytest.approx(dict(name=dataset.names[i], index=i, **expected))
    for key in val.METRIC_NAMES:
        assert result["mean"][key] == pytest.approx(np.mean([r[key] for r in result["rows"]]))
    assert result["per_class"] == [(result["mean"]["dice"], result["mean"]["hd95"])]


def test_validate_upsamples_logits_to_each_original_size(synthetic_root):
    """A left/right logit step at 8 x 8 must become a left/right split at every image's own size."""
    def predict(images):
        fg = torch.full((len(images), 8, 8), -2.0)
        fg[..., :4] = 2.0
        return torch.stack([torch.zeros_like(fg), fg], 1)

    loader = val_loader(synthetic_root, batch_size=3)
    dataset = loader.dataset
    result = val.validate(predict, loader, 1, "cpu")
    for row in result["rows"]:
        gt = dataset.original_mask(row["index"])
        half = np.zeros_like(gt)
        half[:, : gt.shape[1] // 2] = 1  # widths are even (128 px), so bilinear puts the edge exactly mid-way
        assert row["dice"] == pytest.approx(val.segmentation_metrics(half, gt)["dice"])
        assert row["hd95"] == pytest.approx(val.segmentation_metrics(half, gt)["hd95"])


def test_validate_batching_does_not_change_results(synthetic_root):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 2, 16, 16, generator=gen) * 3

    def by_name(batch_size):
        loader = val_loader(synthetic_root, batch_size=batch_size)
        seen = []

        def predict(images):
            start = len(seen)
            seen.extend(range(start, start + len(images)))
            return logits[start : start + len(images)]

        return val.validate(predict, loader, 1, "cpu")

    one, three = by_name(1), by_name(3)
    assert one["rows"] == three["rows"]
    assert len({r["dice"] for r in one["rows"]}) > 1


def test_validate_multiclass_and_shape_errors(synthetic_root):
    loader = val_loader(synthetic_root, batch_size=2)

    def three_channels(images):
        logits = torch.zeros(len(images), 3, 8, 8)
        logits[:, 1, :, :4] = 5.0  # class 1 on the left, class 2 on the right
        logits[:, 2, :, 4:] = 5.0
        return logits

    result = val.validate(three_channels, loader, 2, "cpu")
    assert len(result["per_class"]) == 2
    row = result["rows"][0]
    gt = loader.dataset.original_mask(0)
    left = np.zeros_like(gt)
    left[:, : gt.shape[1] // 2] = 1
    assert row["dice_c1"] == pytest.approx(val.segmentation_metrics(left, gt)["dice"])
    # Class 2 is predicted on the right but absent from the (binary) ground truth.
    assert row["dice_c2"] == 0.0 and row["hd95_c2"] == pytest.approx(np.hypot(*gt.shape))
    assert row["dice"] == pytest.approx((row["dice_c1"] + row["dice_c2"]) / 2)
    with pytest.raises(ValueError, match=r"expected 2 x 2 x h x w for num_classes=1"):
        val.validate(three_channels, loader, 1, "cpu")


# ---------------------------------------------------------------------------------------------- CLI


def write_predictions(root: Path, pred_dir: Path) -> None:
    """Perturbed ground truth (dilated / eroded / shifted / empty / exact) as 0-255 PNG predictions."""
    pred_dir.mkdir()
    image_dir, mask_dir = ds.find_split(root, "Validation")
    for i, mask_path in enumerate(sorted(mask_dir.iterdir())):
        gt = np.asarray(Image.open(mask_path)) > 127
        pred = [binary_dilation(gt, iterations=4), binary_erosion(gt, iterations=3), np.roll(gt, 9, axis=1),
                np.zeros_like(gt), gt][i % 5]
        name = mask_path.name if i % 2 else mask_path.name.replace("_segmentation", "")  # both naming styles
        Image.fromarray(pred.astype(np.uint8) * 255).save(pred_dir / name)


def read_csv(path: Path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_pred_dir_matches_official_scorer(synthetic_root, tmp_path, capsys):
    from isic_challenge_scoring.segmentation import SegmentationScore

    pred_dir = tmp_path / "preds"
    write_predictions(synthetic_root, pred_dir)
    out_csv = tmp_path / "out" / "metrics.csv"
    rc = val.main(["--data_root", str(synthetic_root), "--split", "Validation", "--pred_dir", str(pred_dir),
                   "--output_csv", str(out_csv)])
    assert rc == 0
    rows = read_csv(out_csv)
    assert [r["name"] for r in rows] == [f"ISIC_{10 + i:07d}" for i in range(5)]
    assert list(rows[0]) == ["name", "index", *val.METRIC_NAMES]
    official = SegmentationScore.from_dir(ds.find_split(synthetic_root, "Validation")[1], pred_dir).macro_average
    for key in ISIC_KEYS:
        assert np.mean([float(r[key]) for r in rows]) == pytest.approx(official[key], abs=1e-12), key
    printed = capsys.readouterr().out
    hd = np.array([float(r["hd95"]) for r in rows])
    assert f"hd95: {hd.mean():.4f} ± {hd.std(ddof=1):.4f}" in printed
    assert "5 images" in printed and str(out_csv) in printed


def test_cli_reports_missing_and_mis_sized_predictions(synthetic_root, tmp_path, capsys):
    pred_dir = tmp_path / "preds"
    write_predictions(synthetic_root, pred_dir)
    victim = sorted(pred_dir.iterdir())[1]
    Image.new("L", (10, 10)).save(victim)
    args = ["--data_root", str(synthetic_root), "--pred_dir", str(pred_dir), "--output_csv", str(tmp_path / "m.csv")]
    assert val.main(args) == 2
    assert f"Prediction '{victim}' is 10x10" in capsys.readouterr().err
    victim.unlink()
    assert val.main(args) == 2
    assert "1 of 5 images have no prediction" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()


def test_cli_input_errors(synthetic_root, tmp_path, capsys):
    assert val.main(["--data_root", str(tmp_path), "--pred_dir", str(tmp_path)]) == 2
    assert "No Validation split" in capsys.readouterr().err
    assert val.main(["--data_root", str(synthetic_root), "--checkpoint", str(tmp_path / "best.pth"), "--gpu", "cpu"]) == 2
    assert f"--checkpoint '{tmp_path / 'best.pth'}' does not exist" in capsys.readouterr().err
    assert val.main(["--data_root", str(synthetic_root), "--pred_dir", str(tmp_path), "--img_size", "0"]) == 2
    assert "--img_size must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        val.main(["--data_root", str(synthetic_root)])  # neither --checkpoint nor --pred_dir


def run_cli(argv, capsys) -> str:
    """val.main(argv) must refuse with exit 2 and one line on stderr; that line."""
    assert val.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flag, value, said", [
    ("--img_size", 100, "--img_size must be a multiple of 32 (e.g. 512), got 100"),
    ("--num_workers", -1, "--num_workers must be 0 (load in this process) or more, got -1"),
    ("--max_image_pixels", 0, "--max_image_pixels must be positive, got 0"),
])
def test_cli_flag_values_that_cannot_work(flag, value, said, synthetic_root, tmp_path, capsys):
    """Issue 18: tracebacks (from the model build / the DataLoader) before."""
    err = run_cli(["--data_root", synthetic_root, "--checkpoint", tmp_path / "best.pth", flag, value], capsys)
    assert err == f"error: {said}\n"


def test_cli_unwritable_output_is_refused_before_any_metric(synthetic_root, tmp_path, capsys, monkeypatch):
    """Issue 18: an unwritable --output_csv was a traceback after every metric was computed. (CI runs as root, so the
    read-only file system is injected where the file would be made.)"""
    pred_dir = tmp_path / "preds"
    write_predictions(synthetic_root, pred_dir)
    scored = []
    monkeypatch.setattr(val, "segmentation_metrics", lambda *a, **k: scored.append(1))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(safe_io.tempfile, "mkstemp", read_only)
    out = tmp_path / "out" / "m.csv"
    err = run_cli(["--data_root", synthetic_root, "--pred_dir", pred_dir, "--output_csv", out], capsys)
    assert err == (f"error: --output_csv {out}: cannot write there (Read-only file system); choose another "
                   "--output_csv (nothing was evaluated)\n")
    assert scored == [], "metrics were computed for an output that cannot be written"


def test_cli_failed_write_keeps_the_means_on_screen(synthetic_root, tmp_path, capsys, monkeypatch):
    pred_dir = tmp_path / "preds"
    write_predictions(synthetic_root, pred_dir)

    def disk_full(rows, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(val, "write_csv", disk_full)
    assert val.main(["--data_root", str(synthetic_root), "--pred_dir", str(pred_dir)]) == 2
    out, err = capsys.readouterr()
    assert "5 images" in out and "dice:" in out
    assert "--output_csv" in err and "No space left on device" in err and "the means above" in err


def test_cli_corrupt_prediction_names_pred_dir_and_file(synthetic_root, tmp_path, capsys):
    pred_dir = tmp_path / "preds"
    write_predictions(synthetic_root, pred_dir)
    victim = sorted(pred_dir.iterdir())[2]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    err = run_cli(["--data_root", synthetic_root, "--pred_dir", pred_dir, "--output_csv", tmp_path / "m.csv"], capsys)
    assert err.startswith(f"error: --pred_dir '{pred_dir}': Cannot decode mask '{victim}'"), err


def test_cli_pred_dir_default_csv_goes_inside_each_prediction_folder(synthetic_root, tmp_path, capsys):
    """Issue 18: it went to the parent folder, where a second prediction folder overwrote the first one's."""
    first, second = tmp_path / "run_a", tmp_path / "run_b"
    write_predictions(synthetic_root, first)
    write_predictions(synthetic_root, second)
    for path in second.iterdir():  # the second predicts nothing
        Image.fromarray(np.zeros(np.asarray(Image.open(path)).shape, np.uint8)).save(path)
    for folder in (first, second):
        assert val.main(["--data_root", str(synthetic_root), "--pred_dir", str(folder)]) == 0
    assert not (tmp_path / "metrics_Validation.csv").exists()
    dice = {f: [float(r["dice"]) for r in read_csv(f / "metrics_Validation.csv")] for f in (first, second)}
    assert max(dice[first]) > 0.5 and max(dice[second]) == 0.0
    assert str(first / "metrics_Validation.csv") in capsys.readouterr().out


@pytest.mark.parametrize("source", ["--pred_dir", "--checkpoint"])
def test_cli_refuses_ground_truth_without_any_lesion(source, synthetic_copy, tmp_path, capsys):
    """Issue 18: all-empty masks gave Dice 1.0 to any model that predicts nothing."""
    _, masks = ds.find_split(synthetic_copy, "Validation")
    for path in masks.iterdir():
        Image.fromarray(np.zeros(np.asarray(Image.open(path)).shape, np.uint8)).save(path)
    given = tmp_path / "given"
    given.mkdir() if source == "--pred_dir" else given.write_bytes(b"never read")
    err = run_cli(["--data_root", synthetic_copy, source, given, "--gpu", "cpu", "--output_csv", tmp_path / "m.csv"],
                  capsys)
    assert err.startswith(f"error: --data_root {synthetic_copy}: all 3 ground-truth masks of '{masks}' are empty "
                          "(no lesion pixel): any model, even one that predicts nothing, would score Dice 1.0"), err


def test_cli_image_header_over_the_limit_names_file_limit_and_flag(synthetic_copy, tmp_path, capsys, monkeypatch,
                                                                  claim_size):
    """Issue 18: an image header claiming 200 MP was PIL's DecompressionBombError traceback."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    images, _ = ds.find_split(synthetic_copy, "Validation")
    jpeg = images / "ISIC_0000007.jpg"
    victim = jpeg.with_suffix(".png")
    Image.open(jpeg).save(victim)
    jpeg.unlink()
    claim_size(victim, 20_000, 10_000)
    argv = ["--data_root", synthetic_copy, "--pred_dir", tmp_path, "--output_csv", tmp_path / "m.csv"]
    err = run_cli(argv, capsys)
    assert err == (f"error: --data_root {synthetic_copy}: '{victim}' claims 200,000,000 pixels in its header, more "
                   f"than the limit of {ds.DEFAULT_MAX_IMAGE_PIXELS:,} (a guard against decompression bombs: small "
                   "files that unpack into gigabytes). If the image is genuine, pass --max_image_pixels 200000000 (or "
                   "more); otherwise replace or remove it.\n")
    assert "--max_image_pixels" not in run_cli(argv + ["--max_image_pixels", 200_000_000], capsys)


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory) -> Path:
    """A hiera_t LoRA_Sam state dict (64 px, rank 4) whose tensors are expanded zeros: the right keys and shapes
    in a small file."""
    net = build_model("sam2.1_hiera_t", None, 64, rank=4, num_classes=1, device="cpu")
    path = tmp_path_factory.mktemp("model") / "best_model_dice0.5000.pth"
    torch.save({k: torch.zeros(()).expand(v.shape) for k, v in net.state_dict().items()}, path)
    return path


@pytest.mark.parametrize("holds, said", [
    ("resume_state", "is a trainer resume state (last_state.pth: settings, trainable weights, optimiser), not a "
                     "model; a trained model is a best_model_dice*.pth the trainer saved in the same run folder"),
    ("sam2_weights", "holds SAM2 weights (an official SAM2 checkpoint?), not a trained LoRA_Sam; a trained model is "
                     "a best_model_dice*.pth the trainer saved (pass it as --sam_ckpt, and the trained model as "
                     "--checkpoint)"),
    ("no_state_dict", "holds a list, not a model state dict; a trained model is a best_model_dice*.pth the trainer "
                      "saved"),
    ("lora_file", "is a LoRA file (LoRA matrices and decoders only, save_lora_parameters), not a whole model"),
    ("config", "is not a readable PyTorch checkpoint: it is not a file written by torch.save at all (it starts with "
               "b'# @p'; a YAML config? were a config and a checkpoint swapped?)"),
])
def test_cli_checkpoint_that_is_no_trained_model_says_what_it_is(holds, said, synthetic_root, tmp_path, capsys):
    """Issue 18: val.py given last_state.pth printed 30 KB of key names; these are said before a model is built."""
    path = tmp_path / "given.pth"
    if holds == "resume_state":
        torch.save({"args": {"img_size": 64}, "trainable": {"sam.x": torch.zeros(2)}, "optimizer": {}}, path)
    elif holds == "sam2_weights":
        torch.save({"model": {"image_encoder.trunk.pos_embed": torch.zeros(1, 96, 7, 7)}}, path)
    elif holds == "no_state_dict":
        torch.save([torch.zeros(2)], path)
    elif holds == "lora_file":
        torch.save({"sam.image_encoder.trunk.blocks.0.attn.qkv.lora_a_q.weight": torch.zeros(4, 96)}, path)
    else:
        path.write_text("# @package _global_\n\nmodel:\n  _target_: sam2.modeling.sam2_base.SAM2Base\n")
    err = run_cli(["--data_root", synthetic_root, "--checkpoint", path, "--gpu", "cpu", "--model_cfg", "sam2.1_hiera_t",
                   "--img_size", "64"], capsys)
    assert err.startswith(f"error: --checkpoint: {path} {said}")


def test_cli_config_and_checkpoint_swapped(tiny_model_file, synthetic_root, capsys):
    err = run_cli(["--data_root", synthetic_root, "--checkpoint", tiny_model_file, "--model_cfg", tiny_model_file,
                   "--gpu", "cpu", "--img_size", "64"], capsys)
    assert err.startswith(f"error: --model_cfg {tiny_model_file}: SAM2 config {tiny_model_file} is a PyTorch "
                          "checkpoint (a zip archive), not a YAML config; were the config and the checkpoint swapped?")


def test_cli_model_of_another_size_is_one_short_line(tiny_model_file, synthetic_root, tmp_path, capsys):
    """Issue 18: a model of another size printed 203 lines of keys (70 KB); now counts, a few names, the sizes."""
    state = torch.load(tiny_model_file, weights_only=True)
    prefix = "sam.image_encoder.trunk.blocks."
    added = {k.replace(f"{prefix}11.", f"{prefix}{i}.", 1): v for i in range(12, 16)
             for k, v in state.items() if k.startswith(f"{prefix}11.")}  # blocks 12-15: looks like hiera_s
    state.update(added)
    path = tmp_path / "hiera_s_like.pth"
    torch.save(state, path)
    err = run_cli(["--data_root", synthetic_root, "--checkpoint", path, "--model_cfg", "sam2.1_hiera_t", "--gpu", "cpu",
                   "--img_size", "64"], capsys)
    assert err.startswith(f"error: --checkpoint does not fit --model_cfg sam2.1_hiera_t --rank 4 --num_classes 1 "
                          f"--lora_width input: {path} is another model than the one built here: {len(added)} "
                          f"unexpected (e.g. {prefix}12.")
    assert ("The file holds hiera_s (embed_dim 96, 16 blocks), the model is hiera_t (embed_dim 96, 12 blocks): "
            "different model sizes; use the config of the file's size (sam2.1_hiera_s); pass the --model_cfg, --rank, "
            "--num_classes and --lora_width it was trained with") in err
    assert len(err) < 800, len(err)  # was 70 KB


def test_model_state_of_another_lora_rank_says_both_ranks(tiny_model_file):
    from sam_lora_image_encoder_prompt import ModelFileError, load_model_state

    net = build_model("sam2.1_hiera_t", None, 64, rank=2, num_classes=1, device="cpu")
    with pytest.raises(ModelFileError, match=r"of another shape \(e\.g\. .*lora_a_q\.weight: file \(4, 96\), model "
                                             r"\(2, 96\)\); LoRA rank: file 4, model 2$") as info:
        load_model_state(net, torch.load(tiny_model_file, weights_only=True), tiny_model_file)
    assert info.value.holds == "other_model"


@pytest.mark.slow
def test_cli_checkpoint_round_trip(synthetic_root, tmp_path):
    """A saved LoRA_Sam state dict (tiny model, 64 px) is restored exactly by load_model_for_eval and scored."""
    trained = build_model("sam2.1_hiera_t", None, 64, rank=4, num_classes=1, device="cpu", seed=1)
    with torch.no_grad():
        for p in trained.parameters():  # move every weight off its initial value so a missed load would show
            p.add_(0.01 * torch.randn_like(p))
    trained.eval()
    checkpoint = tmp_path / "best_model_dice0.5000.pth"
    torch.save(trained.state_dict(), checkpoint)
    images = torch.stack([ds.ValSkinDataset(*ds.find_split(synthetic_root, "Validation"), 64)[i]["image"]
                          for i in range(2)])
    predict = val.load_model_for_eval(checkpoint, "sam2.1_hiera_t", None, 64, 1, 4, torch.device("cpu"))
    with torch.no_grad():
        expected = trained.decode(trained.encode(images), 1)["low_res_logits"]
        got = predict(images)
    assert got.shape == (2, 2, 16, 16)
    torch.testing.assert_close(got, expected)  # fails if the weights were not all restored (perturbed above)
    assert val.main(["--data_root", str(synthetic_root), "--checkpoint", str(checkpoint), "--model_cfg",
                     "sam2.1_hiera_t", "--img_size", "64", "--gpu", "cpu", "--batch_size", "3"]) == 0
    rows = read_csv(tmp_path / "metrics_Validation.csv")  # default: beside the checkpoint
    assert len(rows) == 5 and all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)


# ----------------------------------------------------------------------------- the reference's protocol


def reference_metrics_transcribed(logits: torch.Tensor, label: np.ndarray, num_classes: int):
    """The reference's val.py test_medical_image, written out, on logits upsampled bilinearly to the label's size
    (the one assumption: its logits come at that size): softmax; per foreground class present in the label, soft
    Dice (2 sum(p g) + 1e-5) / (sum(p) + sum(g) + 1e-5) and medpy's hd95 of p > 0.5 at spacing 0.1, capped at 100
    (an empty p > 0.5: min(diagonal * 0.1, 100)); an absent class: 0 and 0. Means over the foreground classes."""
    from medpy.metric.binary import hd95 as medpy_hd95

    up = F.interpolate(logits[None].double(), size=label.shape, mode="bilinear", align_corners=False)[0].numpy()
    p_all = np.exp(up) / np.exp(up).sum(axis=0, keepdims=True)
    dices, hds = [], []
    for c in range(1, num_classes + 1):
        p, g = p_all[c], (label == c).astype(np.float64)
        if g.sum() == 0:
            dices.append(0.0), hds.append(0.0)
            continue
        dices.append((2 * np.sum(p * g) + 1e-5) / (np.sum(p) + np.sum(g) + 1e-5))
        binary = (p > 0.5).astype(np.uint8)
        if binary.sum() > 0:
            hds.append(min(float(medpy_hd95(binary, g.astype(np.uint8), (0.1, 0.1))), 100.0))
        else:
            hds.append(min(np.sqrt(g.shape[0] ** 2 + g.shape[1] ** 2) * 0.1, 100.0))
    return np.mean(dices), np.mean(hds)


@pytest.mark.parametrize("case", ["overlap", "empty_truth", "empty_prediction", "far", "two_classes"])
def test_reference_protocol_is_the_reference_soft_dice_at_model_size(case):
    rng = np.random.default_rng(["overlap", "empty_truth", "empty_prediction", "far", "two_classes"].index(case))
    size, num_classes = (1100 if case == "far" else 64), (2 if case == "two_classes" else 1)
    label = random_blobs(rng, (size, size), 0.3).astype(np.int64)
    logits = torch.from_numpy(3 * rng.standard_normal((num_classes + 1, size // 4, size // 4))).float()
    logits[0] = 0
    if case == "empty_truth":
        label[:] = 0
    if case == "empty_prediction":
        logits[1] = -20
    if case == "far":  # prediction in the top-left corner, lesion in the bottom-right: HD95 above the cap of 100
        label[:] = 0
        label[-100:, -100:] = 1
        logits[1] = -20
        logits[1, :25, :25] = 20
    dice, hd = reference_metrics_transcribed(logits, label, num_classes)
    got = val.reference_image_metrics(logits, torch.from_numpy(label), num_classes)
    assert got["dice"] == pytest.approx(dice, abs=1e-6) and got["hd95"] == pytest.approx(hd, abs=1e-6)
    expected = dict(empty_truth=(0.0, 0.0), far=(None, 100.0), empty_prediction=(None, np.hypot(64, 64) * 0.1))
    for want, value in zip(expected.get(case, (None, None)), (got["dice"], got["hd95"])):
        assert want is None or value == pytest.approx(want, abs=1e-9), case


def test_validate_reference_scores_each_image_and_averages(synthetic_root):
    images, masks = ds.find_split(synthetic_root, "Validation")
    dataset = ds.ValSkinDataset(images, masks, 64)
    loader = DataLoader(dataset, batch_size=2, collate_fn=ds.collate_val)
    gen = torch.Generator().manual_seed(3)

    def predict(batch_images):
        logits = torch.zeros(batch_images.shape[0], 2, 16, 16)
        logits[:, 1] = 4 * torch.randn(batch_images.shape[0], 16, 16, generator=gen)
        predict.seen.append(logits)
        return logits

    predict.seen = []
    result = val.validate_reference(predict, loader, 1, "cpu")
    logits = torch.cat(predict.seen)
    per_image = [reference_metrics_transcribed(logits[i], dataset[i]["label"].numpy(), 1) for i in range(len(dataset))]
    assert [r["name"] for r in result["rows"]] == dataset.names
    assert result["mean"]["dice"] == pytest.approx(np.mean([d for d, _ in per_image]), abs=1e-6)
    assert result["mean"]["hd95"] == pytest.approx(np.mean([h for _, h in per_image]), abs=1e-6)


# ----------------------------------------------------------------------------- issue 26: hostile inputs, round 2

@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-inf"])
def test_cli_spacing_must_be_a_positive_finite_pixel_size(value, synthetic_root, tmp_path, capsys):
    """--spacing inf was a ValueError traceback (0, negative and NaN were refused already)."""
    err = run_cli(["--data_root", synthetic_root, "--checkpoint", tmp_path / "best.pth", f"--spacing={value}"], capsys)
    assert err == f"error: --spacing must be a positive, finite pixel size (e.g. 0.1 for mm), got {float(value)}\n"
    with pytest.raises(ValueError, match="finite"):
        val.segmentation_metrics(np.ones((4, 4)), np.zeros((4, 4)), spacing=float(value))


def test_cli_refuses_a_checkpoint_holding_nan_or_inf_naming_the_tensors(tiny_model_file, synthetic_root, tmp_path,
                                                                        capsys):
    """A checkpoint of a diverged model was scored (exit 0, metrics written); now refused as the trainer refuses
    non-finite weights, naming the first tensors."""
    state = torch.load(tiny_model_file, weights_only=True)
    floats = [k for k, v in state.items() if v.is_floating_point()]
    broken = [floats[2], floats[5], floats[7], floats[-1]]  # in the file's order
    for key, bad in zip(broken, (float("nan"), float("inf"), float("-inf"), float("nan"))):
        state[key] = torch.zeros(state[key].shape).index_fill_(0, torch.tensor([0]), bad)  # one bad value each
    path = tmp_path / "best_model_dice0.9000.pth"
    torch.save(state, path)
    err = run_cli(["--data_root", synthetic_root, "--checkpoint", path, "--model_cfg", "sam2.1_hiera_t", "--gpu", "cpu",
                   "--img_size", "64"], capsys)
    assert err == (f"error: --checkpoint: {path} holds NaN or inf in 4 tensors ({broken[0]}, {broken[1]}, {broken[2]} "
                   "and 1 more): a model saved after training diverged, whose scores would mean nothing; use a "
                   "checkpoint saved before the divergence\n")
    assert not (tmp_path / "metrics_Validation.csv").exists()


def test_cli_output_that_is_one_of_its_inputs_is_refused_and_left_as_it_was(tiny_model_file, synthetic_copy, tmp_path,
                                                                          capsys):
    """--output_csv naming the --checkpoint overwrote it with the metrics; no output may replace an input: the
    checkpoint (by its path, a symbolic or a hard link to it), the split's images and masks, the predictions."""
    checkpoint = tmp_path / "best_model_dice0.5000.pth"
    checkpoint.write_bytes(tiny_model_file.read_bytes())
    (tmp_path / "link.pth").symlink_to(checkpoint)
    os.link(checkpoint, tmp_path / "hard_link.csv")
    model = ["--model_cfg", "sam2.1_hiera_t", "--img_size", "64", "--gpu", "cpu", "--checkpoint", checkpoint]
    images, masks = ds.find_split(synthetic_copy, "Validation")
    pred_dir = tmp_path / "preds"
    pred_dir.mkdir()
    for mask in masks.iterdir():
        (pred_dir / mask.name).write_bytes(mask.read_bytes())
    mask, image, prediction = sorted(masks.iterdir())[1], sorted(images.iterdir())[0], sorted(pred_dir.iterdir())[2]
    os.link(mask, tmp_path / "mask_link.csv")
    scored = ["--pred_dir", pred_dir]
    cases = [(model, checkpoint, checkpoint, "--checkpoint"),
             (model, tmp_path / "link.pth", checkpoint, "--checkpoint"),
             (model, tmp_path / "hard_link.csv", checkpoint, "--checkpoint"), (scored, mask, mask, "--data_root"),
             (scored, image, image, "--data_root"), (scored, tmp_path / "mask_link.csv", mask, "--data_root"),
             (scored, prediction, prediction, "--pred_dir")]
    before = {path: path.read_bytes() for path in (checkpoint, mask, image, prediction)}
    for source, output, replaced, flag in cases:
        err = run_cli(["--data_root", synthetic_copy, *source, "--output_csv", output], capsys)
        assert err == (f"error: --output_csv {output} is {replaced}, an input ({flag}): writing the metrics there "
                       "would replace it; choose another --output_csv (nothing was evaluated)\n"), err
        assert {path: path.read_bytes() for path in before} == before
