"""Parity of our ``sam2`` package with the official SAM2.1 (PyPI ``sam2==1.1.0``).

The official package runs in a separate, isolated interpreter (``tests/sam2_oracle.py``): it
builds each model from its own config with seeded, perturbed random weights, saves them as an
official-style checkpoint and records its ``SAM2ImagePredictor`` outputs. Here we build our model
from that checkpoint, replay the same images and prompts, and compare.

Relative difference of a tensor ``ours`` against the official ``ref``:

    rel = max|ours - ref| / max(max|ref|, EPS)

It must be <= RTOL for ``low_res_logits``, ``iou_predictions`` and float masks. Boolean masks
must agree on every pixel except ties: pixels where the official full-resolution logit lies
within 1e-3 * max|logit| of the threshold (recorded by the oracle).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

RTOL = 1e-3
EPS = 1e-6

T, S, BP, L = "sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l"
# (model, image size, case set): every prompt case with a square and a non-square image for
# hiera_t at every size and for every model at 512; a reduced set on the other combinations.
MATRIX = [
    (T, 256, "full"), (T, 512, "full"), (T, 1024, "full"),
    (S, 256, "reduced"), (S, 512, "full"), (S, 1024, "reduced"),
    (BP, 256, "reduced"), (BP, 512, "full"),
    pytest.param(BP, 1024, "reduced", marks=pytest.mark.slow),
    (L, 256, "reduced"), (L, 512, "full"),
    pytest.param(L, 1024, "reduced", marks=pytest.mark.slow),
]


def build_ours(model_name: str, checkpoint, size: int):
    """Our model, after checking that ``sam2`` is this repository's package (an installed
    official ``sam2`` shadowing it would make every comparison trivially pass)."""
    import sam2
    from sam2.build_sam import build_sam2

    ours = Path(__file__).resolve().parents[1] / "sam2"
    assert Path(sam2.__file__).resolve().parent == ours, \
        f"imported sam2 from {sam2.__file__}, not {ours}; run pytest from the repository root"
    return build_sam2(model_name, ckpt_path=str(checkpoint), device="cpu", image_size=size)


def rel_diff(ours, ref) -> float:
    ours = torch.as_tensor(np.asarray(ours), dtype=torch.float64)
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    return float((ours - ref).abs().max() / max(float(ref.abs().max()), EPS))


def _predict_kwargs(record: dict) -> dict:
    """The predict() arguments the oracle used, as the numpy inputs a user passes."""
    names = ("point_coords", "point_labels", "box", "mask_input", "multimask_output",
             "return_logits", "normalize_coords")
    return {k: (record[k].numpy() if torch.is_tensor(record[k]) else record[k])
            for k in names if k in record}


class ParityRun:
    """Our model on one oracle output file. Compares as it goes and keeps only the figures:
    per case (``worst`` over all cases, ``failures``) and for the image features
    (``feature_diffs``):
    ``get_image_embedding()`` after every ``set_image``, and ``encode_image`` on the official
    input tensor of the first image (all features) for the 256-px models."""

    def __init__(self, oracle, model_name: str, size: int, cases: str):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.label = f"{model_name}@{size}"
        ref = torch.load(oracle.oracle_outputs(model_name, size, cases), weights_only=True)
        model = build_ours(model_name, oracle.weights_file(model_name), size)
        predictor = SAM2ImagePredictor(model)
        self.n_cases, self.worst, self.failures, self.feature_diffs = 0, {}, [], {}
        for image_name, image in ref["images"].items():
            predictor.set_image(image.numpy())
            self.feature_diffs[f"{image_name}/image_embed"] = rel_diff(
                predictor.get_image_embedding(), ref["features"][image_name]["image_embed"])
            for record in ref["cases"]:
                if record["image"] == image_name:
                    self._check(record, predictor.predict(**_predict_kwargs(record)),
                                oracle.unpack_bits)
        self.n_expected = len(ref["cases"])
        if size == 256:
            image_name, feats = next(iter(ref["features"].items()))
            with torch.no_grad():
                ours = model.encode_image(feats["input"])
            self.feature_diffs[f"{image_name}/encode_image.image_embed"] = rel_diff(
                ours["image_embed"], feats["image_embed"])
            for i, want in enumerate(feats["high_res_feats"]):
                got = ours["high_res_feats"][i] if i < len(ours["high_res_feats"]) else None
                self.feature_diffs[f"{image_name}/encode_image.high_res_feats[{i}]"] = (
                    rel_diff(got, want) if got is not None and got.shape == want.shape
                    else float("inf"))

    def _check(self, record: dict, ours, unpack_bits) -> None:
        self.n_cases += 1
        figures, problems = _compare_case(record, ours, unpack_bits)
        for name, value in figures.items():
            self.worst[name] = max(self.worst.get(name, value), value)
        if problems:
            self.failures.append(f"{record['image']}/{record['name']}: " + "; ".join(problems))


@pytest.fixture(scope="module")
def parity_runs(sam2_oracle):
    """ParityRun per matrix entry, built on first use and shared by this module's tests."""
    runs = {}

    def get(model_name: str, size: int, cases: str) -> ParityRun:
        key = (model_name, size, cases)
        if key not in runs:
            runs[key] = ParityRun(sam2_oracle, model_name, size, cases)
        return runs[key]

    return get


def _compare_case(record: dict, ours, unpack_bits) -> tuple[dict, list[str]]:
    """Figures (rel diffs, flipped mask pixels) and problems for one case."""
    masks, ious, low_res = ours
    problems, figures = [], {}
    ref_masks = record["masks"]
    for name, got, ref in (("low_res_logits", low_res, record["low_res_logits"]),
                           ("iou_predictions", ious, record["iou_predictions"])):
        if tuple(np.shape(got)) != tuple(ref.shape) or np.asarray(got).dtype != np.float32:
            problems.append(f"{name}: shape/dtype {np.shape(got)}/{np.asarray(got).dtype}, "
                            f"official {tuple(ref.shape)}/float32")
            continue
        figures[name] = rel_diff(got, ref)
        if figures[name] > RTOL:
            problems.append(f"{name}: rel diff {figures[name]:.3g}")
    if isinstance(ref_masks, dict):  # boolean masks, bit-packed, with the tied pixels
        ref_bool, ties = unpack_bits(ref_masks), unpack_bits(record["mask_ties"])
        got = np.asarray(masks)  # official: float32 0/1 (masks.float() in its predict)
        if (got.shape != ref_bool.shape or got.dtype != np.float32
                or not np.isin(got, (0.0, 1.0)).all()):
            problems.append(f"masks: shape/dtype {got.shape}/{got.dtype}, official "
                            f"{ref_bool.shape}/float32 of 0/1")
        else:
            flipped = (got == 1.0) != ref_bool
            figures["mask_px_flipped"] = int(flipped.sum())
            wrong = int((flipped & ~ties).sum())
            if wrong:
                problems.append(f"masks: {wrong} of {flipped.size} pixels differ away from ties")
    else:  # return_logits=True: float masks at the original size
        if tuple(np.shape(masks)) != tuple(ref_masks.shape):
            problems.append(f"masks: shape {np.shape(masks)}, official {tuple(ref_masks.shape)}")
        else:
            figures["mask_logits"] = rel_diff(masks, ref_masks)
            if figures["mask_logits"] > RTOL:
                problems.append(f"mask logits: rel diff {figures['mask_logits']:.3g}")
    if problems and "stability" in record:
        problems.append(f"(official token-0 stability {record['stability'].tolist()}, "
                        f"fallback threshold 0.98)")
    return figures, problems


@pytest.mark.parametrize("model_name,size,cases", MATRIX)
def test_predictor_matches_official(parity_runs, report_figure, model_name, size, cases):
    run = parity_runs(model_name, size, cases)
    summary = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in sorted(run.worst.items()))
    report_figure(f"parity {run.label:>22} ({run.n_cases} cases): max rel diff {summary}")
    assert run.n_cases == run.n_expected
    assert not run.failures, f"{run.label}: {len(run.failures)} case(s) differ from official " \
        f"SAM2:\n" + "\n".join(run.failures)


@pytest.mark.parametrize("model_name,size,cases", MATRIX)
def test_image_features_match_official(parity_runs, report_figure, model_name, size, cases):
    """The image features match too; localises a predictor mismatch to the encoder (here) or
    to the prompt/decoder path."""
    run = parity_runs(model_name, size, cases)
    report_figure(f"features {run.label:>20}: max rel diff " +
                  ", ".join(f"{k} {v:.2e}" for k, v in run.feature_diffs.items()))
    assert max(run.feature_diffs.values()) <= RTOL, f"{run.label}: {run.feature_diffs}"


def test_official_checkpoint_with_video_groups_loads(sam2_oracle):
    """A {"model": sd} file with every official key group (video ones too) loads; every
    image-path tensor arrives by name, and decoder 2 starts as a copy of decoder 1."""
    sam2_oracle.oracle_outputs(T, 256, "full")  # makes sure the weights exist
    model = build_ours(T, sam2_oracle.weights_file(T), 256)
    official = torch.load(sam2_oracle.weights_file(T), weights_only=True)["model"]
    video = {"memory_attention", "memory_encoder", "maskmem_tpos_enc", "no_mem_pos_enc",
             "no_obj_ptr", "no_obj_embed_spatial", "obj_ptr_proj", "obj_ptr_tpos_proj",
             "mask_downsample"}
    assert video <= {key.split(".")[0] for key in official}, "oracle checkpoint lacks video groups"
    ours = model.state_dict()
    image_keys = [k for k in official if k.split(".")[0] not in video]
    missing = [k for k in image_keys if k not in ours]
    assert not missing, f"official image-path keys absent from our model: {missing[:10]}"
    for key in image_keys:
        assert torch.equal(ours[key], official[key]), f"{key} not loaded"
    decoder1 = {k: v for k, v in ours.items() if k.startswith("sam_mask_decoder.")}
    assert decoder1
    for key, value in decoder1.items():
        copy = ours[key.replace("sam_mask_decoder.", "sam_mask_decoder2.", 1)]
        assert torch.equal(copy, value) and copy.data_ptr() != value.data_ptr(), key


def test_bare_state_dict_loads(sam2_oracle, tmp_path):
    """A bare state dict (no {"model": ...} wrapper, image-path keys only) loads too."""
    official = torch.load(sam2_oracle.weights_file(T), weights_only=True)["model"]
    bare = {k: v for k, v in official.items()
            if k.split(".")[0] in ("image_encoder", "sam_prompt_encoder", "sam_mask_decoder",
                                   "no_mem_embed")}
    torch.save(bare, tmp_path / "bare.pt")
    model = build_ours(T, tmp_path / "bare.pt", 256)
    ours = model.state_dict()
    for key, value in bare.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("donor", [S, BP])
def test_wrong_size_checkpoint_is_a_clear_error(sam2_oracle, donor):
    """hiera_s weights (extra blocks) or hiera_b+ weights (other widths) into the hiera_t
    config: an error that names offending keys, not a silent partial load."""
    sam2_oracle.oracle_outputs(donor, 256, "reduced")  # makes sure the donor weights exist
    donor_file = sam2_oracle.weights_file(donor)
    donor_keys = set(torch.load(donor_file, weights_only=True)["model"])
    t_keys = set(torch.load(sam2_oracle.weights_file(T), weights_only=True)["model"])
    with pytest.raises(Exception) as info:
        build_ours(T, donor_file, 256)
    message = str(info.value)
    named = [k for k in donor_keys if k.startswith("image_encoder.") and k in message]
    assert named, f"error does not name any checkpoint key: {message[:500]}"
    if donor == S:  # hiera_s has blocks hiera_t lacks
        extra = sorted(donor_keys - t_keys)
        assert any(k in message for k in extra), f"error names none of {extra[:3]}...: {message[:500]}"
