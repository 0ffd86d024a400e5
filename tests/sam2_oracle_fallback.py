"""Official SAM2 single-mask logits with and without its stability fallback, for the zero-shot test.

``sam2_oracle.py`` scales token 0 of hiera_t and hiera_b+ so that their single-mask output is
stable; hiera_s and hiera_l keep token 0 as perturbed, so their single-mask output is unstable and
the official decoder (in eval mode) replaces it with the best of the multi-mask tokens 1-3. The
official predictor's logits then never show token 0. This oracle records, for sam2_oracle's
weights of one of those models, one square image and two prompts ("none", a positive point), what
the official ``SAM2ImagePredictor.predict(multimask_output=False)`` returns

* with its fallback on (the default): ``fallback`` (plus token 0's stability scores), and
* with it switched off (``sam_mask_decoder.dynamic_multimask_via_stability = False``):
  ``no_fallback``, i.e. token 0's own logits, which LoRA_Sam's class-1 logit must equal.

It runs like ``sam2_oracle.py``: the official package from the unpacked sdist in a separate
``python -I`` interpreter; the output is cached in sam2_oracle's cache folder as
``fallback_<model>_<size>_<version>.pt`` (version: hash of this file and of sam2_oracle's version;
only files with this prefix are ever removed here).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

THIS_FILE = Path(__file__).resolve()
PREFIX = "fallback_"
# (name, predict() keyword arguments for an S x S image) -- positions as fractions of S.
PROMPTS = (("none", {}), ("point", {"point_coords": [[0.5, 0.52]], "point_labels": [1]}))


def _load_sam2_oracle():
    """tests/sam2_oracle.py as a module, by file path (works inside the isolated interpreter)."""
    spec = importlib.util.spec_from_file_location("sam2_oracle", THIS_FILE.with_name("sam2_oracle.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def version(sam2_oracle) -> str:
    return hashlib.sha256(THIS_FILE.read_bytes() + sam2_oracle.oracle_version().encode()).hexdigest()[:12]


def fallback_outputs(sam2_oracle, model: str, size: int, timeout: float = 600) -> Path:
    """Path of the cached official outputs for (model, size), producing them if needed."""
    out = sam2_oracle.cache_dir() / f"{PREFIX}{model}_{size}_{version(sam2_oracle)}.pt"
    if out.is_file():
        return out
    sam2_oracle.oracle_outputs(model, size, "reduced")  # makes sure sam2_oracle's weights exist
    for stale in sam2_oracle.cache_dir().glob(f"{PREFIX}{model}_{size}_*.pt"):
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-I", str(THIS_FILE), "--sdist", str(sam2_oracle.fetch_sdist()), "--model", model,
           "--size", str(size), "--weights", str(sam2_oracle.weights_file(model)), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=sam2_oracle.cache_dir(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        raise sam2_oracle.OracleError(f"official SAM2 fallback oracle failed (exit {proc.returncode}):\n"
                                      f"$ {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return out


def _run_official(args) -> None:
    """Oracle side: only the official package (from the sdist) and sam2_oracle's helpers."""
    oracle = _load_sam2_oracle()
    oracle._isolate(Path(args.sdist).resolve())
    import numpy as np
    import torch

    from sam2.build_sam import build_sam2  # the official package
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    size = args.size
    model = build_sam2(oracle.MODEL_CONFIGS[args.model], ckpt_path=None, device="cpu",
                       hydra_overrides_extra=[f"++model.image_size={size}"])
    model.load_state_dict(torch.load(args.weights, weights_only=True)["model"], strict=True)
    model.eval()
    decoder = model.sam_mask_decoder
    stability = oracle._record_stability(decoder)
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    image = oracle.make_image(size, size, seed=1)
    predictor.set_image(image)
    result = {"meta": dict(model=args.model, size=size, fallback_thresh=decoder.dynamic_multimask_stability_thresh),
              "input": predictor._transforms(image)[None], "cases": []}
    for name, prompt in PROMPTS:
        kwargs = {k: np.asarray(v, dtype=np.float32 if k == "point_coords" else np.int32) for k, v in prompt.items()}
        if "point_coords" in kwargs:
            kwargs["point_coords"] = kwargs["point_coords"] * size  # square image: pixels = model input pixels
        record = {"name": name, **{k: torch.from_numpy(v) for k, v in kwargs.items()}}
        for key, fallback in (("fallback", True), ("no_fallback", False)):
            decoder.dynamic_multimask_via_stability = fallback
            stability.clear()
            _, ious, low_res = predictor.predict(multimask_output=False, return_logits=True, **kwargs)
            record[key] = {"low_res_logits": torch.from_numpy(low_res), "iou_predictions": torch.from_numpy(ious)}
            if stability:
                record[key]["stability"] = stability[0].flatten().clone()
        result["cases"].append(record)
    oracle._atomic_save(result, Path(args.out))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag in ("--sdist", "--model", "--weights", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--size", type=int, required=True)
    _run_official(parser.parse_args(argv))


if __name__ == "__main__":
    main()
