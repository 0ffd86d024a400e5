"""Data fixtures shared by the data/metric tests (import the fixture names into a test module to use them)."""
from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from synthetic_isic import make_synthetic_isic

REPO = Path(__file__).resolve().parents[1]

ISIC_SAMPLE = REPO.parent / "shared" / "isic-sample"  # six real ISIC-2017 pairs, when present
needs_isic_sample = pytest.mark.skipif(
    not (ISIC_SAMPLE / "images").is_dir(), reason=f"real ISIC sample not present at {ISIC_SAMPLE}"
)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset (README layout, 10 train / 5 val / 3 test, 128 px wide). Read-only for tests."""
    return make_synthetic_isic(tmp_path_factory.mktemp("synthetic"), 10, 5, 3, size=128, seed=7)


@pytest.fixture
def synthetic_copy(tmp_path) -> Path:
    """A fresh small dataset a test may modify (6 train / 3 val, 96 px wide)."""
    return make_synthetic_isic(tmp_path / "data", 6, 3, 0, size=96, seed=3)


def claim_size(path: Path, width: int, height: int) -> None:
    """Rewrite a PNG's header (IHDR) to claim ``width x height``; the pixel data stays that of the small image."""
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
