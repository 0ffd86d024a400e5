"""Reference outputs from the official SAM2 package (PyPI ``sam2==1.1.0``), for parity tests.

Two halves live in this file:

* helpers for the test process (``fetch_sdist``, ``oracle_outputs``): fetch and unpack the
  official sdist into a cache folder and run this file as a script in a separate, isolated
  interpreter; they never import the official package;
* the script itself (``main``), which runs inside that interpreter with ``sys.path`` holding the
  unpacked sdist and nothing from this repository: it builds the official model from its own
  SAM2.1 config at a chosen image size, perturbs the random init with seeded noise (so that every
  weight, buffer and bias matters), saves the weights as an official-style checkpoint
  ``{"model": state_dict}`` and records what the official ``SAM2ImagePredictor`` returns for a set
  of images and prompts.

Everything the test replays (images, prompts, mask inputs) is stored in the output file, so the
two sides cannot drift apart. Outputs are cached per (model, image size, case set, version hash
of this file); the weights per (model, version hash), since no weight depends on the image size.

Cache folder: ``<repo>/.cache/sam2-oracle`` or ``$MDSAM_ORACLE_CACHE``.

CLI (normally driven by the tests)::

    python3 tests/sam2_oracle.py fetch
    python3 tests/sam2_oracle.py outputs --model sam2.1_hiera_t --size 512 --cases full
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SAM2_VERSION = "1.1.0"
SDIST_NAME = f"sam2-{SAM2_VERSION}.tar.gz"
# sha256 of the sdist on PyPI; a different file is refused rather than trusted as the oracle.
SDIST_SHA256 = "7e0ea252d43c10d853e3acfce0b5770ac683c30481bd6de311300e9d44f45b74"

REPO_ROOT = Path(__file__).resolve().parents[1]
ORACLE_FILE = Path(__file__).resolve()

MODEL_CONFIGS = {
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
CASE_SETS = ("full", "reduced")

# Seeded noise added to every float tensor of the official random init: N(0, 1) scaled by
# NOISE_ABS + NOISE_REL * std(tensor). The absolute part moves constant tensors (LayerNorm
# weights of 1, zero biases, zero position embeddings) off their trivial values.
NOISE_ABS = 0.02
NOISE_REL = 0.2
# Token 0's hypernetwork output layer is scaled by this factor after the noise. With random
# weights token 0's logits are small, so the official single-mask output always fails the
# stability check and falls back to the best multimask token; scaling makes its masks stable.
# The decoder is the same for every Hiera size, so each path is covered by two models.
TOKEN0_SCALE = {"sam2.1_hiera_t": 10.0, "sam2.1_hiera_s": 1.0, "sam2.1_hiera_b+": 10.0,
                "sam2.1_hiera_l": 1.0}
TOKEN0_KEY = "sam_mask_decoder.output_hypernetworks_mlps.0.layers.2."
STABILITY_THRESH = 0.98  # official build_sam2 post-processing setting

# Pixels whose full-resolution official logit lies within TIE_BAND * max|logit| of the threshold
# are recorded as ties: a 1e-3 relative logit difference may flip them either way.
TIE_BAND = 1e-3


class OracleError(RuntimeError):
    """The official reference could not be produced (download, unpack or oracle run failed)."""


# --------------------------------------------------------------------------- test-process side


def cache_dir() -> Path:
    """Folder holding the sdist, its unpacked tree, weights and outputs."""
    override = os.environ.get("MDSAM_ORACLE_CACHE")
    path = Path(override) if override else REPO_ROOT / ".cache" / "sam2-oracle"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def oracle_version() -> str:
    """Hash of this file and the sdist version: any change invalidates cached outputs."""
    digest = hashlib.sha256(ORACLE_FILE.read_bytes() + SAM2_VERSION.encode())
    return digest.hexdigest()[:12]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_sdist(folder: Path) -> Path:
    """``pip download`` the sdist into ``folder``; build isolation off so that preparing its
    metadata does not pull torch into a throw-away build environment."""
    env = dict(os.environ, SAM2_BUILD_CUDA="0")
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"sam2=={SAM2_VERSION}", "-d", str(folder), "--disable-pip-version-check"]
    errors = []
    for extra in (["--no-build-isolation"], []):
        proc = subprocess.run(base + extra, capture_output=True, text=True, env=env)
        if proc.returncode == 0 and (folder / SDIST_NAME).is_file():
            return folder / SDIST_NAME
        errors.append(f"$ {' '.join(base + extra)}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    raise OracleError(
        f"Could not download the official SAM2 sdist (sam2=={SAM2_VERSION}) used as the parity "
        f"oracle into {folder}. The parity tests need network access to PyPI once (later runs use "
        f"the cache), or put {SDIST_NAME} into that folder by hand "
        f"(or point MDSAM_ORACLE_CACHE at a folder holding it).\n" + "\n".join(errors))


def fetch_sdist() -> Path:
    """Return the root of the unpacked official sdist, downloading and unpacking it once."""
    folder = cache_dir()
    root = folder / f"sam2-{SAM2_VERSION}"
    if (root / "sam2" / "build_sam.py").is_file():
        return root
    archive = folder / SDIST_NAME
    if not archive.is_file():
        archive = _download_sdist(folder)
    found = _sha256(archive)
    if found != SDIST_SHA256:
        raise OracleError(f"{archive} has sha256 {found}, expected {SDIST_SHA256} (the PyPI "
                          f"sdist of sam2=={SAM2_VERSION}); delete it and rerun to download again.")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python without extraction filters: refuse absolute or escaping paths
                names = [m.name for m in tar.getmembers()]
                if any(n.startswith("/") or ".." in Path(n).parts for n in names):
                    raise OracleError(f"{archive} contains unsafe paths; delete it and rerun.")
                tar.extractall(tmp)
        os.replace(Path(tmp) / f"sam2-{SAM2_VERSION}", root)
    return root


def weights_file(model: str) -> Path:
    return cache_dir() / f"weights_{model}_{oracle_version()}.pt"


def outputs_file(model: str, size: int, cases: str) -> Path:
    return cache_dir() / f"outputs_{model}_{size}_{cases}_{oracle_version()}.pt"


def _remove_stale() -> None:
    """Delete weights/outputs made by another version of this file."""
    for path in cache_dir().glob("*.pt"):
        if path.name.startswith(("weights_", "outputs_")) and \
                not path.stem.endswith("_" + oracle_version()):
            path.unlink(missing_ok=True)


def oracle_outputs(model: str, size: int, cases: str = "full", timeout: float = 1200) -> Path:
    """Path of the cached official outputs for (model, size, cases), producing them if needed.

    The official package runs in ``python -I`` (no PYTHONPATH, no user site, no script folder
    on sys.path) with the cache folder as working directory.
    """
    if model not in MODEL_CONFIGS or cases not in CASE_SETS:
        raise ValueError(f"unknown model {model!r} or case set {cases!r}")
    out = outputs_file(model, size, cases)
    if out.is_file():
        return out
    sdist = fetch_sdist()
    _remove_stale()
    cmd = [sys.executable, "-I", str(ORACLE_FILE), "outputs", "--sdist", str(sdist),
           "--model", model, "--size", str(size), "--cases", cases,
           "--weights", str(weights_file(model)), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=cache_dir(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        raise OracleError(f"official SAM2 oracle failed (exit {proc.returncode}):\n$ {' '.join(cmd)}"
                          f"\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return out


# --------------------------------------------------------------------------- inputs


def make_image(height: int, width: int, seed: int):
    """An image-like uint8 H x W x 3 array: smooth background gradient, soft coloured blobs
    (one large lesion-like blob in the middle) and mild pixel noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    yy, xx = yy / height, xx / width
    image = np.empty((height, width, 3))
    for c in range(3):
        image[..., c] = 150 + 60 * (rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy)
    blobs = [((0.5, 0.5), 0.22)] + [((rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9)),
                                      rng.uniform(0.04, 0.15)) for _ in range(6)]
    for (cy, cx), radius in blobs:
        weight = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2)) ** 2)
        colour = rng.uniform(20, 230, size=3)
        image = image * (1 - weight[..., None]) + colour * weight[..., None]
    image += rng.normal(0, 4, size=image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def image_specs(size: int, cases: str):
    """(image name, height, width, seed): a square image at the model size and a non-square one."""
    specs = [("wide", 200, 300, 2)]
    if cases == "full":
        specs.insert(0, ("square", size, size, 1))
    return specs


def prompt_cases(height: int, width: int, cases: str):
    """Prompt cases in original-image pixel coordinates, as dicts for ``predict``.

    ``mask_from`` names an earlier case whose best (highest predicted IoU) low-res logits are
    fed back as ``mask_input``, as interactive use does.
    """
    import numpy as np

    def pts(*xy):
        return np.array([[x * width, y * height] for x, y in xy], dtype=np.float32)

    def labels(*values):
        return np.array(values, dtype=np.int32)

    box = np.array([0.3 * width, 0.28 * height, 0.72 * width, 0.7 * height], dtype=np.float32)
    base = {
        "none": {},
        "point": dict(point_coords=pts((0.5, 0.52)), point_labels=labels(1)),
        "points_pos_neg": dict(point_coords=pts((0.5, 0.52), (0.15, 0.2), (0.62, 0.45)),
                               point_labels=labels(1, 0, 1)),
        "box": dict(box=box),
        "box_point": dict(box=box, point_coords=pts((0.45, 0.5)), point_labels=labels(1)),
        "two_boxes": dict(box=np.stack([box, np.array([0.05 * width, 0.05 * height,
                                                       0.35 * width, 0.4 * height],
                                                      dtype=np.float32)])),
    }
    out = []
    for name, prompt in base.items():
        for multimask in (True, False):
            out.append(dict(name=f"{name}_mm{int(multimask)}", multimask_output=multimask, **prompt))
    out.append(dict(name="mask_feedback_mm0", multimask_output=False, mask_from="point_mm1",
                    **base["points_pos_neg"]))
    out.append(dict(name="mask_only_mm1", multimask_output=True, mask_from="box_mm0"))
    out.append(dict(name="point_logits_unnormalized", multimask_output=True, return_logits=True,
                    normalize_coords=False,
                    point_coords=np.array([[0.4, 0.6]], dtype=np.float32),
                    point_labels=labels(1)))
    if cases == "reduced":
        keep = {"none_mm1", "point_mm0", "box_point_mm1", "point_mm1", "mask_feedback_mm0"}
        out = [case for case in out if case["name"] in keep]
    return out


# --------------------------------------------------------------------------- oracle side


def _isolate(sdist: Path) -> None:
    """Make sure nothing from this repository can be imported, then expose the sdist."""
    repo = str(REPO_ROOT)
    sys.path[:] = [p for p in sys.path if p and not os.path.abspath(p).startswith(repo)]
    sys.path.insert(0, str(sdist))


def _perturb_(state: dict, seed: int) -> None:
    """Add seeded noise to every float tensor of ``state`` in place."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for key in sorted(state):
        tensor = state[key]
        if not tensor.is_floating_point():
            continue
        spread = tensor.float().std().item() if tensor.numel() > 1 else 0.0
        noise = torch.randn(tensor.shape, generator=gen) * (NOISE_ABS + NOISE_REL * spread)
        tensor.add_(noise.to(tensor.dtype))


def _seed_for(model: str) -> int:
    return int(hashlib.sha256(model.encode()).hexdigest()[:8], 16)


def _to_tensor(value):
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value


def pack_bits(mask):
    """Boolean array -> dict(bits=uint8 tensor, shape=list) (8x smaller on disk)."""
    import numpy as np
    import torch

    return {"bits": torch.from_numpy(np.packbits(mask.astype(bool).ravel())),
            "shape": list(mask.shape)}


def unpack_bits(packed):
    """Inverse of ``pack_bits``: a boolean numpy array."""
    import numpy as np

    count = int(np.prod(packed["shape"]))
    bits = np.unpackbits(packed["bits"].numpy(), count=count)
    return bits.astype(bool).reshape(packed["shape"])


def _record_stability(decoder) -> list:
    """Spy on the official decoder's single-mask fallback: the returned list receives token 0's
    stability scores (B) on every call, so that a failure near the threshold can be explained."""
    seen = []
    original = decoder._dynamic_multimask_via_stability

    def spy(all_mask_logits, all_iou_scores):
        seen.append(decoder._get_stability_scores(all_mask_logits[:, 0:1]))
        return original(all_mask_logits, all_iou_scores)

    decoder._dynamic_multimask_via_stability = spy
    return seen


def _run_official(args) -> None:
    _isolate(Path(args.sdist).resolve())
    import numpy as np
    import torch

    import sam2  # the official package, from the sdist

    origin = Path(sam2.__file__).resolve()
    if Path(args.sdist).resolve() not in origin.parents:
        raise SystemExit(f"imported sam2 from {origin}, not from the sdist {args.sdist}")
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    size = args.size
    torch.manual_seed(0)
    model = build_sam2(MODEL_CONFIGS[args.model], ckpt_path=None, device="cpu",
                       hydra_overrides_extra=[f"++model.image_size={size}"])
    weights = Path(args.weights)
    if weights.is_file():
        model.load_state_dict(torch.load(weights, weights_only=True)["model"], strict=True)
    else:
        state = model.state_dict()
        _perturb_(state, _seed_for(args.model))
        for suffix in ("weight", "bias"):
            state[TOKEN0_KEY + suffix].mul_(TOKEN0_SCALE[args.model])
        _atomic_save({"model": state}, weights)
    model.eval()

    stability = _record_stability(model.sam_mask_decoder)
    predictor = SAM2ImagePredictor(model)
    # The official predictor hard-codes the 1024-px feature sizes; derive them from the model.
    predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8),
                                (size // 16, size // 16)]
    result = {"meta": dict(model=args.model, size=size, cases=args.cases,
                           sam2_version=SAM2_VERSION, oracle_version=oracle_version(),
                           torch=str(torch.__version__)),
              "images": {}, "features": {}, "cases": []}
    for index, (image_name, height, width, seed) in enumerate(image_specs(size, args.cases)):
        image = make_image(height, width, seed)
        result["images"][image_name] = torch.from_numpy(image)
        predictor.set_image(image)
        features = {"image_embed": predictor.get_image_embedding().clone()}
        if index == 0:  # the model input and all features, for an encoder-only comparison
            features.update(input=predictor._transforms(image)[None], high_res_feats=[
                f.clone() for f in predictor._features["high_res_feats"]])
        result["features"][image_name] = features
        low_res_by_case = {}
        for case in prompt_cases(height, width, args.cases):
            kwargs = {k: v for k, v in case.items() if k not in ("name", "mask_from")}
            if "mask_from" in case:
                logits, ious = low_res_by_case[case["mask_from"]]
                kwargs["mask_input"] = logits[int(np.argmax(ious))][None]
            record = {"image": image_name, "name": case["name"]}
            record.update({k: _to_tensor(v) for k, v in kwargs.items()})
            stability.clear()
            # One call with logits; the boolean masks are derived below exactly as the official
            # predict does for return_logits=False (``masks > mask_threshold``).
            masks, ious, low_res = predictor.predict(**dict(kwargs, return_logits=True))
            if stability:  # token 0's stability score per prompt (single-mask cases only)
                record["stability"] = stability[0].flatten().clone()
            record.update(iou_predictions=_to_tensor(ious), low_res_logits=_to_tensor(low_res))
            if case.get("return_logits", False):
                record["masks"] = _to_tensor(masks)
            else:  # boolean masks, bit-packed, and the pixels that are ties at the threshold
                band = TIE_BAND * float(np.abs(masks).max())
                record.update(masks=pack_bits(masks > predictor.mask_threshold), mask_ties=pack_bits(
                    np.abs(masks - predictor.mask_threshold) <= band))
            low_res_by_case[case["name"]] = (low_res, ious)
            result["cases"].append(record)
    _atomic_save(result, Path(args.out))


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download and unpack the official sdist into the cache")
    run = sub.add_parser("outputs", help="produce (or reuse) official outputs")
    run.add_argument("--model", choices=sorted(MODEL_CONFIGS), required=True)
    run.add_argument("--size", type=int, required=True)
    run.add_argument("--cases", choices=CASE_SETS, default="full")
    run.add_argument("--sdist", help="unpacked sdist root; given: run the official model here")
    run.add_argument("--weights", help="weights file (created when absent)")
    run.add_argument("--out", help="outputs file")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(fetch_sdist())
    elif args.sdist:
        _run_official(args)
    else:
        print(oracle_outputs(args.model, args.size, args.cases))


if __name__ == "__main__":
    main()
