"""Skin-lesion datasets: folder discovery, file checks, decode-once cache, transforms (synthetic data: synthetic_isic.py).

Layouts understood under a dataset root (split = Training | Validation | Test):

    README layout                      official ISIC-2017 names
    Training_Data/                     ISIC-2017_Training_Data/
    Training_GroundTruth/              ISIC-2017_Training_Part1_GroundTruth/
    Validation_Data/                   ISIC-2017_Validation_Data/
    Validation_GroundTruth/            ISIC-2017_Validation_Part1_GroundTruth/
    Test_Data/          (optional)     ISIC-2017_Test_v2_Data/
    Test_GroundTruth/   (optional)     ISIC-2017_Test_v2_Part1_GroundTruth/

Images are ``.jpg/.jpeg/.png``; the mask of ``X.<ext>`` is ``X_segmentation.png`` (0 = skin, 255 = lesion;
anything > 127 counts as lesion; a mask whose maximum is 1 is read as 0/1; ``MaskNotes`` records which kinds were
seen, for one log line each). A mask is read by its own mode (``read_mask``): grey as it is; RGB/RGBA by the
largest colour channel (fully transparent pixels are skin); a palette PNG as lesion wherever its colour is not
black; other modes are refused. A mask with non-zero pixels of which none reads as lesion is an error (it would
silently count as all skin), and so is a validation set whose masks are all empty (``require_a_lesion``).
``*_superpixels.*``, hidden files and non-image files (e.g. the official metadata CSVs) are ignored; image links
that point nowhere are left out with a warning. Order is sorted by image name, so indices are stable across runs.

Every file's header is checked when a dataset is built (open + size, and a cheap end-of-file marker check for
truncation; no full decode, except of a file without its end marker: refused only when it cannot be decoded
completely, since a complete file may carry bytes after its end), so a bad file stops the run before any training
with a message naming it. A
header claiming more than ``max_image_pixels`` pixels is refused (``ImageTooLargeError``, see
``DEFAULT_MAX_IMAGE_PIXELS``). Images without a mask are listed once in a warning and left out, except with ``unlabeled_ok`` (images a person is to
annotate: they are kept, and their masks are checked by whoever reads them).

Decode once: each image is decoded and resized to ``img_size`` once per run and kept in memory as uint8
(``img_size**2 * 3`` bytes: 0.75 MiB at 512 px, ~1.5 GiB for the 2000 ISIC-2017 training images). Masks are
cached the same way when they are read. With ``DataLoader(num_workers > 0)`` each worker works on its own copy of
the dataset, so whatever a worker decodes is lost when it exits: call ``dataset.preload()`` in the main process
before creating the loader (and again after ``mark_labeled``; it only decodes what is missing), then the workers
share the cached arrays copy-on-write. With everything cached, ``__getitem__`` only normalises an array, so
``num_workers=0`` is usually the fastest choice anyway.
"""
from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = "_segmentation.png"
SPLITS = ("Training", "Validation", "Test")
# (image folder, mask folder) per split, README layout first.
SPLIT_FOLDERS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "Training": (
        ("Training_Data", "Training_GroundTruth"),
        ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
    ),
    "Validation": (
        ("Validation_Data", "Validation_GroundTruth"),
        ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
    ),
    "Test": (
        ("Test_Data", "Test_GroundTruth"),
        ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"),
    ),
}

# What SAM2 was trained with (ImageNet statistics, on [0, 1] RGB).
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


# PIL warns about images above Image.MAX_IMAGE_PIXELS (89,478,485) and refuses those above twice that, as possible
# decompression bombs (a small file that unpacks into gigabytes). The datasets apply their own limit to every header,
# naming the file: by default PIL's refusal point, so that every image PIL reads by default is read. Since they check
# every header themselves, they raise PIL's process-wide guard to their limit (``_let_pil_open``).
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485

GREY_MASK_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N")
COLOUR_MASK_MODES = ("RGB", "RGBA")
PALETTE_MASK_MODE = "P"


class DatasetError(ValueError):
    """A problem with the dataset on disk; the message names the file or folder and what to do."""


class ImageTooLargeError(DatasetError):
    """An image header claims more pixels than the limit (``max_image_pixels``); ``pixels`` is None when PIL refused
    to open it at all. ``describe(how)`` words the message with another way to raise the limit (a CLI's flag)."""

    def __init__(self, path: PathLike, pixels: Optional[int], limit: int) -> None:
        self.path, self.pixels, self.limit = Path(path), pixels, limit
        super().__init__(self.describe("pass a larger max_image_pixels"))

    def describe(self, how_to_raise: str) -> str:
        claims = f"{self.pixels:,} pixels" if self.pixels is not None else "more pixels than PIL opens"
        return (f"{str(self.path)!r} claims {claims} in its header, more than the limit of {self.limit:,} (a guard "
                "against decompression bombs: small files that unpack into gigabytes). If the image is genuine, "
                f"{how_to_raise}; otherwise replace or remove it.")


class NoLesionError(DatasetError):
    """Every ground-truth mask of a set is empty: any model, even one predicting nothing, would score Dice 1.0."""


# --------------------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------------------


def split_present(data_root: PathLike, split: str) -> bool:
    """Whether ``data_root`` has an image folder of ``split`` (either layout); ``find_split`` says what is wrong."""
    return any((Path(data_root) / image_name).is_dir() for image_name, _ in SPLIT_FOLDERS.get(split, ()))


def find_split(data_root: PathLike, split: str, masks_optional: bool = False) -> Tuple[Path, Path]:
    """Return ``(image_dir, mask_dir)`` of ``split`` under ``data_root`` in either supported layout.

    ``masks_optional`` (images still to be annotated): a missing mask folder is no error; the path where it
    belongs is returned."""
    if split not in SPLIT_FOLDERS:
        raise DatasetError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
    root = Path(data_root)
    if not root.is_dir():
        raise DatasetError(f"Dataset root {str(root)!r} does not exist or is not a folder.")
    for image_name, mask_name in SPLIT_FOLDERS[split]:
        image_dir, mask_dir = root / image_name, root / mask_name
        if image_dir.is_dir():
            if not mask_dir.is_dir() and not masks_optional:
                raise DatasetError(
                    f"Found images in {str(image_dir)!r} but no mask folder {str(mask_dir)!r}; "
                    f"put the ground-truth masks (X_segmentation.png) there."
                )
            return image_dir, mask_dir
    expected = " or ".join(f"{a}/ + {b}/" for a, b in SPLIT_FOLDERS[split])
    present = sorted(p.name + "/" for p in root.iterdir() if p.is_dir())
    raise DatasetError(
        f"No {split} split under {str(root)!r}: expected {expected}. "
        f"Folders present: {', '.join(present) if present else 'none'}."
    )


@dataclass(frozen=True)
class SampleFiles:
    """One image with its mask file and the size read from the headers."""

    name: str
    image_path: Path
    mask_path: Path
    orig_size: Tuple[int, int]  # (H, W)


def _has_image_name(path: Path) -> bool:
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and not path.stem.endswith("_superpixels")
        and not path.stem.endswith("_segmentation")
    )


def _list_images(image_dir: Path) -> Dict[str, Path]:
    """name -> image file of ``image_dir``, sorted by file name; image links that point nowhere are left out with
    one warning listing them; two images of one name are an error."""
    named = sorted((p for p in image_dir.iterdir() if _has_image_name(p)), key=lambda p: p.name)
    dangling = [p for p in named if p.is_symlink() and not p.exists()]
    if dangling:
        shown = ", ".join(f"{p.name} -> {os.readlink(p)}" for p in dangling[:10]) + (" ..." if len(dangling) > 10 else "")
        warnings.warn(f"left out {len(dangling)} image link(s) in {str(image_dir)!r} that point to missing files: "
                      f"{shown}", stacklevel=3)
    by_name: Dict[str, Path] = {}
    for path in (p for p in named if p.is_file()):
        if path.stem in by_name:
            raise DatasetError(f"Two images share the name {path.stem!r}: {by_name[path.stem].name} and {path.name}.")
        by_name[path.stem] = path
    if not by_name:
        raise DatasetError(f"The image folder {str(image_dir)!r} contains no .jpg/.jpeg/.png images.")
    return by_name


def _ends_with_marker(path: Path, fmt: str) -> bool:
    """Whether a JPEG or PNG file ends with its end-of-file marker (reads the last bytes only)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        tail = f.read()
    return b"\xff\xd9" in tail if fmt == "JPEG" else b"IEND" in tail[-12:]


def decode_problem(path: Path) -> Optional[str]:
    """Why PIL cannot decode ``path`` completely (e.g. "image file is truncated"); None when it can."""
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, SyntaxError, ValueError) as err:
        return str(err)
    return None


def _check_not_truncated(path: Path, fmt: str) -> None:
    """Cheap truncation check: JPEG and PNG files end with a known marker. A file without it is decoded once and
    refused only when that fails: bytes after the end marker (some cameras and exporters write them) are harmless."""
    if _ends_with_marker(path, fmt):
        return
    problem = decode_problem(path)
    if problem is not None:
        raise DatasetError(f"{str(path)!r} is truncated: it has no end-of-file marker and cannot be decoded completely "
                           f"({problem}); re-download or replace it.")


def _let_pil_open(max_pixels: int) -> None:
    """Raise PIL's process-wide guard (``Image.MAX_IMAGE_PIXELS``) to ``max_pixels`` when it is lower, so that PIL
    neither warns about nor refuses an image the header check let through."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def read_image_size(path: Path, check_end: bool = True,
                    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Tuple[int, int]:
    """(H, W) from the file header, after checking the file is a readable (and, with ``check_end``, complete)
    JPEG/PNG of at most ``max_pixels`` pixels (``ImageTooLargeError``)."""
    _let_pil_open(max_pixels)
    try:
        with warnings.catch_warnings():  # PIL's DecompressionBombWarning: the limit is checked below, naming the file
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                fmt = im.format
    except Image.DecompressionBombError:
        raise ImageTooLargeError(path, None, max_pixels) from None
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"Cannot read image file {str(path)!r}: {err}. Replace or remove it.") from err
    if width * height > max_pixels:
        raise ImageTooLargeError(path, width * height, max_pixels)
    if fmt not in ("JPEG", "PNG"):
        raise DatasetError(f"{str(path)!r} is a {fmt} file despite its extension; convert it to JPEG or PNG.")
    if width == 0 or height == 0:
        raise DatasetError(f"{str(path)!r} has an empty size {width}x{height}.")
    if check_end:
        _check_not_truncated(path, fmt)
    return height, width


EXIF_ORIENTATION = 0x0112
TURNED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations a viewer shows turned by 90 degrees


def turned_mask_hint(image_path: Path, image_size: Tuple[int, int], mask_size: Tuple[int, int]) -> str:
    """What a size mismatch adds when the mask (H, W) has its image's size turned by 90 degrees: most likely drawn
    on the image as a viewer shows it, turned by its EXIF orientation tag, whereas pixels are read as stored (as the
    reference reads them). Empty for any other mismatch."""
    if tuple(mask_size) != tuple(image_size)[::-1]:
        return ""
    try:
        with Image.open(image_path) as im:
            orientation = im.getexif().get(EXIF_ORIENTATION)
    except (OSError, SyntaxError, ValueError):
        orientation = None
    why = (f"it was drawn on the image as viewers show it: its EXIF orientation tag ({orientation}) shows it turned"
           if orientation in TURNED_ORIENTATIONS else
           "was it drawn on a turned copy (e.g. one a viewer turned by an EXIF orientation tag)?")
    return (f"; the mask has the image's size turned by 90 degrees: {why}; masks follow the pixels as stored (read "
            "without the EXIF turn, as the reference does): turn the mask back")


def discover_samples(image_dir: PathLike, mask_dir: PathLike, check_files: bool = True,
                     unlabeled_ok: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> List[SampleFiles]:
    """Pair every image in ``image_dir`` with its mask in ``mask_dir`` (sorted by name).

    Images without a mask are left out with one warning that lists them all; so are image links that point nowhere
    (another warning). With ``check_files`` every image and mask header is read: unreadable/truncated files and
    image/mask size mismatches raise ``DatasetError``. Without it only the image headers are read (for the original
    sizes). Either way a header above ``max_image_pixels`` raises ``ImageTooLargeError``.

    ``unlabeled_ok`` (a person annotates the images): every image is kept, with ``mask_path`` where its mask is
    or is to be saved; the mask folder may be missing, and masks are not read here (whoever uses them checks them).
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    for folder, what in ((image_dir, "image"), (mask_dir, "mask")):
        if unlabeled_ok and what == "mask":
            continue
        if not folder.is_dir():
            raise DatasetError(f"The {what} folder {str(folder)!r} does not exist.")
    by_name = _list_images(image_dir)
    samples: List[SampleFiles] = []
    missing: List[str] = []
    for name, image_path in by_name.items():
        mask_path = mask_dir / f"{name}{MASK_SUFFIX}"
        if unlabeled_ok:
            samples.append(SampleFiles(name, image_path, mask_path,
                                       read_image_size(image_path, check_files, max_image_pixels)))
            continue
        if not mask_path.is_file():
            missing.append(image_path.name)
            continue
        if check_files:
            size = read_image_size(image_path, max_pixels=max_image_pixels)
            mask_size = read_image_size(mask_path, max_pixels=max_image_pixels)
            if mask_size != size:
                hint = turned_mask_hint(image_path, size, mask_size) or "; masks must match their image's size"
                raise DatasetError(f"Mask {str(mask_path)!r} is {mask_size[1]}x{mask_size[0]} but its image "
                                   f"{image_path.name} is {size[1]}x{size[0]} (W x H){hint}.")
        else:  # sizes are still needed (original-size metrics); one header read, errors name the file
            size = read_image_size(image_path, check_end=False, max_pixels=max_image_pixels)
        samples.append(SampleFiles(name, image_path, mask_path, size))
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(by_name)} images in {str(image_dir)!r} have no mask "
            f"(expected <name>{MASK_SUFFIX} in {str(mask_dir)!r}) and are left out: {', '.join(missing)}",
            stacklevel=2,
        )
    if not samples:
        raise DatasetError(f"None of the images in {str(image_dir)!r} has a mask in {str(mask_dir)!r}.")
    return samples


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------


def _sixteen_bit_to_uint8(im: Image.Image) -> np.ndarray:
    values = np.asarray(im)
    if values.max(initial=0) > 255:
        values = values.astype(np.float64) * (255.0 / 65535.0)
        values = np.clip(np.rint(values), 0, 255)
    return values.astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode (L, LA, RGBA, P, CMYK, 16-bit grey, 1-bit) to 8-bit RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return Image.fromarray(_sixteen_bit_to_uint8(im), mode="L").convert("RGB")
    if im.mode == "RGB":
        return im
    return im.convert("RGB")


def to_grey(im: Image.Image) -> Image.Image:
    """A mask file in any mode to 8-bit greyscale ('1' becomes 0/255)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return Image.fromarray(_sixteen_bit_to_uint8(im), mode="L")
    if im.mode == "L":
        return im
    return im.convert("L")


def decode_image(path: Path, size: Optional[int], use_draft: bool = False) -> np.ndarray:
    """Decode ``path`` to RGB uint8 (H x W x 3), resized bilinearly to ``size x size`` when given.

    By default the whole image is decoded, then resized, as the reference code does. ``use_draft`` lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 in the DCT domain while the result stays at
    least ``2 * size`` on both sides; the bilinear resize to ``size`` follows in both cases. Large photos decode
    3-5x faster and the result differs from a full decode by ~0.15 grey levels on average (99th percentile 1).
    Asking for only ``size`` would be faster still but visibly sharper (p99 12 levels at hair edges), because
    the final resize would then barely filter. Measured in benchmarks/bench_decode_cache.py.
    """
    try:
        with Image.open(path) as im:
            if size is not None and use_draft and im.format == "JPEG":
                im.draft("RGB", (2 * size, 2 * size))
            im = to_rgb(im)
            if size is not None:
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"Cannot decode image {str(path)!r}: {err}. Replace or remove it.") from err


def mask_kind(levels: np.ndarray) -> str:
    """The grey levels present in a mask, ascending -> "0/1" (maximum 1: stored as 0/1), "0/255" (only 0 and
    255, or one of them) or "other" (any other value, e.g. {0, 128, 255})."""
    if levels[-1] == 1:
        return "0/1"
    return "other" if np.setdiff1d(levels, (0, 255)).size else "0/255"


def lesion_threshold(levels: np.ndarray) -> int:
    """Lesion = a level above this: 0 for a 0/1 mask, else 127."""
    return 0 if mask_kind(levels) == "0/1" else 127


def _levels(values: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.bincount(values.ravel(), minlength=256))


@dataclass(frozen=True)
class MaskContent:
    """What one mask file holds, read by its own mode (``read_mask``): the one rule for every reader of masks.

    ``values``: H x W uint8, the level each pixel is judged by: a grey mask's grey level (16-bit scaled to 8);
    for RGB/RGBA its largest colour channel (0 where fully transparent); for a palette PNG 255 where its colour is
    not black, else 0. ``levels``: the values present, ascending (so ``kind`` = ``mask_kind(levels)``).
    ``nonzero``: whether any pixel holds anything but black (colour channels only, not alpha).
    """

    path: Path
    mode: str
    values: np.ndarray
    levels: np.ndarray
    nonzero: bool

    @property
    def kind(self) -> str:
        return mask_kind(self.levels)

    @property
    def size(self) -> Tuple[int, int]:
        """(H, W)."""
        return self.values.shape

    @property
    def faint(self) -> bool:
        """Non-zero pixels, none of which reads as lesion: read as it is, the mask would be all skin."""
        return self.nonzero and self.levels[-1] <= lesion_threshold(self.levels)

    def lesion(self) -> np.ndarray:
        """H x W uint8 {0, 1}."""
        return (self.values > lesion_threshold(self.levels)).astype(np.uint8)

    def shown_levels(self) -> str:
        """The first six levels, as messages show them."""
        return ", ".join(str(v) for v in self.levels[:6]) + (", ..." if len(self.levels) > 6 else "")

    def faint_message(self) -> str:
        return (f"Mask {str(self.path)!r} has non-zero pixels ({self.mode} levels {self.shown_levels()}) but none "
                "reads as lesion (lesion is a level above 127, or 1 in a 0/1 mask), so it would count as all skin; "
                "save the lesion as 255 (or the mask as 0/1).")


def _palette_values(im: Image.Image, path: Path) -> np.ndarray:
    """255 where a palette image's colour is not black, 0 where it is (entries past the palette's end are black)."""
    colours = np.asarray(im.getpalette("RGB") or [], np.uint8).reshape(-1, 3)
    black = ~colours.any(axis=1)
    if not black.any():
        raise DatasetError(f"Mask {str(path)!r} is a palette image without a black colour, so its background "
                           "cannot be told; save it with black (0, 0, 0) as skin, or as 8-bit grey (0/255).")
    table = np.zeros(256, np.uint8)
    table[: len(colours)] = np.where(black, 0, 255)
    return table[np.asarray(im)]


def _mask_values(im: Image.Image, path: Path) -> Tuple[np.ndarray, bool]:
    """(values, nonzero) of ``MaskContent`` for an open mask image."""
    if im.mode in GREY_MASK_MODES:
        grey = np.asarray(to_grey(im))
        return grey, bool(grey.any())
    if im.mode in COLOUR_MASK_MODES:
        pixels = np.asarray(im)
        colour = pixels[..., :3]
        values = colour.max(axis=2)
        if im.mode == "RGBA":
            values = np.where(pixels[..., 3] == 0, 0, values).astype(np.uint8)
        return values, bool(colour.any())
    if im.mode == PALETTE_MASK_MODE:
        values = _palette_values(im, path)
        return values, bool(values.any())
    raise DatasetError(f"Mask {str(path)!r} is a {im.mode} image; save masks as 8-bit grey (0 = skin, 255 = lesion), "
                       "RGB(A) or a palette PNG.")


def read_mask(path: PathLike) -> MaskContent:
    """What the mask file ``path`` holds (``MaskContent``), read by its mode. ``DatasetError`` naming the file
    when it cannot be decoded, is of an unsupported mode, or is a palette without black."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            values, nonzero = _mask_values(im, path)
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"Cannot decode mask {str(path)!r}: {err}. Replace or remove it.") from err
    return MaskContent(path, mode, values, _levels(values), nonzero)


class MaskNotes:
    """What the masks decoded so far looked like, so that a run says each thing once, not once per image.

    ``zero_one``: masks stored as 0/1 (maximum 1), read as 0 = skin, 1 = lesion. ``other_values``: masks with
    values other than 0 and 255 (e.g. {0, 128, 255}), thresholded at > 127. ``colour``: RGB(A) and palette masks
    (read by their mode, see ``MaskContent``). ``empty``: masks without a lesion pixel (allowed: a lesion-free
    image). Sets of file names, so a mask decoded twice counts once. ``news()`` returns the (logging level, line)
    pairs not reported before: the first three once, the count of empty masks whenever it has grown.
    """

    def __init__(self) -> None:
        self.zero_one: set = set()
        self.other_values: set = set()
        self.colour: set = set()
        self.empty: set = set()
        self._told_zero_one = self._told_other_values = self._told_colour = False
        self._told_empty = 0

    def record(self, path: Path, levels: np.ndarray, empty: bool, mode: str = "L") -> None:
        """``levels``: the levels present in ``path``, ascending (``MaskContent.levels``); ``mode``: its PIL mode."""
        kind = mask_kind(levels)
        if kind == "0/1":
            self.zero_one.add(path.name)
        elif kind == "other":
            self.other_values.add(path.name)
        if mode in COLOUR_MASK_MODES or mode == PALETTE_MASK_MODE:
            self.colour.add(path.name)
        if empty:
            self.empty.add(path.name)

    def news(self) -> List[Tuple[int, str]]:
        lines = []
        if self.zero_one and not self._told_zero_one:
            self._told_zero_one = True
            lines.append((logging.INFO, f"masks stored as 0/1 (e.g. {min(self.zero_one)}) are read as "
                                        "0 = skin, 1 = lesion"))
        if self.other_values and not self._told_other_values:
            self._told_other_values = True
            lines.append((logging.WARNING, f"mask {min(self.other_values)} holds values other than 0 and 255: "
                                           "thresholded at 127 (lesion = above 127); check how the masks were written"))
        if self.colour and not self._told_colour:
            self._told_colour = True
            lines.append((logging.INFO, f"colour masks (e.g. {min(self.colour)}) are read as lesion where the largest "
                                        "colour channel is above 127, palette masks where the colour is not black"))
        if len(self.empty) > self._told_empty:
            self._told_empty = len(self.empty)
            lines.append((logging.INFO, f"{len(self.empty)} of the masks read so far are empty (no lesion; allowed), "
                                        f"e.g. {min(self.empty)}"))
        return lines


def decode_mask(path: Path, size: Optional[int], notes: Optional[MaskNotes] = None) -> np.ndarray:
    """Decode a mask to uint8 {0, 1} (H x W), read by its mode (``read_mask``) and thresholded by
    ``MaskContent.lesion`` (a 0/1 mask as it is, any other above 127), resized nearest-neighbour to ``size x size``
    when given. A mask with non-zero pixels none of which reads as lesion is a ``DatasetError``
    (``MaskContent.faint``). What it looked like (0/1, other values, colour, empty) is recorded in ``notes`` when
    given."""
    content = read_mask(path)
    if content.faint:
        raise DatasetError(content.faint_message())
    mask = content.lesion()
    if notes is not None:
        notes.record(content.path, content.levels, empty=not mask.any(), mode=content.mode)
    return mask if size is None else resize_mask(mask, size)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """H x W uint8 class indices -> size x size, nearest neighbour: how a training label is made from its mask."""
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))


def require_a_lesion(masks: Iterable[np.ndarray], where: str) -> None:
    """``NoLesionError`` when none of ``masks`` (ground truths, read lazily up to the first with a lesion) has a
    lesion pixel: a model that predicts nothing would score Dice 1.0 on them. ``where``: what they are, for the
    message (e.g. their folder)."""
    count = 0
    for count, mask in enumerate(masks, start=1):
        if mask.any():
            return
    raise NoLesionError(
        f"all {count} ground-truth masks of {where} are empty (no lesion pixel): any model, even one that predicts "
        "nothing, would score Dice 1.0 on them. Check that these are the right masks (lesion = 255, or 1 in 0/1 masks).")


# --------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------


# uint8 value -> normalised float per channel (256 x 3); a table lookup is exact and, unlike a chain of
# multi-threaded tensor ops, stays fast when the CPU is shared with DataLoader workers or other jobs.
_NORMALISED_LEVELS = ((np.arange(256)[:, None] / 255.0 - np.array(PIXEL_MEAN)) / np.array(PIXEL_STD)).astype(np.float32)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """uint8 S x S x 3 -> float32 3 x S x S, ImageNet mean/std normalised (SAM2's input convention)."""
    out = np.empty((3,) + image.shape[:2], np.float32)
    for channel in range(3):
        np.take(_NORMALISED_LEVELS[:, channel], image[..., channel], out=out[channel])
    return torch.from_numpy(out)


class SkinValGenerator:
    """The transform (the reference code's name for it): cached uint8 image/mask at ``img_size`` -> (normalised
    image 3 x S x S, label S x S int64). No augmentation: the reference trains without any."""

    def __init__(self, img_size: int) -> None:
        self.img_size = img_size

    def __call__(self, image: np.ndarray, mask: Optional[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        label = np.zeros(image.shape[:2], np.int64) if mask is None else mask.astype(np.int64)
        return normalize_image(image), torch.from_numpy(label)


SkinTrainGenerator = SkinValGenerator  # the reference's training transform: the same resize and normalisation


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


class SkinLesionDataset(Dataset):
    """All images of one split with their masks, resized to ``img_size x img_size``; decoded once and cached.

    Sample: dict(image=3 x S x S float32, label=S x S int64 in {0, 1}, is_labeled=True, name, index,
    orig_size=(H, W)). ``max_image_pixels``: the largest image header accepted (``ImageTooLargeError`` above).
    """

    def __init__(
        self,
        image_dir: PathLike,
        mask_dir: PathLike,
        img_size: int,
        cache: bool = True,
        check_files: bool = True,
        use_draft: bool = False,
        unlabeled_ok: bool = False,
        mask_notes: Optional[MaskNotes] = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if int(img_size) <= 0:
            raise DatasetError(f"img_size must be a positive integer, got {img_size!r}.")
        self.img_size = int(img_size)
        self.samples = discover_samples(image_dir, mask_dir, check_files=check_files, unlabeled_ok=unlabeled_ok,
                                        max_image_pixels=max_image_pixels)
        self.names: List[str] = [s.name for s in self.samples]
        self.transform = SkinValGenerator(self.img_size)
        self.cache_enabled = cache
        self.use_draft = use_draft
        self.mask_notes = MaskNotes() if mask_notes is None else mask_notes  # may be shared by several datasets
        self._images: Dict[int, np.ndarray] = {}
        self._masks: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _check_index(self, index: int) -> int:
        if not 0 <= int(index) < len(self.samples):
            raise IndexError(f"Sample index {index} out of range for a dataset of {len(self.samples)} images.")
        return int(index)

    def is_labeled(self, index: int) -> bool:
        return True

    def resized_image(self, index: int) -> np.ndarray:
        """uint8 S x S x 3, decoded once when the cache is on."""
        image = self._images.get(index)
        if image is None:
            image = decode_image(self.samples[index].image_path, self.img_size, self.use_draft)
            if self.cache_enabled:
                self._images[index] = image
        return image

    def resized_mask(self, index: int) -> np.ndarray:
        """uint8 S x S in {0, 1}, decoded once when the cache is on."""
        mask = self._masks.get(index)
        if mask is None:
            mask = decode_mask(self.samples[index].mask_path, self.img_size, self.mask_notes)
            if self.cache_enabled:
                self._masks[index] = mask
        return mask

    def preload(self, indices: Optional[Iterable[int]] = None, num_threads: Optional[int] = None) -> None:
        """Decode (in this process, with threads) everything of ``indices`` (default all) not yet cached.

        Call it before creating a DataLoader with workers, so they inherit the filled cache.
        """
        if not self.cache_enabled:
            return
        todo = [self._check_index(i) for i in (range(len(self)) if indices is None else indices)]

        def load(i: int) -> None:
            self.resized_image(i)
            if self.is_labeled(i):
                self.resized_mask(i)

        threads = num_threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(load, todo))

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        labeled = self.is_labeled(index)
        mask = self.resized_mask(index) if labeled else None
        image, label = self.transform(self.resized_image(index), mask)
        return dict(
            image=image,
            label=label,
            is_labeled=labeled,
            name=self.names[index],
            index=index,
            orig_size=self.samples[index].orig_size,
        )


class SemiSupervisedSkinDataset(SkinLesionDataset):
    """The training split of active learning (the name is the reference's; nothing here is semi-supervised): the
    labeled subset grows as images are annotated; an unlabeled sample never opens its mask (label is all zeros).

    ``mark_labeled(indices)`` simulates the expert annotating those images. Arguments as ``SkinLesionDataset``;
    nothing is labeled at first (cold start).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._labeled: set = set()

    def mark_labeled(self, indices: Iterable[int]) -> None:
        self._labeled.update(self._check_index(i) for i in indices)

    def is_labeled(self, index: int) -> bool:
        return index in self._labeled

    def read_mask_from(self, index: int, path: PathLike) -> None:
        """Read the mask of image ``index`` from ``path`` from now on (where a person's mask was accepted, e.g. a
        round folder), instead of its mask folder."""
        index = self._check_index(index)
        self.samples[index] = replace(self.samples[index], mask_path=Path(path))
        self._masks.pop(index, None)

    def use_mask(self, index: int, mask: np.ndarray) -> None:
        """Use ``mask`` (S x S uint8 in {0, 1}, read by another process: rank 0 of a run on several) as image
        ``index``'s mask from now on."""
        self._masks[self._check_index(index)] = mask

    @property
    def labeled_indices(self) -> List[int]:
        return sorted(self._labeled)

    @property
    def unlabeled_indices(self) -> List[int]:
        return [i for i in range(len(self)) if i not in self._labeled]


class ValSkinDataset(SkinLesionDataset):
    """Validation/test split. Samples also carry ``mask_orig`` (H x W uint8 {0, 1} at the original size).

    Original-size masks are cached bit-packed (H*W/8 bytes each) so metrics at full resolution need no re-read.
    Use ``collate_val`` as the DataLoader's ``collate_fn``.
    """

    def __init__(
        self,
        image_dir: PathLike,
        mask_dir: PathLike,
        img_size: int,
        cache: bool = True,
        check_files: bool = True,
        use_draft: bool = False,
        mask_notes: Optional[MaskNotes] = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__(image_dir, mask_dir, img_size, cache, check_files, use_draft, mask_notes=mask_notes,
                         max_image_pixels=max_image_pixels)
        self._orig_masks: Dict[int, Tuple[np.ndarray, Tuple[int, int]]] = {}

    def require_a_lesion(self, indices: Optional[Iterable[int]] = None) -> None:
        """``NoLesionError`` when no mask of ``indices`` (default all) holds a lesion pixel; reads (and caches)
        the masks up to the first that does, usually one."""
        todo = range(len(self)) if indices is None else indices
        folder = self.samples[0].mask_path.parent
        require_a_lesion((self.original_mask(self._check_index(i)) for i in todo), repr(str(folder)))

    def original_mask(self, index: int) -> np.ndarray:
        packed = self._orig_masks.get(index)
        if packed is not None:
            bits, shape = packed
            return np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape)
        mask = decode_mask(self.samples[index].mask_path, None, self.mask_notes)
        if self.cache_enabled:
            self._orig_masks[index] = (np.packbits(mask), mask.shape)
        return mask

    def resized_mask(self, index: int) -> np.ndarray:
        # Nearest resize of the cached original mask equals decoding the file again, without the file read.
        mask = self._masks.get(index)
        if mask is None:
            full = Image.fromarray(self.original_mask(index) * 255)
            mask = (np.asarray(full.resize((self.img_size, self.img_size), Image.NEAREST)) > 127).astype(np.uint8)
            if self.cache_enabled:
                self._masks[index] = mask
        return mask

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        sample["mask_orig"] = self.original_mask(sample["index"])
        return sample


def training_and_validation(data_root: PathLike, img_size: int, masks_optional: bool = False,
                            val_limit: Optional[int] = None, preload: bool = False, use_draft: bool = False,
                            max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                            ) -> Tuple[SemiSupervisedSkinDataset, Optional[Subset]]:
    """The training split (all unlabeled at first) and the first ``val_limit`` validation images, every file's header
    checked (``ImageTooLargeError`` above ``max_image_pixels``), and at least one of those validation masks holding
    a lesion (``NoLesionError``: else any model scores Dice 1.0). ``masks_optional`` (a person annotates): every
    training image counts, without a mask it is one to annotate, and the Validation split may be missing (None).
    Both share one MaskNotes (what the masks read looked like, logged once per run). ``preload``: decode the
    validation images now (DataLoader workers then share them)."""
    notes = MaskNotes()
    train_set = SemiSupervisedSkinDataset(*find_split(data_root, "Training", masks_optional=masks_optional),
                                          img_size=img_size, unlabeled_ok=masks_optional, mask_notes=notes,
                                          use_draft=use_draft, max_image_pixels=max_image_pixels)
    if masks_optional and not split_present(data_root, "Validation"):
        return train_set, None
    val_set = ValSkinDataset(*find_split(data_root, "Validation"), img_size=img_size, mask_notes=notes,
                             use_draft=use_draft, max_image_pixels=max_image_pixels)
    val_idx = list(range(len(val_set) if val_limit is None else min(val_limit, len(val_set))))
    val_set.require_a_lesion(val_idx)
    if preload:
        val_set.preload(val_idx)
    return train_set, Subset(val_set, val_idx)


def collate_val(samples: Sequence[dict]) -> dict:
    """Stack images/labels; keep ``mask_orig`` (different sizes), names, indices and sizes as lists."""
    return dict(
        image=torch.stack([s["image"] for s in samples]),
        label=torch.stack([s["label"] for s in samples]),
        mask_orig=[s["mask_orig"] for s in samples],
        name=[s["name"] for s in samples],
        index=[s["index"] for s in samples],
        orig_size=[tuple(s["orig_size"]) for s in samples],
        is_labeled=[s["is_labeled"] for s in samples],
    )
