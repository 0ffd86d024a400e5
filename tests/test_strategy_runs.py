"""Every strategy of the registry in a real trainer run (64 px, 2 epochs, seeded random weights): the pools it is
given, the image-encoder passes it makes (counted), the pretrained embeddings computed once per run, the picture
of where the picks sit, --first_round, and a run killed mid-way (MDSAM_CRASH_AT) that resumes with the same
selections and reads its cache instead of encoding again.

One module fixture runs each arm once; the runs share the data and every setting but the arm's. They run on one
thread: at 64 px threads only add waiting, and the killed and the resumed processes then compute the same bits.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import active_learning_strategies
import trainer
from active_learning_strategies import EMBEDDINGS_FILE, ActiveLearningStrategyFactory
from sam_lora_image_encoder_prompt import LoRA_Sam
from synthetic_isic import make_synthetic_isic

N_TRAIN, EPOCHS, BATCH, POOL, SEED = 8, 2, 2, 4, 7
BASE = ["--demo", "--gpu", "cpu", "--img_size", "64", "--batch_size", str(BATCH), "--pool_size", str(POOL),
        "--max_epochs", str(EPOCHS), "--val_limit", "1", "--save_from_epoch", str(EPOCHS + 1), "--seed", str(SEED)]
FIRST_ROUND = "typiclust@all+mask_difference"  # epoch 1 by TypiClust over every unlabeled image, then mask difference
# every strategy of the registry (mask_difference in FIRST_ROUND's epoch 2, and alone in test_trainer_e2e.py)
ARMS = {**{name: ["--strategy", name] for name in ActiveLearningStrategyFactory.available_strategies()
           if name != "mask_difference"},
        FIRST_ROUND: ["--strategy", "mask_difference", "--first_round", "typiclust@all"]}
PRETRAINED = {"coreset", "typiclust", "probcover", "alps"}
VIEWS = {"random": 0, "tta": 4}  # encoder passes per pool image while selecting; 1 for the other model scores


class EncoderPasses:
    """Counts LoRA_Sam.encode's images: (images, LoRA on, in scoring's inference mode) per call."""

    def __init__(self) -> None:
        self.calls = []

    def install(self, monkeypatch) -> None:
        encode = LoRA_Sam.encode

        def counted(model, images):
            lora_on = all(module.enabled for module in model.lora_modules())
            self.calls.append((images.shape[0], lora_on, torch.is_inference_mode_enabled()))
            return encode(model, images)

        monkeypatch.setattr(LoRA_Sam, "encode", counted)

    def selecting(self, lora_on: bool) -> int:
        """Images encoded while selecting (pool scoring and embeddings run in inference mode; training and
        validation do not)."""
        return sum(n for n, on, scoring in self.calls if scoring and on == lora_on)


def remove_checkpoints(run_dir: Path) -> None:
    for path in run_dir.glob("*.pth"):
        path.unlink()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_isic(tmp_path_factory.mktemp("data"), N_TRAIN, 2, 0, size=64, seed=5)


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory, one_thread):
    """arm -> (run folder, the encoder passes of its run); checkpoints removed (nothing here looks at them)."""
    out, done = tmp_path_factory.mktemp("runs"), {}
    for arm, flags in ARMS.items():
        passes = EncoderPasses()
        with pytest.MonkeyPatch.context() as monkeypatch:
            passes.install(monkeypatch)
            result = trainer.main(BASE + flags + ["--data_root", str(data), "--output", str(out / arm)])
        remove_checkpoints(result["run_dir"])
        done[arm] = result["run_dir"], passes
    return done


def pools(names, rows, pool_sizes):
    """The pool of each epoch, recomputed from the selections before it (active_learning_strategies.draw_pool's rule)."""
    labeled, found = set(), {}
    for epoch, pool_size in enumerate(pool_sizes, start=1):
        unlabeled = [i for i in range(len(names)) if names[i] not in labeled]
        found[epoch] = {names[i] for i in active_learning_strategies.draw_pool(unlabeled, pool_size, SEED, epoch)}
        labeled |= {r["image"] for r in rows if int(r["epoch"]) == epoch}
    return found


def training_names(data):
    import datasets_skin

    return datasets_skin.SemiSupervisedSkinDataset(*datasets_skin.find_split(data, "Training"), img_size=64).names


def test_every_strategy_selects_from_its_pools_and_says_which_strategy_chose(runs, data, selection_rows):
    names = training_names(data)
    for arm, (run_dir, _) in runs.items():
        rows = selection_rows(run_dir)
        chosen = [r["image"] for r in rows]
        assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 2] and len(set(chosen)) == 4, arm
        first = arm == FIRST_ROUND
        for epoch, pool in pools(names, rows, ["all" if first else POOL, POOL]).items():
            picked = [r for r in rows if int(r["epoch"]) == epoch]
            assert {r["image"] for r in picked} <= pool and len(pool) == (N_TRAIN if first and epoch == 1 else POOL)
            assert [int(r["rank_in_pool"]) for r in picked] == [1, 2], (arm, epoch)
            want = ("typiclust" if epoch == 1 else "mask_difference") if first else arm
            assert {r["strategy"] for r in picked} == {want}, (arm, epoch)
    config = (runs[FIRST_ROUND][0] / "config.txt").read_text()
    assert "first_round: typiclust@all\n" in config and "strategy: mask_difference\n" in config
    assert "first_round: none\n" in (runs["typiclust"][0] / "config.txt").read_text()


def test_encoder_passes_no_strategy_adds_one_and_the_pretrained_embeddings_are_made_once(runs, data,
                                                                                          selection_rows):
    names = training_names(data)
    for arm, (run_dir, passes) in runs.items():
        rows = selection_rows(run_dir)
        if arm in PRETRAINED:
            seen = set().union(*pools(names, rows, [POOL, POOL]).values())
            # each image of either pool once (epoch 2's labeled images were in epoch 1's pool), LoRA off
            assert (passes.selecting(lora_on=False), passes.selecting(lora_on=True)) == (len(seen), 0), arm
            stored = torch.load(run_dir / EMBEDDINGS_FILE, weights_only=True)
            assert len(stored["digests"]) == len(seen) and stored["key"]["img_size"] == "64", arm
        elif arm == FIRST_ROUND:
            # epoch 1: every training image once (pretrained); epoch 2: mask difference, one pass per pool image
            assert (passes.selecting(lora_on=False), passes.selecting(lora_on=True)) == (N_TRAIN, POOL)
        else:
            views = VIEWS.get(arm, 1)
            assert (passes.selecting(lora_on=False), passes.selecting(lora_on=True)) == (0, views * POOL * EPOCHS), arm
            assert not (run_dir / EMBEDDINGS_FILE).exists(), arm


def test_tensorboard_shows_where_the_picks_sit(runs, tensorboard):
    """al/why_selected: the PCA picture for the embedding strategies (FIRST_ROUND's epoch 1), the compared masks for
    mask_difference (its epoch 2); tta has no picture."""
    for arm in ("typiclust", "mask_difference_diverse", FIRST_ROUND, "tta"):
        images = tensorboard(runs[arm][0] / "log")["images"]
        assert images.get("al/why_selected", []) == ([] if arm == "tta" else [1, 2]), arm


def test_a_killed_run_resumes_with_the_same_selections_and_reads_its_cache(runs, data, tmp_path, selection_rows,
                                                                           one_thread):
    """Killed after epoch 2's selection (its rows and cache written, nothing trained): the resumed run redoes epoch 2
    and selects what the uninterrupted run selected, from the vectors the killed process left."""
    arm = "probcover"
    argv = BASE + ARMS[arm] + ["--data_root", str(data), "--output", str(tmp_path)]
    env = dict(os.environ, MDSAM_CRASH_AT="selected:2", OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, str(Path(trainer.__file__)), *argv], env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == 3, killed.stdout[-2000:] + killed.stderr[-2000:]
    run_dir = tmp_path / "Skin_64"
    assert (run_dir / EMBEDDINGS_FILE).is_file(), "the killed process had written its cache"
    passes = EncoderPasses()
    with pytest.MonkeyPatch.context() as monkeypatch:
        passes.install(monkeypatch)
        trainer.main(argv + ["--resume"])
    remove_checkpoints(run_dir)
    want = selection_rows(runs[arm][0])
    got = selection_rows(run_dir)
    assert [(r["epoch"], r["image"], r["rank_in_pool"], r["strategy"]) for r in got] == \
           [(r["epoch"], r["image"], r["rank_in_pool"], r["strategy"]) for r in want]
    assert [float(r["score"]) for r in got] == pytest.approx([float(r["score"]) for r in want], abs=1e-6)
    # every vector epoch 2 needs was computed before the kill: the resumed process encodes none
    assert passes.selecting(lora_on=False) == 0 and passes.selecting(lora_on=True) == 0
    assert "resumed at epoch 2" in (run_dir / "config.txt").read_text()
