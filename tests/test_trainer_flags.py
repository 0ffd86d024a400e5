"""trainer.py flag errors: each bad flag stops the run early with a message naming the flag."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import active_learning_strategies
import settings
import trainer
from sam_lora_image_encoder_prompt import build_model
from synthetic_isic import make_synthetic_isic

REPO = Path(__file__).resolve().parents[1]


def run_main_expecting_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--demo", "--pool_size", "3", "--batch_size", "4"], "--pool_size: the pool (3) must be >= --batch_size (4)"),
        (["--demo", "--img_size", "100"], "--img_size must be a positive multiple of 32 (got 100)"),
        (["--demo", "--img_size", "0"], "--img_size must be a positive multiple of 32"),
        (["--demo", "--num_classes", "5"], "--num_classes 5: the masks are read as binary"),
        (["--demo", "--num_classes", "2"], "so they carry one class, lesion: use --num_classes 1"),
        (["--demo", "--max_epochs", "0"], "--max_epochs must be >= 1"),
        (["--demo", "--val_limit", "0"], "--val_limit must be >= 1"),
        (["--demo", "--dice_weight", "1.5"], "--dice_weight must be in [0, 1]"),
        (["--demo", "--click_mask_input"], "--click_mask_input changes how the clicks of --annotation_cost clicks "
                                           "are simulated, but --annotation_cost is pixels"),
        (["--demo", "--module", "json"], "--module json"),
        (["--demo", "--module", "no_such_module_xyz"], "--module no_such_module_xyz: cannot be imported"),
        (["--demo", "--promptmode", "circle"], "--promptmode"),
        (["--demo", "--promptmode", "1"], "--promptmode: 1: of the reference code's integer prompt modes only 0"),
        ([], "--data_root is required"),
        (["--demo", "--base_lr", "inf"], "--base_lr must be a finite number > 0 (got inf)"),
        (["--demo", "--base_lr", "nan"], "--base_lr must be a finite number > 0 (got nan)"),
        (["--demo", "--dice_weight", "nan"], "--dice_weight must be in [0, 1] (got nan)"),
        (["--demo", "--seed", "-1"], "--seed must be in 0..4294967295 (got -1)"),
    ],
)
def test_bad_flag_names_the_flag(argv, expected, capsys, tmp_path):
    err = run_main_expecting_error(argv + ["--output", str(tmp_path / "out")], capsys)
    assert expected in err
    assert not (tmp_path / "out").exists(), "a refused run must not create its output folder"


def test_module_with_the_reference_s_lora_sam_is_refused_naming_what_it_lacks(capsys, tmp_path, monkeypatch):
    """The reference's sam_lora_image_encoder_prompt (LoRA_Sam(sam, r) on its unpublished sam2_base_1) used to be a
    TypeError traceback; a stand-in with its signature (the import of sam2_base_1 aside) is refused before anything
    is loaded."""
    (tmp_path / "reference_lora.py").write_text(
        "import torch\n\nclass LoRA_Sam(torch.nn.Module):\n    def __init__(self, sam_model, r, lora_layer=None):\n"
        "        super().__init__()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = run_main_expecting_error(["--demo", "--module", "reference_lora", "--output", str(tmp_path / "out")],
                                   capsys)
    assert "--module reference_lora (" in err and "lacks the parameter(s) num_classes, lora_width" in err
    assert "method(s) encode, decode, predict_logits" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_module_without_lora_sam_is_explained(capsys, tmp_path):
    err = run_main_expecting_error(["--demo", "--module", "json", "--output", str(tmp_path)], capsys)
    assert "defines no LoRA_Sam class" in err


def test_missing_checkpoint_points_to_the_download_readme(capsys, tmp_path):
    err = run_main_expecting_error(
        ["--data_root", str(tmp_path), "--checkpoint", str(tmp_path / "sam2.1_hiera_large.pt")], capsys)
    assert "--checkpoint" in err and "sam2.1_hiera_large.pt" in err
    assert "sam2/checkpoints/README.md" in err


def test_missing_data_root_folder(capsys, tmp_path):
    err = run_main_expecting_error(["--data_root", str(tmp_path / "nope"), "--checkpoint", "none"], capsys)
    assert f"--data_root {tmp_path / 'nope'}: no such folder" in err


def test_data_root_without_splits_names_the_folder(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    err = run_main_expecting_error(["--data_root", str(tmp_path / "data"), "--checkpoint", "none",
                                    "--output", str(tmp_path / "out")], capsys)
    assert "--data_root" in err and "Training" in err


def test_unknown_strategy_lists_the_choices(capsys, tmp_path):
    err = run_main_expecting_error(["--demo", "--strategy", "magic", "--output", str(tmp_path)], capsys)
    assert "--strategy: invalid choice: 'magic'" in err and "mask_difference" in err and "entropy" in err


def test_resume_without_a_run(capsys, tmp_path):
    err = run_main_expecting_error(["--demo", "--resume", "--output", str(tmp_path)], capsys)
    assert "--resume" in err and "last_state.pth" in err


def test_existing_run_folder_is_refused_without_resume(capsys, tmp_path):
    run_dir = tmp_path / "Skin_128"
    run_dir.mkdir()
    (run_dir / "config.txt").write_text("earlier run\n")
    err = run_main_expecting_error(["--demo", "--img_size", "128", "--output", str(tmp_path)], capsys)
    assert f"{run_dir} holds a run that stopped before finishing its first epoch" in err
    assert "config.txt lacks img_size, batch_size, pool_size and " in err and "choose another --output" in err
    assert (run_dir / "config.txt").read_text() == "earlier run\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.txt", "owner.lock"], "only the lock it held meanwhile"


def test_missing_cuda_index_lists_devices(capsys, tmp_path, monkeypatch):
    """With CUDA present, --gpu naming a device that does not exist is an error listing the devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"Fake GPU {i}")
    err = run_main_expecting_error(["--demo", "--gpu", "7", "--output", str(tmp_path)], capsys)
    assert "--gpu" in err and "no GPU 7" in err
    assert "Fake GPU 0" in err and "Fake GPU 1" in err


def test_demo_settings_yield_to_explicit_flags(tmp_path):
    parser = settings.build_parser()
    argv = ["--demo", "--img_size", "64", "--max_epochs", "50", "--output", str(tmp_path)]
    args = settings.prepare_args(parser, parser.parse_args(argv), argv)
    assert args.img_size == 64 and args.max_epochs == 50  # given explicitly (50 is also the default)
    assert args.model_cfg == "sam2.1_hiera_t"
    assert args.pool_size == settings.DEMO_SETTINGS["pool_size"]
    assert args.batch_size == settings.DEMO_SETTINGS["batch_size"]
    assert args.data_root == str(tmp_path / "demo_data")


def test_settings_are_read_only_after_preparation(tmp_path):
    """No step can change a setting behind the others' back: prepared settings refuse assignment, and the paths
    resolved in preparation come back as values (the parsed namespace is left as parsed)."""
    parser = settings.build_parser()
    argv = ["--demo", "--output", str(tmp_path), "--model_cfg", "sam2/configs/sam2.1/sam2.1_hiera_t.yaml"]
    parsed = parser.parse_args(argv)
    args = settings.prepare_args(parser, parsed, argv)
    with pytest.raises(AttributeError, match="read-only"):
        args.checkpoint = "other.pt"
    assert Path(args.model_cfg).is_file() and args.data_root == str(tmp_path / "demo_data")
    assert parsed.model_cfg == "sam2/configs/sam2.1/sam2.1_hiera_t.yaml" and parsed.data_root is None


def test_pool_is_reproducible_per_epoch_and_drawn_from_the_unlabeled():
    unlabeled = list(range(0, 40, 3))
    first = active_learning_strategies.draw_pool(unlabeled, 5, seed=1, epoch=3)
    assert first == active_learning_strategies.draw_pool(unlabeled, 5, seed=1, epoch=3)
    assert len(set(first)) == 5 and set(first) <= set(unlabeled)
    others = {tuple(active_learning_strategies.draw_pool(unlabeled, 5, seed=1, epoch=e)) for e in range(1, 8)}
    assert len(others) > 1, "pools of different epochs should differ"
    assert active_learning_strategies.draw_pool(unlabeled[:3], 5, seed=1, epoch=3) == unlabeled[:3]


def test_cli_prints_help_and_flag_errors():
    """The user-facing entry point: `python trainer.py --help` and a flag error, as a subprocess."""
    shown = subprocess.run([sys.executable, "trainer.py", "--help"], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    for flag in ("--data_root", "--output", "--gpu", "--seed", "--deterministic", "--base_lr", "--batch_size",
                 "--pool_size", "--img_size", "--num_classes", "--max_epochs", "--promptmode", "--module",
                 "--rank", "--lora_ckpt", "--model_cfg", "--checkpoint", "--strategy", "--dice_weight",
                 "--val_every", "--val_limit", "--num_workers", "--resume", "--demo"):
        assert flag in shown.stdout
    failed = subprocess.run([sys.executable, "trainer.py", "--demo", "--img_size", "100"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert "trainer.py: error: --img_size must be a positive multiple of 32 (got 100)" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_resume_from_an_unreadable_state_is_explained(capsys, tmp_path):
    run_dir = tmp_path / "Skin_128"
    run_dir.mkdir()
    (run_dir / "last_state.pth").write_bytes(b"not a torch file")
    err = run_main_expecting_error(["--demo", "--img_size", "128", "--resume", "--output", str(tmp_path)], capsys)
    assert "--resume: cannot read" in err and "last_state.pth" in err


def test_build_model_starts_from_a_lora_ckpt(tmp_path):
    """--lora_ckpt: LoRA, prompt encoder and decoders come from the file; the rest from --checkpoint."""
    trained = build_model("sam2.1_hiera_t", None, img_size=64, seed=1)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)  # stand-in for training
    trained.save_lora_parameters(tmp_path / "lora.pth")
    fresh = build_model("sam2.1_hiera_t", None, img_size=64, seed=2)
    loaded = build_model("sam2.1_hiera_t", None, img_size=64, seed=2, lora_ckpt=str(tmp_path / "lora.pth"))
    want, got, before = trained.state_dict(), loaded.state_dict(), fresh.state_dict()
    changed = [k for k in want if not torch.equal(want[k], before[k])]
    assert changed, "the stand-in training changed nothing"
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_unknown_model_cfg_and_mismatched_checkpoint_name_the_flags(capsys, tmp_path):
    data = make_synthetic_isic(tmp_path / "data", n_train=2, n_val=1, size=64, seed=0)
    common = ["--data_root", str(data), "--gpu", "cpu", "--img_size", "64", "--batch_size", "1", "--pool_size", "1"]
    err = run_main_expecting_error(common + ["--model_cfg", "sam2.1_hiera_zz", "--checkpoint", "none",
                                             "--output", str(tmp_path / "a")], capsys)
    assert "--model_cfg sam2.1_hiera_zz" in err
    bad = tmp_path / "sam2.1_hiera_small.pt"
    torch.save({"model": {"image_encoder.bogus": torch.zeros(1)}}, bad)
    err = run_main_expecting_error(common + ["--model_cfg", "sam2.1_hiera_t", "--checkpoint", str(bad),
                                             "--output", str(tmp_path / "b")], capsys)
    assert f"--checkpoint {bad}: does not fit the model config sam2.1_hiera_t" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- issue 9: no raw tracebacks

def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process may not create files in (root ignores permission bits, but not a pseudo file system)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    return Path("/sys")


@pytest.mark.parametrize("case", ["file", "unwritable"])
def test_output_that_is_a_file_or_not_writable_is_one_line_error(case, capsys, tmp_path):
    """--output naming a file (was NotADirectoryError) or a folder the user may not write (was PermissionError):
    one line naming --output, exit code 2, nothing written (the demo's data included)."""
    if case == "file":
        output = tmp_path / "a_file"
        output.write_text("not a folder\n")
    else:
        output = unwritable_folder(tmp_path) / "out"
        try:
            tempfile.TemporaryFile(dir=output.parent).close()
            pytest.skip(f"{output.parent} is writable here")
        except OSError:
            pass
    before = sorted(tmp_path.rglob("*"))
    err = run_main_expecting_error(["--demo", "--output", str(output)], capsys)
    assert f"--output {output}" in err and ("is a file, not a folder" if case == "file" else "cannot write") in err
    assert "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before, "a refused run wrote something"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_synthetic_isic(tmp_path_factory.mktemp("tiny"), n_train=2, n_val=1, size=64, seed=0)


class _Payload:
    """Pickled, this is a call of print(): code, which a checkpoint must never hold."""

    def __reduce__(self):
        return print, ("PAYLOAD RAN",)


def test_text_file_as_checkpoint_is_said_to_be_no_checkpoint(tiny_data, capsys, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not a checkpoint\n")
    err = run_main_expecting_error(["--data_root", str(tiny_data), "--gpu", "cpu", "--img_size", "64",
                                    "--model_cfg", "sam2.1_hiera_t", "--checkpoint", str(text),
                                    "--output", str(tmp_path / "out")], capsys)
    assert f"--checkpoint: {text} is not a readable PyTorch checkpoint" in err and "not a file written by torch.save" in err
    assert "pop from empty list" not in err and "does not fit" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["--checkpoint", "--lora_ckpt", "last_state.pth"])
def test_pickled_code_is_refused_for_safety_everywhere(where, tiny_data, capsys, tmp_path):
    """A pickle holding code, as --checkpoint, --lora_ckpt or the run's last_state.pth: refused without running
    it, saying why, and without passing on torch's advice to load it with weights_only=False."""
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": _Payload()}, bad)
    argv = ["--data_root", str(tiny_data), "--gpu", "cpu", "--img_size", "64", "--model_cfg", "sam2.1_hiera_t",
            "--checkpoint", "none", "--batch_size", "1", "--pool_size", "1", "--output", str(tmp_path / "out")]
    if where == "last_state.pth":
        run_dir = tmp_path / "out" / "Skin_64"
        run_dir.mkdir(parents=True)
        bad = bad.rename(run_dir / "last_state.pth")
        argv += ["--resume"]
    else:
        argv = [a if a != "none" or where != "--checkpoint" else str(bad) for a in argv]
        argv += ["--lora_ckpt", str(bad)] if where == "--lora_ckpt" else []
    err = run_main_expecting_error(argv, capsys)
    assert str(bad) in err and "holds pickled Python objects (code)" in err and "refused for safety" in err
    assert "weights_only" not in err and "Traceback" not in err
    assert "PAYLOAD RAN" not in capsys.readouterr().out
