"""HD95 at full ISIC resolution: val.hd95 (boundary points + KD-tree) against medpy.metric.binary.hd95.

    python3 benchmarks/bench_hd95.py [--height 4439 --width 6688]

Two overlapping irregular lesion masks of the largest ISIC-2017 photo size; prints both values (they must be
equal) and the seconds each takes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import val  # noqa: E402


def lesion(height: int, width: int, cy: float, cx: float, ry: float, rx: float, wobble: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    radius = 1 + wobble * np.cos(5 * theta) + 0.5 * wobble * np.sin(3 * theta)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < radius ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=4439)
    parser.add_argument("--width", type=int, default=6688)
    args = parser.parse_args()
    h, w = args.height, args.width
    gt = lesion(h, w, 0.5 * h, 0.5 * w, 0.33 * h, 0.3 * w, 0.08)
    pred = lesion(h, w, 0.52 * h, 0.5 * w, 0.31 * h, 0.32 * w, 0.12)
    from medpy.metric.binary import hd95 as medpy_hd95

    for name, fn in (("val.hd95", lambda: val.hd95(pred, gt)), ("medpy hd95", lambda: medpy_hd95(pred, gt))):
        start = time.perf_counter()
        value = fn()
        print(f"{name:12s} {value:10.4f} px   {time.perf_counter() - start:7.3f} s   ({w} x {h})")


if __name__ == "__main__":
    main()
