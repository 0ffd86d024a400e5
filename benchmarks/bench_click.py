"""How interactive the ML backend (label_studio_backend.py) is: per model and working size, on the full-size photos
of ../shared/isic-sample-full (2304x1536 .. 3024x2016), the time of a task's first request (JPEG decode + resize,
image encoder, prompt encoder + decoder, upsampling to the photo, brush RLE) and of a click with the embedding
cached, each through ``Backend.predict`` with the request body Label Studio 1.23.2 sent for a click
(tests/data). Also the memory one cache entry (the image encoder's features) takes.

Random SAM2 weights (``--checkpoint none``): a model's speed does not depend on its weights' values.

    python3 benchmarks/bench_click.py                       # hiera_t and hiera_l at 512 and 1024
    python3 benchmarks/bench_click.py --models sam2.1_hiera_t --sizes 512 --photos 2 --clicks 5

Target (DESIGN.md): a click under 150 ms for hiera_t on this CPU, embedding cached.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import label_studio  # noqa: E402
from label_studio_backend import Backend, features_bytes  # noqa: E402
from run_folder import RunFolder  # noqa: E402
from settings import build_parser  # noqa: E402

PHOTOS = REPO.parent / "shared" / "isic-sample-full" / "images"
RECORDED = REPO / "tests" / "data" / "label_studio_1.23_ml_backend_requests.json"


def make_run(where: Path, model_cfg: str, size: int, photos) -> Path:
    """A run folder of ``model_cfg`` at ``size`` (config.txt only, the trainer's defaults otherwise: the zero-shot
    model) with a round of ``photos``."""
    run_dir = where / f"{model_cfg}_{size}" / f"Skin_{size}"
    defaults = vars(build_parser().parse_args([]))
    RunFolder(run_dir).write_config({**defaults, **dict(model_cfg=model_cfg, checkpoint="none", img_size=size, seed=0,
                                                        promptmode="point", decode="full")})
    round_dir = run_dir / "annotate" / "round_001"
    round_dir.mkdir(parents=True)
    for photo in photos:
        shutil.copyfile(photo, round_dir / photo.name)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sam2.1_hiera_t", "sam2.1_hiera_l"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--photos", type=int, default=6, help="how many of the full-size photos (tasks)")
    parser.add_argument("--clicks", type=int, default=5, help="clicks per task after its first request")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    photos = sorted(PHOTOS.glob("*.jpg"))[: args.photos]
    if not photos:
        raise SystemExit(f"no photos in {PHOTOS}")
    recorded = json.loads(RECORDED.read_text())
    print(f"load before: {open('/proc/loadavg').read().split()[:3]}; {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; {len(photos)} photos, {args.clicks} clicks each")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-click-") as folder:
        for model_cfg in args.models:
            for size in args.sizes:
                run_dir = make_run(Path(folder), model_cfg, size, photos)
                backend = Backend(run_dir, "http://127.0.0.1:9", None, run_dir.parent, torch.device("cpu"),
                                  cache_entries=len(photos))
                backend.run.model()
                first, clicks = [], []
                for photo in photos:
                    body = copy.deepcopy(recorded["predict_click"])
                    body["tasks"][0]["data"] = {"image": label_studio.LOCAL_FILES_URL +
                                                f"{run_dir.name}/annotate/round_001/{photo.name}"}
                    started = time.perf_counter()
                    backend.predict(body)
                    first.append(time.perf_counter() - started)
                    for _ in range(args.clicks):
                        started = time.perf_counter()
                        backend.predict(body)
                        clicks.append(time.perf_counter() - started)
                entry = features_bytes(next(iter(backend.cache.values())).features)
                rows.append((model_cfg, size, statistics.median(first), statistics.median(clicks), max(clicks),
                             entry))
                print(f"{model_cfg} {size}: first {statistics.median(first) * 1000:.0f} ms, click "
                      f"{statistics.median(clicks) * 1000:.0f} ms (load {open('/proc/loadavg').read().split()[0]})",
                      flush=True)
    print(f"\nload after: {open('/proc/loadavg').read().split()[:3]}")
    print("| model | size | first request (median) | click, embedding cached (median / max) | cache entry |")
    print("| --- | --- | --- | --- | --- |")
    for model_cfg, size, first, click, worst, entry in rows:
        print(f"| {model_cfg} | {size} | {first * 1000:.0f} ms | {click * 1000:.0f} / {worst * 1000:.0f} ms | "
              f"{entry / 2 ** 20:.1f} MiB |")


if __name__ == "__main__":
    main()
