"""datasets_skin: discovery in both layouts, bad-input errors, decode-once cache, samples, synthetic data."""
from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation
from torch.utils.data import DataLoader

import datasets_skin as ds
import synthetic_isic
from datasets_skin import DatasetError

MEAN = np.array(ds.PIXEL_MEAN).reshape(3, 1, 1)
STD = np.array(ds.PIXEL_STD).reshape(3, 1, 1)


def denormalise(image: torch.Tensor) -> np.ndarray:
    """3 x S x S normalised tensor -> S x S x 3 float in 0..255 (inverse of SAM2's input normalisation)."""
    return ((image.numpy() * STD + MEAN) * 255.0).transpose(1, 2, 0)


def write_pair(image_dir: Path, mask_dir: Path, name: str, size=(40, 30), ext=".jpg", value=200) -> None:
    """A solid image and a mask with a lesion square; ``size`` is (W, H)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 150, 120)).save(image_dir / f"{name}{ext}")
    mask = np.zeros(size[::-1], np.uint8)
    mask[5:15, 5:20] = 255
    Image.fromarray(mask).save(mask_dir / f"{name}_segmentation.png")


# ---------------------------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("layout", [0, 1], ids=["readme", "isic2017"])
def test_find_split_both_layouts(tmp_path, layout):
    for split in ds.SPLITS:
        image_name, mask_name = ds.SPLIT_FOLDERS[split][layout]
        write_pair(tmp_path / image_name, tmp_path / mask_name, "ISIC_0000001")
    for split in ds.SPLITS:
        image_dir, mask_dir = ds.find_split(tmp_path, split)
        assert (image_dir.name, mask_dir.name) == ds.SPLIT_FOLDERS[split][layout]


def test_find_split_errors_name_what_is_missing(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ds.find_split(tmp_path / "nope", "Training")
    with pytest.raises(DatasetError, match="Unknown split"):
        ds.find_split(tmp_path, "Train")
    (tmp_path / "Pictures").mkdir()
    with pytest.raises(DatasetError, match=r"No Test split.*Test_Data/.*ISIC-2017_Test_v2_Data/.*Pictures/"):
        ds.find_split(tmp_path, "Test")
    (tmp_path / "Validation_Data").mkdir()
    with pytest.raises(DatasetError, match="Validation_GroundTruth"):
        ds.find_split(tmp_path, "Validation")


def test_discovery_ignores_superpixels_metadata_hidden_and_sorts(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "gt"
    for name in ("ISIC_0000003", "ISIC_0000001", "ISIC_0000002"):
        write_pair(images, masks, name, ext=".png" if name.endswith("2") else ".jpg")
    Image.new("RGB", (40, 30)).save(images / "ISIC_0000001_superpixels.png")
    (images / "ISIC-2017_Training_Data_metadata.csv").write_text("image_id,age\n")
    (images / "._ISIC_0000001.jpg").write_bytes(b"\x00" * 10)  # macOS resource fork
    (images / "notes.txt").write_text("x")
    samples = ds.discover_samples(images, masks)
    assert [s.name for s in samples] == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
    assert samples[1].image_path.suffix == ".png"
    assert all(s.orig_size == (30, 40) for s in samples)


def test_missing_masks_listed_once_and_left_out(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "gt"
    for i in range(5):
        write_pair(images, masks, f"ISIC_000000{i}")
    (masks / "ISIC_0000001_segmentation.png").unlink()
    (masks / "ISIC_0000003_segmentation.png").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ds.SemiSupervisedSkinDataset(images, masks, 32)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "2 of 5 images" in messages[0]
    assert "ISIC_0000001.jpg" in messages[0] and "ISIC_0000003.jpg" in messages[0]
    assert dataset.names == ["ISIC_0000000", "ISIC_0000002", "ISIC_0000004"]


@pytest.mark.parametrize(
    "damage, match",
    [
        ("garbage_image", r"Cannot read image file .*ISIC_0000001\.jpg"),
        ("truncated_image", r"ISIC_0000001\.jpg.* truncated"),
        ("truncated_mask", r"ISIC_0000001_segmentation\.png.* truncated"),
        ("size_mismatch", r"Mask .*ISIC_0000001_segmentation\.png.* is 20x10 but its image ISIC_0000001\.jpg is 96x"),
        ("gif_as_jpg", r"ISIC_0000001\.jpg.* is a GIF file"),
        ("duplicate", r"Two images share the name 'ISIC_0000001'"),
    ],
)
def test_bad_files_fail_at_construction_naming_the_file(synthetic_copy, damage, match):
    images, masks = ds.find_split(synthetic_copy, "Training")
    image, mask = images / "ISIC_0000001.jpg", masks / "ISIC_0000001_segmentation.png"
    if damage == "garbage_image":
        image.write_bytes(b"this is not a jpeg" * 20)
    elif damage == "truncated_image":
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    elif damage == "truncated_mask":
        mask.write_bytes(mask.read_bytes()[: mask.stat().st_size // 2])  # a cut in its pixel data
    elif damage == "size_mismatch":
        Image.new("L", (20, 10)).save(mask)
    elif damage == "gif_as_jpg":
        Image.new("P", (20, 10)).save(image, format="GIF")
    elif damage == "duplicate":
        shutil.copy(image, images / "ISIC_0000001.png")
    with pytest.raises(DatasetError, match=match):
        ds.SemiSupervisedSkinDataset(images, masks, 32)


def test_empty_split_folder_is_an_error(tmp_path):
    (tmp_path / "Training_Data").mkdir()
    (tmp_path / "Training_GroundTruth").mkdir()
    with pytest.raises(DatasetError, match="contains no .jpg/.jpeg/.png images"):
        ds.SkinLesionDataset(*ds.find_split(tmp_path, "Training"), 32)
    write_pair(tmp_path / "Training_Data", tmp_path / "other", "ISIC_0000001")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError, match="None of the images"):
            ds.SkinLesionDataset(*ds.find_split(tmp_path, "Training"), 32)


def test_corrupt_body_found_at_decode_names_file(synthetic_copy):
    """A file whose header and end marker are fine but whose body is damaged fails on decode, naming it."""
    images, masks = ds.find_split(synthetic_copy, "Training")
    path = images / "ISIC_0000002.jpg"
    data = bytearray(path.read_bytes())
    start = data.index(b"\xff\xda")  # start of scan: replace the compressed data, keep the end-of-image marker
    data[start + 2 : -2] = b"\x00" * (len(data) - start - 4)
    path.write_bytes(bytes(data))
    dataset = ds.SkinLesionDataset(images, masks, 32)
    with pytest.raises(DatasetError, match=r"ISIC_0000002\.jpg"):
        dataset[2]


# ---------------------------------------------------------------------------------------------- image modes


def test_grey_rgba_palette_16bit_load_as_rgb(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "gt"
    images.mkdir()
    masks.mkdir()
    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (20, 1))  # 20 x 25
    rgb = np.stack([grey, 255 - grey, np.full_like(grey, 77)], axis=-1)
    Image.fromarray(grey).save(images / "a_grey.png")
    Image.fromarray(grey).save(images / "b_greyjpeg.jpg", quality=100)
    rgba = np.concatenate([rgb, np.full_like(grey, 9)[..., None]], axis=-1)
    Image.fromarray(rgba, "RGBA").save(images / "c_rgba.png")
    Image.fromarray(rgb).quantize(colors=64).save(images / "d_palette.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(images / "e_16bit.png")
    mask = np.zeros((20, 25), np.uint8)
    mask[:, 12:] = 255
    for stem in ("a_grey", "b_greyjpeg", "c_rgba", "d_palette", "e_16bit"):
        Image.fromarray(mask).save(masks / f"{stem}_segmentation.png")
    dataset = ds.ValSkinDataset(images, masks, 25)
    assert Image.open(images / "e_16bit.png").mode.startswith("I")  # really a 16-bit file
    decoded = {name: dataset.samples[i].image_path for i, name in enumerate(dataset.names)}
    exact = {"a_grey": np.repeat(grey[..., None], 3, -1), "c_rgba": rgb, "e_16bit": np.repeat(grey[..., None], 3, -1)}
    for name, expected in exact.items():
        out = ds.decode_image(decoded[name], None)
        assert out.shape == (20, 25, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)
    jpeg = ds.decode_image(decoded["b_greyjpeg"], None).astype(int)
    assert np.abs(jpeg - grey[..., None]).max() <= 3
    palette = ds.decode_image(decoded["d_palette"], None).astype(int)
    assert np.abs(palette - rgb).mean() < 6  # 64-colour quantisation of a smooth ramp
    for i in range(len(dataset)):  # the datasets take them too
        assert dataset[i]["image"].shape == (3, 25, 25)


def test_mask_modes_binarised_above_127(tmp_path):
    values = np.array([[0, 127, 128, 255]], np.uint8)
    Image.fromarray(values).save(tmp_path / "l.png")
    Image.fromarray(values.astype(np.uint16) * 257).save(tmp_path / "i16.png")
    Image.fromarray(values > 127).save(tmp_path / "one.png")  # mode '1'
    for name in ("l.png", "i16.png", "one.png"):
        np.testing.assert_array_equal(ds.decode_mask(tmp_path / name, None), [[0, 0, 1, 1]])


def test_mask_stored_as_zero_one_is_read_as_lesion_and_noted_once(tmp_path):
    """Issue 9: a {0, 1} mask was thresholded at > 127 and silently became all background."""
    lesion = np.zeros((20, 30), np.uint8)
    lesion[5:12, 8:20] = 1
    path = tmp_path / "a_segmentation.png"
    Image.fromarray(lesion).save(path)
    notes = ds.MaskNotes()
    np.testing.assert_array_equal(ds.decode_mask(path, None, notes), lesion)
    resized = ds.decode_mask(path, 10, notes)
    assert resized.dtype == np.uint8 and set(np.unique(resized)) == {0, 1}
    assert notes.zero_one == {path.name} and not notes.other_values and not notes.empty
    news = notes.news()
    assert [level for level, _ in news] == [logging.INFO] and "0/1" in news[0][1] and path.name in news[0][1]
    assert notes.news() == [], "said once"


def test_other_mask_values_thresholded_with_one_warning_and_empty_masks_counted(tmp_path):
    """{0, 128, 255} is thresholded at 127 as before, with one warning naming a file; all-zero masks stay allowed
    and are counted."""
    three = np.zeros((8, 8), np.uint8)
    three[:4], three[:, :2] = 128, 255
    Image.fromarray(three).save(tmp_path / "b_segmentation.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "d_segmentation.png")
    notes = ds.MaskNotes()
    got = {name: ds.decode_mask(tmp_path / f"{name}_segmentation.png", None, notes) for name in "bd"}
    np.testing.assert_array_equal(got["b"], (three > 127).astype(np.uint8))
    assert not got["d"].any()
    assert notes.other_values == {"b_segmentation.png"} and not notes.zero_one and not notes.colour
    assert notes.empty == {"d_segmentation.png"}
    news = notes.news()
    warnings_ = [line for level, line in news if level == logging.WARNING]
    assert len(warnings_) == 1 and "b_segmentation.png" in warnings_[0] and "thresholded at 127" in warnings_[0]
    assert any("1 of the masks read so far are empty" in line for _, line in news)
    ds.decode_mask(tmp_path / "d_segmentation.png", None, notes)
    assert notes.news() == [], "the same masks again: nothing new to say"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "e_segmentation.png")
    ds.decode_mask(tmp_path / "e_segmentation.png", None, notes)
    assert [line for _, line in notes.news()] == ["2 of the masks read so far are empty (no lesion; allowed), "
                                                   "e.g. d_segmentation.png"]


def lesion_square(shape=(20, 30)) -> np.ndarray:
    lesion = np.zeros(shape, bool)
    lesion[4:12, 6:20] = True
    return lesion


def test_colour_and_palette_masks_read_by_their_mode(tmp_path):
    """Issue 18: a lesion stored as red (255, 0, 0) or as a palette colour (128, 0, 0) has a luminance below 127 and
    was read as all skin (Dice 1.0 on empty masks). RGB(A): lesion where the largest colour channel is above 127
    (fully transparent pixels are skin); palette: lesion where the colour is not the palette's black."""
    lesion = lesion_square()
    rgb = np.zeros(lesion.shape + (3,), np.uint8)
    rgb[lesion] = (255, 0, 0)
    rgb[0, 0], rgb[0, 1] = (100, 90, 0), (30, 200, 10)  # anti-aliasing: largest channel 100 (skin), 200 (lesion)
    expected = rgb.max(axis=2) > 127
    Image.fromarray(rgb).save(tmp_path / "red.png")
    rgba = np.concatenate([rgb, np.full(lesion.shape + (1,), 255, np.uint8)], axis=-1)
    rgba[~expected] = (255, 255, 255, 0)  # skin: transparent white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "red_on_clear.png")
    palette = Image.fromarray(np.where(lesion, 0, 3).astype(np.uint8), "P")  # black is entry 3, not 0
    palette.putpalette([128, 0, 0, 0, 255, 0, 9, 9, 9, 0, 0, 0])
    palette.save(tmp_path / "palette.png")
    notes = ds.MaskNotes()
    np.testing.assert_array_equal(ds.decode_mask(tmp_path / "red.png", None, notes), expected)
    np.testing.assert_array_equal(ds.decode_mask(tmp_path / "red_on_clear.png", None, notes), expected)
    np.testing.assert_array_equal(ds.decode_mask(tmp_path / "palette.png", None, notes), lesion)
    content = ds.read_mask(tmp_path / "palette.png")
    assert (content.mode, content.kind, content.size, list(content.levels)) == ("P", "0/255", (20, 30), [0, 255])
    colour = [line for _, line in notes.news() if "colour masks" in line]
    assert len(colour) == 1 and "palette.png" in colour[0] and "largest colour channel is above 127" in colour[0]


def test_unsupported_mask_modes_and_blackless_palettes_are_refused(tmp_path):
    Image.new("LA", (8, 8)).save(tmp_path / "grey_alpha.png")
    with pytest.raises(DatasetError, match=r"grey_alpha\.png' is a LA image; save masks as 8-bit grey"):
        ds.decode_mask(tmp_path / "grey_alpha.png", None)
    palette = Image.fromarray(np.zeros((8, 8), np.uint8), "P")
    palette.putpalette([255, 255, 255, 200, 0, 0])
    palette.save(tmp_path / "no_black.png")
    with pytest.raises(DatasetError, match=r"no_black\.png' is a palette image without a black colour"):
        ds.decode_mask(tmp_path / "no_black.png", None)


def test_mask_with_pixels_none_of_which_is_lesion_is_an_error(tmp_path):
    """Non-zero pixels that all read as skin (grey {0, 60}, dark red, colour under full transparency) would make
    the mask silently empty; a mask that is really empty (all black, opaque or not) stays allowed."""
    lesion = lesion_square()
    grey = np.where(lesion, 60, 0).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "faint_grey.png")
    Image.fromarray(np.stack([grey, grey * 0, grey * 0], axis=-1)).save(tmp_path / "dark_red.png")
    clear = np.zeros(lesion.shape + (4,), np.uint8)
    clear[lesion] = (255, 0, 0, 0)
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear_red.png")
    for name, mode in (("faint_grey", "L"), ("dark_red", "RGB"), ("clear_red", "RGBA")):
        with pytest.raises(DatasetError, match=rf"{name}\.png' has non-zero pixels \({mode} levels 0(, 60)?\) but "
                                               "none reads as lesion"):
            ds.decode_mask(tmp_path / f"{name}.png", None)
        assert ds.read_mask(tmp_path / f"{name}.png").faint
    black = np.zeros(lesion.shape + (4,), np.uint8)
    black[..., 3] = 255
    Image.fromarray(black, "RGBA").save(tmp_path / "empty_rgba.png")
    assert not ds.decode_mask(tmp_path / "empty_rgba.png", None).any()


def test_validation_set_of_empty_masks_is_refused(synthetic_copy):
    """Issue 18: all-empty ground truth gives Dice 1.0 to a model predicting nothing; it is a typed error."""
    images, masks = ds.find_split(synthetic_copy, "Validation")
    paths = sorted(masks.iterdir())
    for path in paths:
        Image.fromarray(np.zeros(np.asarray(Image.open(path)).shape, np.uint8)).save(path)
    dataset = ds.ValSkinDataset(images, masks, 32)
    with pytest.raises(ds.NoLesionError, match=rf"all 3 ground-truth masks of '{masks}' are empty"):
        dataset.require_a_lesion()
    Image.fromarray(lesion_square(np.asarray(Image.open(paths[0])).shape).astype(np.uint8) * 255).save(paths[0])
    fresh = ds.ValSkinDataset(images, masks, 32)
    fresh.require_a_lesion()
    assert len(fresh._orig_masks) == 1, "stops at the first mask with a lesion"
    with pytest.raises(ds.NoLesionError, match="all 2 ground-truth masks"):
        fresh.require_a_lesion([1, 2])


def test_image_header_claiming_200_megapixels_names_file_and_limit(tmp_path, monkeypatch, claim_size):
    """Issue 18: PIL's DecompressionBombError/Warning traceback; now the file, its size, the limit, how to raise it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    images, masks = tmp_path / "img", tmp_path / "gt"
    write_pair(images, masks, "ISIC_0000001", ext=".png")
    for path in (images / "ISIC_0000001.png", masks / "ISIC_0000001_segmentation.png"):
        claim_size(path, 20_000, 10_000)
    limit = ds.DEFAULT_MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ds.ImageTooLargeError, match=rf"ISIC_0000001\.png' claims 200,000,000 pixels in its header, "
                                                        rf"more than the limit of {limit:,} \(a guard against decompression bombs: "
                                                        r"small files that unpack into gigabytes\)\. If the image is "
                                                        "genuine, pass a larger max_image_pixels"):
            ds.SemiSupervisedSkinDataset(images, masks, 32)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    dataset = ds.SemiSupervisedSkinDataset(images, masks, 32, max_image_pixels=200_000_000)
    assert dataset.samples[0].orig_size == (10_000, 20_000)
    claim_size(images / "ISIC_0000001.png", 40_000, 40_000)  # beyond what PIL opens at all at that limit
    with pytest.raises(ds.ImageTooLargeError, match="claims more pixels than PIL opens"):
        ds.SemiSupervisedSkinDataset(images, masks, 32)


def test_dangling_image_link_is_said_and_left_out(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "gt"
    for name in ("ISIC_0000001", "ISIC_0000002"):
        write_pair(images, masks, name)
    (images / "ISIC_0000003.jpg").symlink_to(tmp_path / "gone" / "ISIC_0000003.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ds.SkinLesionDataset(images, masks, 32)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and f"left out 1 image link(s) in '{images}' that point to missing files" in messages[0]
    assert f"ISIC_0000003.jpg -> {tmp_path / 'gone' / 'ISIC_0000003.jpg'}" in messages[0]
    assert dataset.names == ["ISIC_0000001", "ISIC_0000002"]


def test_unlabeled_masks_are_never_decoded_so_never_noted(synthetic_copy):
    images, masks = ds.find_split(synthetic_copy, "Training")
    for path in masks.iterdir():  # every mask stored as 0/1
        Image.fromarray((np.asarray(Image.open(path)) > 127).astype(np.uint8)).save(path)
    dataset = ds.SemiSupervisedSkinDataset(images, masks, 32)
    dataset.mark_labeled([2])
    dataset.preload()
    for i in range(len(dataset)):
        assert bool(dataset[i]["label"].any()) == (i == 2)
    assert dataset.mask_notes.zero_one == {f"{dataset.names[2]}_segmentation.png"}


# ---------------------------------------------------------------------------------------------- samples


def test_training_sample_contents(synthetic_root):
    images, masks = ds.find_split(synthetic_root, "Training")
    dataset = ds.SemiSupervisedSkinDataset(images, masks, 64)
    dataset.mark_labeled([3, 1, 3])
    assert dataset.labeled_indices == [1, 3]
    assert dataset.unlabeled_indices == [i for i in range(len(dataset)) if i not in (1, 3)]
    sample = dataset[3]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
    assert sample["label"].shape == (64, 64) and sample["label"].dtype == torch.int64
    assert sample["is_labeled"] is True and sample["index"] == 3 and sample["name"] == dataset.names[3]
    with Image.open(images / f"{sample['name']}.jpg") as im:
        width, height = im.size
        reference = np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR), np.float64)
        ref_mask = np.asarray(Image.open(masks / f"{sample['name']}_segmentation.png").resize((64, 64), Image.NEAREST))
    assert sample["orig_size"] == (height, width)
    np.testing.assert_allclose(denormalise(sample["image"]), reference, atol=1e-3)  # small: no draft reduction
    np.testing.assert_array_equal(sample["label"].numpy(), ref_mask > 127)
    assert set(np.unique(sample["label"].numpy())) == {0, 1}
    unlabeled = dataset[0]
    assert unlabeled["is_labeled"] is False and int(unlabeled["label"].abs().sum()) == 0


def test_index_errors(synthetic_root):
    dataset = ds.SemiSupervisedSkinDataset(*ds.find_split(synthetic_root, "Training"), 32)
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    with pytest.raises(IndexError):
        dataset.mark_labeled([-1])


def test_unlabeled_samples_never_open_their_mask(synthetic_copy, monkeypatch):
    images, masks = ds.find_split(synthetic_copy, "Training")
    dataset = ds.SemiSupervisedSkinDataset(images, masks, 32)
    dataset.mark_labeled([2])
    opened = []
    real_open = Image.open

    def recording_open(fp, *args, **kwargs):
        opened.append(Path(fp).name)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", recording_open)
    for path in masks.iterdir():  # only the labeled sample's mask remains readable
        if path.name != f"{dataset.names[2]}_segmentation.png":
            path.write_bytes(b"corrupt")
    dataset.preload()
    for i in range(len(dataset)):
        assert dataset[i]["is_labeled"] == (i == 2)
    assert [n for n in opened if n.endswith("_segmentation.png")] == [f"{dataset.names[2]}_segmentation.png"]
    dataset.mark_labeled([0])  # the expert now labels a sample whose mask is broken: clear error naming it
    with pytest.raises(DatasetError, match=f"{dataset.names[0]}_segmentation.png"):
        dataset[0]


def test_each_image_decoded_once(synthetic_root, monkeypatch):
    calls = []
    real = ds.decode_image
    monkeypatch.setattr(ds, "decode_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    images, masks = ds.find_split(synthetic_root, "Training")
    cached = ds.SemiSupervisedSkinDataset(images, masks, 32)
    for _ in range(3):
        for i in range(len(cached)):
            cached[i]
    assert len(calls) == len(cached)
    calls.clear()
    uncached = ds.SemiSupervisedSkinDataset(images, masks, 32, cache=False)
    for _ in range(2):
        for i in range(len(uncached)):
            uncached[i]
    assert len(calls) == 2 * len(uncached)


def test_preloaded_cache_serves_dataloader_workers(synthetic_copy):
    """After preload() the workers need no files: delete them all and iterate with two workers."""
    images, masks = ds.find_split(synthetic_copy, "Training")
    dataset = ds.SemiSupervisedSkinDataset(images, masks, 32)
    dataset.mark_labeled([0, 4])
    expected = [dataset[i] for i in range(len(dataset))]
    fresh = ds.SemiSupervisedSkinDataset(images, masks, 32)
    fresh.mark_labeled([0, 4])
    fresh.preload()
    shutil.rmtree(images)
    shutil.rmtree(masks)
    loader = DataLoader(fresh, batch_size=2, num_workers=2)
    batches = list(loader)
    got_images = torch.cat([b["image"] for b in batches])
    got_labels = torch.cat([b["label"] for b in batches])
    assert torch.equal(got_images, torch.stack([e["image"] for e in expected]))
    assert torch.equal(got_labels, torch.stack([e["label"] for e in expected]))


def test_draft_decode_close_to_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    image, _ = synthetic_isic.synthetic_lesion_image(rng, 768, 1024)
    path = tmp_path / "big.jpg"
    Image.fromarray(image).save(path, quality=95)
    with Image.open(path) as im:
        im.draft("RGB", (256, 256))
        assert im.size[0] < 1024  # the draft really reduces this file at size 128
    fast = ds.decode_image(path, 128, use_draft=True).astype(int)
    full = ds.decode_image(path, 128, use_draft=False).astype(int)
    assert fast.shape == full.shape == (128, 128, 3)
    diff = np.abs(fast - full)
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 3


def test_the_trainer_s_default_decode_is_a_full_decode_then_the_same_resize(tmp_path):
    """The trainer's default (--decode full, the reference's SkinTrainGenerator): every training and validation
    image equals PIL's full decode, convert('RGB'), then a bilinear resize to img_size x img_size, exactly. The
    images are large enough that a draft decode would differ (checked with --decode draft)."""
    import settings
    import trainer

    root = synthetic_isic.make_synthetic_isic(tmp_path / "data", 2, 1, 0, size=1024, seed=2)
    common = ["--data_root", str(root), "--checkpoint", "none", "--img_size", "128", "--output", str(tmp_path / "o")]

    def images_of(argv):
        parser = settings.build_parser()
        train_set, val_set = trainer.load_data(settings.prepare_args(parser, parser.parse_args(argv), argv))
        return [(s.image_path, train_set.resized_image(i)) for i, s in enumerate(train_set.samples)] + \
            [(val_set.dataset.samples[i].image_path, val_set.dataset.resized_image(i)) for i in val_set.indices]

    def plain(path):
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((128, 128), Image.BILINEAR))

    default = images_of(common)
    assert len(default) == 3
    for path, image in default:
        assert np.array_equal(image, plain(path)), path
    drafted = images_of(common + ["--decode", "draft"])
    assert any(not np.array_equal(image, plain(path)) for path, image in drafted), "draft should differ here"


# ---------------------------------------------------------------------------------------------- validation set


def test_val_dataset_and_collate_keep_original_masks(synthetic_root):
    images, masks = ds.find_split(synthetic_root, "Validation")
    dataset = ds.ValSkinDataset(images, masks, 64)
    loader = DataLoader(dataset, batch_size=3, collate_fn=ds.collate_val)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 64, 64) and batch["label"].shape == (3, 64, 64)
    assert len(batch["mask_orig"]) == 3 and batch["name"] == dataset.names[:3]
    sizes = {m.shape for m in batch["mask_orig"]}
    assert len(sizes) > 1  # synthetic images differ in height, so a list (not a stack) is needed
    for i, mask in enumerate(batch["mask_orig"]):
        with Image.open(masks / f"{batch['name'][i]}_segmentation.png") as im:
            np.testing.assert_array_equal(mask, np.asarray(im) > 127)
            assert batch["orig_size"][i] == mask.shape == (im.size[1], im.size[0])
            small = np.asarray(im.resize((64, 64), Image.NEAREST)) > 127
        np.testing.assert_array_equal(batch["label"][i].numpy(), small)
    assert all(batch["is_labeled"])


# ---------------------------------------------------------------------------------------------- synthetic data


def test_synthetic_data_layout_and_determinism(tmp_path):
    a = synthetic_isic.make_synthetic_isic(tmp_path / "a", 4, 2, 2, size=96, seed=5)
    b = synthetic_isic.make_synthetic_isic(tmp_path / "b", 4, 2, 2, size=96, seed=5)
    c = synthetic_isic.make_synthetic_isic(tmp_path / "c", 4, 2, 2, size=96, seed=6)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files_a) == 16
    assert Path("Training_Data/ISIC_0000000.jpg") in files_a
    assert Path("Test_GroundTruth/ISIC_0000007_segmentation.png") in files_a
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in files_a if f.suffix == ".jpg")
    no_test = synthetic_isic.make_synthetic_isic(tmp_path / "d", 2, 1, 0, size=64, seed=0)
    with pytest.raises(DatasetError, match="No Test split"):
        ds.find_split(no_test, "Test")


def test_synthetic_lesions_are_varied(tmp_path):
    """Masks are 0/255 and non-empty; the set has tiny, border-touching, large and low-contrast lesions."""
    root = synthetic_isic.make_synthetic_isic(tmp_path, 40, 0, 0, size=128, seed=0)
    images, masks = ds.find_split(root, "Training")
    fractions, touching, contrasts, heights = [], 0, [], set()
    for image_path in sorted(images.iterdir()):
        mask = np.asarray(Image.open(masks / f"{image_path.stem}_segmentation.png"))
        image = np.asarray(Image.open(image_path).convert("L"), np.float64)
        assert set(np.unique(mask)) == {0, 255}
        lesion = mask > 127
        fractions.append(lesion.mean())
        touching += bool(lesion[0].any() or lesion[-1].any() or lesion[:, 0].any() or lesion[:, -1].any())
        ring = binary_dilation(lesion, iterations=6) & ~binary_dilation(lesion, iterations=2)
        contrasts.append(image[ring].mean() - image[lesion].mean())  # vs the skin just outside
        heights.add(mask.shape[0])
    fractions, contrasts = np.array(fractions), np.array(contrasts)
    assert (fractions < 0.01).any(), "no tiny lesion"
    assert (fractions > 0.2).any(), "no large lesion"
    assert touching >= 3, "too few lesions touching the border"
    assert (contrasts > 0).all(), "a lesion is not darker than the skin around it"
    assert (contrasts < 20).any() and (contrasts > 55).any(), f"contrast not varied: {np.sort(contrasts)}"
    assert len(heights) > 3  # varied original sizes


# ---------------------------------------------------------------------------------------------- real ISIC sample


def test_real_isic_sample_loads(isic_sample):
    images, masks = isic_sample / "images", isic_sample / "masks"
    dataset = ds.ValSkinDataset(images, masks, 256)
    assert len(dataset) == 6 and dataset.names[0] == "ISIC_0003805"
    for i in range(len(dataset)):
        sample = dataset[i]
        with Image.open(images / f"{sample['name']}.jpg") as im:
            assert sample["orig_size"] == (im.size[1], im.size[0])
            reference = np.asarray(im.convert("RGB").resize((256, 256), Image.BILINEAR), np.float64)
        # 1024 px wide -> 256: the draft halves the photo first; the result stays within JPEG-noise distance.
        assert np.abs(denormalise(sample["image"]) - reference).mean() < 1.0
        lesion = sample["mask_orig"].astype(bool)
        assert 0.005 < lesion.mean() < 0.5 and sample["mask_orig"].shape == sample["orig_size"]
        assert 0.005 < sample["label"].float().mean() < 0.5
        # A lesion is darker than the skin, which checks the mask is aligned with its image.
        grey = np.asarray(Image.open(images / f"{sample['name']}.jpg").convert("L"), np.float64)
        assert grey[lesion].mean() < grey[~lesion].mean() - 10


# ----------------------------------------------------------------------------- issue 26: hostile inputs, round 2

def test_complete_files_with_bytes_after_their_end_are_read_truly_truncated_ones_refused(synthetic_copy, monkeypatch):
    """A complete JPEG with bytes after its end marker (as some cameras and exporters write) and a PNG with bytes
    after IEND were refused as truncated, though PIL reads both. Every file still gets the cheap header and tail
    check; only one without its end marker is decoded (once), and refused when that decode fails."""
    images, masks = ds.find_split(synthetic_copy, "Training")
    image, mask = images / "ISIC_0000000.jpg", masks / "ISIC_0000000_segmentation.png"
    pixels, lesion = ds.decode_image(image, None), ds.decode_mask(mask, None)
    sizes = {image: image.stat().st_size, mask: mask.stat().st_size}
    assert lesion.any()
    image.write_bytes(image.read_bytes() + b"camera maker's trailer: no end marker in the last 64 bytes " * 4)
    mask.write_bytes(mask.read_bytes() + b"\x00" * 100)
    decoded = []
    monkeypatch.setattr(ds, "decode_problem", lambda path, real=ds.decode_problem: decoded.append(path.name) or
                        real(path))
    dataset = ds.SemiSupervisedSkinDataset(images, masks, 32)
    assert sorted(decoded) == [image.name, mask.name], "only the two files without an end marker are decoded"
    np.testing.assert_array_equal(ds.decode_image(image, None), pixels)
    np.testing.assert_array_equal(ds.decode_mask(mask, None), lesion)
    assert "ISIC_0000000" in dataset.names
    for victim in (image, mask):
        whole = victim.read_bytes()
        victim.write_bytes(whole[:sizes[victim] * 3 // 4])  # a cut in the pixel data
        with pytest.raises(DatasetError, match=rf"'{victim}' is truncated: it has no end-of-file marker and cannot be "
                                               r"decoded completely \(image file is truncated"):
            ds.SemiSupervisedSkinDataset(images, masks, 32)
        victim.write_bytes(whole)


def test_a_mask_of_the_image_turned_by_its_exif_tag_is_said_so(synthetic_copy):
    """A mask drawn on the image as a viewer shows it (turned by its EXIF orientation) is refused, saying why."""
    images, masks = ds.find_split(synthetic_copy, "Training")
    image, mask = images / "ISIC_0000002.jpg", masks / "ISIC_0000002_segmentation.png"
    exif = Image.Exif()
    exif[0x0112] = 8
    with Image.open(image) as im:
        width, height = im.size
        im.save(image, exif=exif)
    with Image.open(mask) as im:
        im.transpose(Image.Transpose.ROTATE_90).save(mask)
    with pytest.raises(DatasetError) as err:
        ds.SemiSupervisedSkinDataset(images, masks, 32)
    assert str(err.value).startswith(
        f"Mask '{mask}' is {height}x{width} but its image {image.name} is {width}x{height} (W x H); the mask has the "
        "image's size turned by 90 degrees: it was drawn on the image as viewers show it: its EXIF orientation tag (8) "
        "shows it turned"), err.value
