"""Shared pytest fixtures and helpers (test modules never import each other; what they share is here).

* ``report_figure``: tests record measured figures (e.g. parity errors), printed in a "measured figures" section
  at the end of the run.
* ``sam2_oracle``: the official-SAM2 oracle helpers (``tests/sam2_oracle.py``), with the official sdist fetched.
* ``synthetic_root`` / ``synthetic_copy``: small synthetic data sets (read-only / one a test may change);
  ``isic_sample``: the six real ISIC-2017 pairs beside the repository (the test is skipped without them);
  ``claim_size``: a PNG whose header claims another size.
* ``tensorboard``: what a run's TensorBoard event files hold, read with TensorBoard's own reader.
* ``selection_rows`` / ``metrics_rows``: a run folder's al_selection.csv and metrics.csv.
* ``decisive`` / ``decisive_checkpoint``: seeded random SAM2 weights whose masks and scores differ between images
  (random weights give logits near 0 and near-ties everywhere), as a model or as a SAM2 checkpoint file.
* ``label_studio``: one real Label Studio 1.23.2 server for the whole session (``tests/label_studio_helpers``);
  ``fresh_label_studio``: start another one (for tests that stop or restart it) from the same migrated database.
  Without the server the tests that use it are skipped, except under CI=true, where they fail.
"""
from __future__ import annotations

import csv
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest

import label_studio_helpers

from synthetic_isic import make_synthetic_isic

REPO = Path(__file__).resolve().parents[1]
SESSION = "session-"  # the name's start of a temporary folder the whole session shares (kept till its end)
_FIGURES: List[str] = []


def pytest_configure(config) -> None:
    """One CPU thread for torch, in this process and in the runs tests start: on a shared 2-core machine two threads
    made two identical runs differ by ~1e-5 in their weights (tests compare runs bit for bit), and were slower."""
    import os

    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def module_folders_removed(request, tmp_path_factory) -> Iterator[None]:
    """The temporary folders a test module made for itself (its shared runs: ~370 MB each even at 64 px) are removed
    when the module has passed, not at the session's end, so that the suite's disk stays that of its largest module.
    A failed module keeps them for diagnosis; a session-wide folder (named SESSION...) stays."""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            if not path.name.startswith(SESSION):
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def report_figure() -> Callable[[str], None]:
    """Callable taking one line of text to print in the end-of-run summary."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter) -> None:
    if _FIGURES:
        terminalreporter.section("measured figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def sam2_oracle():
    """The ``sam2_oracle`` module, after making sure the official sdist is unpacked in its
    cache (``<repo>/.cache/sam2-oracle`` or ``$MDSAM_ORACLE_CACHE``)."""
    import sam2_oracle

    try:
        sam2_oracle.fetch_sdist()
        problem = None
    except sam2_oracle.OracleError as error:
        problem = str(error)
    if problem:  # failed outside the except block: the reason is shown once
        pytest.fail(problem, pytrace=False)
    return sam2_oracle


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset (README layout, 10 train / 5 val / 3 test, 128 px wide). Read-only for tests."""
    return make_synthetic_isic(tmp_path_factory.mktemp(SESSION + "synthetic"), 10, 5, 3, size=128, seed=7)


@pytest.fixture
def synthetic_copy(tmp_path) -> Path:
    """A fresh small dataset a test may modify (6 train / 3 val, 96 px wide)."""
    return make_synthetic_isic(tmp_path / "data", 6, 3, 0, size=96, seed=3)


@pytest.fixture(scope="session")
def isic_sample() -> Path:
    """The six real ISIC-2017 pairs (images/, masks/) beside the repository; skips the test without them."""
    sample = REPO.parent / "shared" / "isic-sample"
    if not (sample / "images").is_dir():
        pytest.skip(f"real ISIC sample not present at {sample}")
    return sample


@pytest.fixture(scope="session")
def claim_size() -> Callable[[Path, int, int], None]:
    """``claim_size(png, width, height)`` rewrites a PNG's header (IHDR) to claim that size; the pixel data stays
    that of the small image (a decompression bomb's header, without the bomb)."""
    def rewrite(path: Path, width: int, height: int) -> None:
        data = bytearray(Path(path).read_bytes())
        assert data[12:16] == b"IHDR"
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
        Path(path).write_bytes(bytes(data))
    return rewrite


# ----------------------------------------------------------------------------- what a run wrote

def _read_tensorboard(log_dir: Path) -> Dict[str, Dict[str, list]]:
    """dict(scalars={tag: [(step, value)]}, images={tag: [step]}, histograms={tag: [step]}) of a run's log
    folder, as TensorBoard shows it (a resumed run's restart drops the steps it redid)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert sorted(Path(log_dir).glob("events.out.tfevents.*")), f"no TensorBoard event file in {log_dir}"
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()  # every event file of the folder, oldest first; a restart marker purges the steps it redoes
    tags = events.Tags()
    found: Dict[str, Dict[str, list]] = dict(
        scalars={tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]},
        images={tag: [e.step for e in events.Images(tag)] for tag in tags["images"]},
        histograms={tag: [e.step for e in events.Histograms(tag)] for tag in tags["histograms"]})
    return found


@pytest.fixture(scope="session")
def tensorboard() -> Callable[[Path], Dict[str, Dict[str, list]]]:
    """``tensorboard(log_dir)`` -> dict(scalars={tag: [(step, value)]}, images={tag: [step]}, histograms=...)."""
    return _read_tensorboard


@pytest.fixture(scope="session")
def selection_rows() -> Callable[[Path], List[dict]]:
    """``selection_rows(run_dir)`` -> the rows of its al_selection.csv (dicts of text)."""
    def read(run_dir: Path) -> List[dict]:
        with open(Path(run_dir) / "al_selection.csv", newline="") as f:
            return list(csv.DictReader(f))
    return read


@pytest.fixture(scope="session")
def metrics_rows() -> Callable[[Path], List[dict]]:
    """``metrics_rows(run_dir)`` -> the rows of its metrics.csv (epoch and labeled as ints, the rest floats or
    None where empty), read here with the csv module, not with the product's reader."""
    def read(run_dir: Path) -> List[dict]:
        with open(Path(run_dir) / "metrics.csv", newline="") as f:
            return [{k: (int(v) if k in ("epoch", "labeled") else (None if v == "" else float(v)))
                     for k, v in row.items()} for row in csv.DictReader(f)]
    return read


# ----------------------------------------------------------------------------- decisive weights

def _decisive(net):
    """Random SAM2 weights give logits near 0 (every mask ~half the image); scaled hypernetwork outputs give
    masks and scores that differ between images, so selections mean something. ``net``: a LoRA_Sam or SAM2 model."""
    import torch

    sam = getattr(net, "sam", net)
    with torch.no_grad():
        for decoder in (sam.sam_mask_decoder, sam.sam_mask_decoder2):
            for mlp in decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.mul_(40)
    return net


@pytest.fixture(scope="session")
def decisive() -> Callable:
    """``decisive(net)``: the model with its decoders' hypernetwork outputs scaled (in place), returned."""
    return _decisive


@pytest.fixture(scope="session")
def decisive_checkpoint(tmp_path_factory) -> Path:
    """A SAM2 checkpoint file ({"model": state dict}) of seeded random sam2.1_hiera_t weights made ``decisive``:
    pass it as --checkpoint, so that runs in other processes select by scores that mean something."""
    import torch

    from sam2.build_sam import build_sam2

    path = tmp_path_factory.mktemp(SESSION + "decisive") / "sam2.1_hiera_t_decisive.pt"
    sam = _decisive(build_sam2("sam2.1_hiera_t", None, device="cpu", mode="train", image_size=64))
    torch.save({"model": sam.state_dict()}, path)
    return path


# ----------------------------------------------------------------------------- a real Label Studio server

LABEL_STUDIO_MIGRATE_S, LABEL_STUDIO_START_S = 1200, 300  # a busy 2-core machine migrates for minutes


@pytest.fixture(scope="session")
def label_studio_data(tmp_path_factory, report_figure) -> Path:
    """A Label Studio data folder migrated once per session (``label_studio_helpers.migrated_data``); each server
    starts from a copy of it. Skips the test without a server, fails it under CI=true (.ci/run installs one)."""
    executable = label_studio_helpers.label_studio_executable()
    if executable is None:
        why = ("no Label Studio server: set MDSAM_LABEL_STUDIO to a label-studio executable, or run .ci/run, which "
               "installs Label Studio 1.23.2 under ${MDSAM_CACHE:-~/.cache/mdsam}")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    started = time.monotonic()
    data = label_studio_helpers.migrated_data(executable, tmp_path_factory.mktemp(SESSION + "label-studio-data"),
                                              LABEL_STUDIO_MIGRATE_S)
    report_figure(f"label studio: a new database migrated in {time.monotonic() - started:.0f} s")
    return data


@pytest.fixture(scope="session")
def fresh_label_studio(label_studio_data, tmp_path_factory, report_figure):
    """``fresh_label_studio(document_root)``: a new server from a copy of the migrated database, up and
    authenticated; the caller stops it (every one still running is stopped at the end of the session)."""
    started_servers = []

    def start(document_root: Path) -> label_studio_helpers.LabelStudioServer:
        started = time.monotonic()
        server = label_studio_helpers.LabelStudioServer(label_studio_helpers.label_studio_executable(),
                                                        tmp_path_factory.mktemp(SESSION + "label-studio-server"),
                                                        document_root, data=label_studio_data)
        started_servers.append(server)
        server.wait_until_up(LABEL_STUDIO_START_S)
        server.authenticate()
        report_figure(f"label studio: a server up and authenticated in {time.monotonic() - started:.1f} s "
                      "(a copy of the migrated database)")
        return server

    yield start
    for server in started_servers:
        server.stop()


@pytest.fixture(scope="session")
def label_studio(fresh_label_studio, tmp_path_factory) -> label_studio_helpers.LabelStudioServer:
    """The session's Label Studio server on 127.0.0.1, its document root a temporary folder (put the runs whose
    rounds it serves below ``label_studio.document_root``); ``token`` is a personal access token."""
    return fresh_label_studio(tmp_path_factory.mktemp(SESSION + "label-studio-root"))
