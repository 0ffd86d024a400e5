"""build_sam2: config names, image_size override, checkpoint loading and its errors, encode_image.

Parity with the official SAM2 is tested in test_sam2_parity.py; here only our own contract.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sam2.build_sam as build_sam
from sam2.build_sam import (
    CheckpointError,
    CheckpointReadError,
    ConfigFileError,
    ConfigNotFoundError,
    build_sam2,
    load_checkpoint,
    resolve_config_path,
    state_mismatch,
)
from sam2.sam2_image_predictor import SAM2ImagePredictor

REPO = Path(__file__).resolve().parents[1]
T_YAML = REPO / "sam2" / "configs" / "sam2.1" / "sam2.1_hiera_t.yaml"
VIDEO_GROUPS = ("memory_attention.layers.0.linear1.weight", "memory_encoder.out_proj.weight",
                "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial",
                "obj_ptr_proj.layers.0.weight", "obj_ptr_tpos_proj.weight", "mask_downsample.weight")


@pytest.fixture(scope="module")
def tiny():
    return build_sam2("sam2.1_hiera_t", device="cpu", image_size=128)


def official_style_file(model, path: Path, perturb: float = 0.0, edit=None) -> dict:
    """Save model weights as an official checkpoint: {"model": sd}, one decoder, video tensors
    (``edit(sd)`` may change the state dict before it is saved)."""
    gen = torch.Generator().manual_seed(1)
    sd = {k: v + perturb * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
          for k, v in model.state_dict().items() if not k.startswith("sam_mask_decoder2.")}
    for key in VIDEO_GROUPS:
        sd[key] = torch.randn(3, 4, generator=gen)
    if edit is not None:
        edit(sd)
    torch.save({"model": sd}, path)
    return sd


@pytest.mark.parametrize("name", ["sam2.1_hiera_t", "sam2.1_hiera_t.yaml",
                                  "configs/sam2.1/sam2.1_hiera_t.yaml",
                                  "configs/sam2.1/sam2.1_hiera_t", str(T_YAML)])
def test_config_name_forms(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing relative to the working directory
    assert resolve_config_path(name) == T_YAML.resolve()


def test_readme_relative_path_from_repo_root_and_elsewhere(tmp_path, monkeypatch):
    readme_form = "./sam2/configs/sam2.1/sam2.1_hiera_t.yaml"
    monkeypatch.chdir(REPO)
    assert resolve_config_path(readme_form) == T_YAML.resolve()
    # a copy in another working directory is taken as given (a user's edited config)
    (tmp_path / "sam2" / "configs" / "sam2.1").mkdir(parents=True)
    shutil.copy(T_YAML, tmp_path / readme_form)
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(readme_form) == (tmp_path / readme_form).resolve()


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigNotFoundError) as info:
        build_sam2(str(tmp_path / "nope.yaml"), device="cpu")
    assert "nope.yaml" in str(info.value) and "sam2.1_hiera_l" in str(info.value)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "sam2.1_hiera_tiny.pt"
    with pytest.raises(FileNotFoundError) as info:
        build_sam2("sam2.1_hiera_t", ckpt_path=str(missing), device="cpu")
    assert str(missing) in str(info.value) and "checkpoints/README.md" in str(info.value)


@pytest.mark.parametrize("size,how", [(96, "argument"), (160, "hydra override")])
def test_image_size_override_shapes(size, how):
    if how == "argument":
        model = build_sam2("sam2.1_hiera_t", device="cpu", image_size=size)
    else:
        model = build_sam2("sam2.1_hiera_t", device="cpu", hydra_overrides_extra=[f"++model.image_size={size}"])
    assert model.image_size == size
    assert model.sam_prompt_encoder.input_image_size == (size, size)
    assert model.sam_prompt_encoder.image_embedding_size == (size // 16, size // 16)
    assert model.sam_prompt_encoder.get_dense_pe().shape == (1, 256, size // 16, size // 16)
    with torch.no_grad():
        feats = model.encode_image(torch.randn(1, 3, size, size))
    assert feats["image_embed"].shape == (1, 256, size // 16, size // 16)
    assert [tuple(f.shape) for f in feats["high_res_feats"]] == [(1, 32, size // 4, size // 4),
                                                                  (1, 64, size // 8, size // 8)]


def test_bad_image_size_and_override_are_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_sam2("sam2.1_hiera_t", device="cpu", image_size=200)
    with pytest.raises(KeyError, match="no_such_option"):
        build_sam2("sam2.1_hiera_t", device="cpu", hydra_overrides_extra=["model.no_such_option=1"])


def test_encode_image_adds_no_mem_embed_to_forward_image(tiny):
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        feats = tiny.encode_image(images)
        upstream = tiny.forward_image(images)
    expected = upstream["vision_features"] + tiny.no_mem_embed.view(1, -1, 1, 1)
    assert torch.allclose(feats["image_embed"], expected, atol=1e-6)
    assert not torch.allclose(feats["image_embed"], upstream["vision_features"], atol=1e-3)
    for ours, theirs in zip(feats["high_res_feats"], upstream["backbone_fpn"][:2]):
        assert torch.allclose(ours, theirs, atol=1e-6)
    with pytest.raises(ValueError, match="128 x 128"):
        tiny.encode_image(torch.randn(1, 3, 96, 96))


def test_seeded_init_postprocessing_and_mode(tiny):
    """Random init is seeded (same weights at any image size, global RNG untouched);
    apply_postprocessing sets upstream's decoder defaults; mode picks train/eval."""
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    plain = build_sam2("sam2.1_hiera_t", device="cpu", image_size=64, apply_postprocessing=False, mode="train")
    assert torch.equal(torch.rand(1), expected_draw)
    for (key, a), b in zip(tiny.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), key
    for decoder in (tiny.sam_mask_decoder, tiny.sam_mask_decoder2):
        assert decoder.dynamic_multimask_via_stability is True
        assert decoder.dynamic_multimask_stability_delta == 0.05
        assert decoder.dynamic_multimask_stability_thresh == 0.98
    assert plain.sam_mask_decoder.dynamic_multimask_via_stability is False
    assert plain.training and not tiny.training


def test_cuda_request_without_cuda_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CPU"):
        model = build_sam2("sam2.1_hiera_t", device="cuda", image_size=64)
    assert model.device.type == "cpu"


def test_official_config_with_video_entries_builds(tmp_path, caplog):
    """An upstream config (video nodes with _target_s we do not have) builds, with one log line."""
    text = T_YAML.read_text().replace("  image_size: 1024", (
        "  memory_attention:\n    _target_: sam2.modeling.memory_attention.MemoryAttention\n"
        "    d_model: 256\n  memory_encoder:\n    _target_: sam2.modeling.memory_encoder.MemoryEncoder\n"
        "  num_maskmem: 7\n  use_obj_ptrs_in_encoder: true\n  image_size: 1024"))
    path = tmp_path / "official_like.yaml"
    path.write_text(text)
    with caplog.at_level(logging.INFO, logger="sam2.build_sam"):
        model = build_sam2(str(path), device="cpu", image_size=64)
    lines = [r.getMessage() for r in caplog.records if "video-only" in r.getMessage()]
    assert len(lines) == 1 and "memory_attention" in lines[0] and "num_maskmem" in lines[0]
    assert model.image_size == 64


def test_official_checkpoint_loads_and_copies_decoder(tiny, tmp_path, caplog):
    path = tmp_path / "official.pt"
    saved = official_style_file(tiny, path, perturb=0.05)
    with caplog.at_level(logging.INFO, logger="sam2.build_sam"):
        model = build_sam2("sam2.1_hiera_t", ckpt_path=str(path), device="cpu", image_size=64)
    skipped = [r.getMessage() for r in caplog.records if "video-only" in r.getMessage()]
    assert len(skipped) == 1 and str(len(VIDEO_GROUPS)) in skipped[0]
    state = model.state_dict()
    for key, value in saved.items():
        if key not in VIDEO_GROUPS:
            assert torch.equal(state[key], value), key
    for key in (k for k in state if k.startswith("sam_mask_decoder.")):
        twin = key.replace("sam_mask_decoder.", "sam_mask_decoder2.", 1)
        assert torch.equal(state[twin], state[key]) and state[twin].data_ptr() != state[key].data_ptr()


def test_full_save_with_decoder2_loads_decoder2(tiny, tmp_path):
    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    key2 = "sam_mask_decoder2.iou_token.weight"
    sd[key2] += 1.0
    torch.save(sd, tmp_path / "full.pt")  # a bare state dict
    model = build_sam2("sam2.1_hiera_t", ckpt_path=str(tmp_path / "full.pt"), device="cpu", image_size=64)
    assert torch.equal(model.state_dict()[key2], sd[key2])
    assert not torch.equal(model.sam_mask_decoder2.iou_token.weight, model.sam_mask_decoder.iou_token.weight)


def test_wrong_size_checkpoint_is_one_short_summary(tiny, tmp_path):
    """Issue 18: a checkpoint of another size is said in one short line (counts, a few names, the two sizes and the
    config to use), not hundreds of key names."""
    path = tmp_path / "tiny_weights.pt"
    official_style_file(tiny, path)
    with pytest.raises(CheckpointError) as info:
        build_sam2("sam2.1_hiera_s", ckpt_path=str(path), device="cpu", image_size=64)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)
    assert "image_encoder.trunk.blocks.12" in message  # hiera_s has 16 blocks, hiera_t 12
    assert "hiera_t (embed_dim 96, 12 blocks)" in message and "hiera_s (embed_dim 96, 16 blocks)" in message
    assert "different model sizes" in message and "use the config of the file's size (sam2.1_hiera_t)" in message
    assert str(path) in message and "\n" not in message and len(message) < 700, message


def test_state_mismatch_counts_and_names_a_few():
    expected = {f"sam.k{i}": (2,) for i in range(10)}
    found = {**{f"sam.k{i}": (2,) for i in range(3, 10)}, "sam.k9": (3,), "sam.x": (1,), "sam.y": (1,)}
    assert state_mismatch(expected, expected) is None
    assert state_mismatch(found, expected) == ("3 keys missing (e.g. sam.k0, sam.k1, sam.k2); 2 unexpected (e.g. "
                                               "sam.x, sam.y); 1 of another shape (e.g. sam.k9: file (3,), model (2,))")


def test_stray_and_missing_keys_are_errors(tiny, tmp_path):
    def corrupt(sd):
        sd["image_encoder.extra_head.weight"] = torch.zeros(2)
        del sd["sam_prompt_encoder.no_mask_embed.weight"]

    official_style_file(tiny, tmp_path / "bad.pt", edit=corrupt)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tiny, tmp_path / "bad.pt")
    assert "image_encoder.extra_head.weight" in str(info.value)
    assert "sam_prompt_encoder.no_mask_embed.weight" in str(info.value)


def test_untrusted_or_foreign_file_is_sam2s_own_error(tiny, tmp_path):
    """sam2 loads with weights_only=True itself and raises its own typed error (it imports nothing of the
    project); the project maps it to its message (tests/test_safe_io.py)."""
    torch.save({"model": {"a": object()}}, tmp_path / "pickle.pt")  # needs full unpickling
    with pytest.raises(CheckpointReadError, match="pickle.pt.*weights_only=True.*UnpicklingError") as info:
        load_checkpoint(tiny, tmp_path / "pickle.pt")
    assert isinstance(info.value, CheckpointError) and info.value.path == tmp_path / "pickle.pt"
    assert type(info.value.cause).__name__ == "UnpicklingError" and info.value.__cause__ is info.value.cause
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointReadError, match="notes.pt"):
        load_checkpoint(tiny, tmp_path / "notes.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "pickle.pt").read_bytes()[:200])  # a zip without its directory
    with pytest.raises(CheckpointReadError, match=r"cut\.pt.*\(RuntimeError\)"):
        load_checkpoint(tiny, tmp_path / "cut.pt")
    torch.save({"epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="state dict"):
        load_checkpoint(tiny, tmp_path / "other.pt")


def write_config(path: Path, edit=lambda text: text) -> Path:
    path.write_text(edit(T_YAML.read_text()))
    return path


@pytest.mark.parametrize("case, match", [
    ("checkpoint", r"bad\.yaml is a PyTorch checkpoint \(a zip archive\), not a YAML config; were the config and "
                   r"the checkpoint swapped\? pass a SAM2 YAML config: a path, or one of sam2\.1_hiera_b\+"),
    ("binary", r"bad\.yaml is not a YAML file \('utf-8' codec can't decode"),
    ("no_model", r"bad\.yaml has no top-level 'model' node \(it holds keys trainer, epochs\), so it is no SAM2 config"),
    ("list", r"bad\.yaml has no top-level 'model' node \(it holds a list\)"),
])
def test_config_that_is_no_sam2_config_says_what_it_is(case, match, tmp_path):
    """Issue 18: --model_cfg naming a checkpoint, a binary file, or YAML of something else."""
    path = tmp_path / "bad.yaml"
    if case == "checkpoint":
        torch.save({"model": {"w": torch.zeros(1)}}, path)
    elif case == "binary":
        path.write_bytes(b"\x00\x01\xfe\xff" * 20)
    else:
        path.write_text("trainer: 1\nepochs: 3\n" if case == "no_model" else "- 1\n- 2\n")
    with pytest.raises(ConfigFileError, match=match):
        build_sam2(str(path), device="cpu", image_size=64)


@pytest.mark.parametrize("where", ["model", "nested"])
def test_config_building_other_than_sam2_classes_is_refused_unbuilt(where, tmp_path, monkeypatch):
    """Issue 18: a _target_ can name any callable (os.system ...); it is refused before Hydra is asked to build."""
    def never(*args, **kwargs):
        raise AssertionError("instantiate was called")

    monkeypatch.setattr(build_sam, "instantiate", never)
    if where == "model":
        edit = lambda text: text.replace("_target_: sam2.modeling.sam2_base.SAM2Base",
                                         "_target_: os.system\n  _args_: ['echo ran']", 1)
    else:
        edit = lambda text: text.replace("sam2.modeling.backbones.hieradet.Hiera", "builtins.print", 1)
    path = write_config(tmp_path / "evil.yaml", edit)
    expected = "builds 'os.system', not sam2.modeling.sam2_base.SAM2Base" if where == "model" else (
        "asks to build builtins.print, which is no SAM2 image-model class; it is refused unbuilt")
    with pytest.raises(ConfigFileError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        build_sam2(str(path), device="cpu", image_size=64)
    monkeypatch.undo()
    assert "hieradet.Hiera" in build_sam.load_config("sam2.1_hiera_t").image_encoder.trunk._target_


def test_config_with_options_our_classes_do_not_take(tmp_path):
    path = write_config(tmp_path / "typo.yaml", lambda text: text.replace("embed_dim: 96", "embed_dimm: 96", 1))
    with pytest.raises(ConfigFileError, match=r"typo\.yaml: the model cannot be built from it \(.*embed_dimm"):
        build_sam2(str(path), device="cpu", image_size=64)


def test_predictor_shapes_follow_image_size(tiny):
    predictor = SAM2ImagePredictor(tiny)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict()
    image = (np.random.default_rng(0).random((90, 140, 3)) * 255).astype(np.uint8)
    predictor.set_image(image)
    masks, ious, low_res = predictor.predict(point_coords=np.array([[70.0, 45.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 90, 140) and masks.dtype == np.float32  # 0/1, as upstream
    assert set(np.unique(masks)) <= {0.0, 1.0}
    assert ious.shape == (3,) and ious.dtype == np.float32
    assert low_res.shape == (3, 32, 32) and low_res.dtype == np.float32
    logits, _, _ = predictor.predict(box=np.array([10, 10, 100, 80]), mask_input=low_res[:1],
                                     multimask_output=False, return_logits=True)
    assert logits.shape == (1, 90, 140) and logits.dtype == np.float32
    with pytest.raises(ValueError, match="H x W x 3"):
        predictor.set_image(image[..., 0])
