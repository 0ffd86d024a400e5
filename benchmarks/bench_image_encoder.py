"""Image-encoder forward time: our ``sam2`` against the official SAM2 1.1.0, same weights.

Both packages are called ``sam2``. The official one (from the sdist cached by
``tests/sam2_oracle.py``) is imported first, its models are built, and every ``sam2`` /
``sam2.*`` entry of ``sys.modules`` is moved to an ``official_`` alias before ours is imported.
Timed runs of the two alternate (which one goes first alternates too), after warm-up, under
``torch.no_grad``; the table shows medians (and the ratio of the fastest runs, less sensitive to other load
on the machine).

    python3 benchmarks/bench_image_encoder.py                 # hiera_t and hiera_l at 512
    python3 benchmarks/bench_image_encoder.py --models sam2.1_hiera_t --size 1024 --runs 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
import sam2_oracle  # noqa: E402  (tests/ helper: fetches and unpacks the official sdist)

sys.path.pop(0)


def build_official_models(names, size):
    """Official models with their random init, then the official package hidden away."""
    sdist = str(sam2_oracle.fetch_sdist())
    repo_paths = [p for p in sys.path if Path(p or ".").resolve() == REPO_ROOT]
    for path in repo_paths:  # our sam2 must not shadow the official one here
        sys.path.remove(path)
    sys.path.insert(0, sdist)
    from sam2.build_sam import build_sam2 as official_build

    torch.manual_seed(0)
    models = {name: official_build(sam2_oracle.MODEL_CONFIGS[name], None, device="cpu",
                                   hydra_overrides_extra=[f"++model.image_size={size}"]).eval()
              for name in names}
    for key in [k for k in sys.modules if k == "sam2" or k.startswith("sam2.")]:
        sys.modules["official_" + key] = sys.modules.pop(key)
    sys.path.remove(sdist)
    sys.path[:0] = [str(REPO_ROOT)]
    return models


def build_our_model(name, size, official_model, folder):
    from sam2.build_sam import build_sam2

    checkpoint = Path(folder) / f"{name}.pt"
    torch.save({"model": official_model.state_dict()}, checkpoint)
    model = build_sam2(name, ckpt_path=str(checkpoint), device="cpu", image_size=size).eval()
    assert Path(sys.modules["sam2"].__file__).resolve().parent == REPO_ROOT / "sam2"
    return model


def official_set_image_path(model):
    """What the official predictor's set_image computes, as one callable."""
    def run(images):
        out = model.forward_image(images)
        _, feats, _, _ = model._prepare_backbone_features(out)
        return feats[-1] + model.no_mem_embed
    return run


def time_once(fn, images) -> float:
    start = time.perf_counter()
    fn(images)
    return time.perf_counter() - start


def bench_pair(fns, images, runs, warmup):
    """Median seconds per side of ``fns`` ({side: callable}), runs interleaved."""
    times = {side: [] for side in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn(images)
        for i in range(runs):
            order = list(fns) if i % 2 == 0 else list(fns)[::-1]
            for side in order:
                times[side].append(time_once(fns[side], images))
    return ({side: statistics.median(values) for side, values in times.items()},
            {side: min(values) for side, values in times.items()})


def max_fpn_diff(official, ours, images) -> float:
    with torch.no_grad():
        got, want = ours.image_encoder(images), official.image_encoder(images)
    return max(float((g - w).abs().max()) for g, w in zip(got["backbone_fpn"], want["backbone_fpn"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["sam2.1_hiera_t", "sam2.1_hiera_l"],
                        choices=sorted(sam2_oracle.MODEL_CONFIGS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    official_models = build_official_models(args.models, args.size)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.size}x{args.size}, median of {args.runs} interleaved runs after {args.warmup} warm-up")
    print("image_encoder: model.image_encoder(x) on both sides (trunk + FPN neck + position encodings)")
    print("set_image path: official forward_image + _prepare_backbone_features + no_mem_embed vs our encode_image")
    print(f"{'model':<17}{'what':<16}{'official ms':>12}{'ours ms':>10}{'official/ours':>15}"
          f"{'(min ratio)':>12}{'max |diff|':>12}")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            official = official_models[name]
            ours = build_our_model(name, args.size, official, folder)
            diff = max_fpn_diff(official, ours, images)
            for what, fns in (("image_encoder", {"official": official.image_encoder,
                                                 "ours": ours.image_encoder}),
                              ("set_image path", {"official": official_set_image_path(official),
                                                  "ours": ours.encode_image})):
                median, best = bench_pair(fns, images, args.runs, args.warmup)
                print(f"{name:<17}{what:<16}{median['official'] * 1e3:>12.1f}"
                      f"{median['ours'] * 1e3:>10.1f}{median['official'] / median['ours']:>15.3f}"
                      f"{best['official'] / best['ours']:>12.3f}{diff:>12.2e}", flush=True)
            del ours


if __name__ == "__main__":
    main()
