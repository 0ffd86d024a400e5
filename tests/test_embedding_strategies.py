"""The strategies of issue 17 through the strategy interface: embeddings from the encoder pass, the pretrained
embeddings' cache (once per run, its key, rebuilt when stale), coreset / typiclust / probcover / alps on points whose
answer is worked out by hand in the comments, the diversity-aware mask difference against plain top-k, tta's
flips, --pool_size all and --first_round on the command line. (embedding_selection's rules themselves:
test_embedding_selection.py; every strategy in a real run: test_strategy_runs.py.)"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

from active_learning_strategies import (EMBEDDINGS_FILE, ActiveLearningStrategyFactory, MaskDifferenceStrategy,
                                        SelectionContext, StrategyChoice, StrategySettingError, embedding_vectors)

IMAGE_SIZE, LOW_RES, BIG = 16, 4, 30.0
# Embedding directions (degrees on the unit circle) of dataset images 0..9: three blobs far apart.
# A (5 images) around 0 deg, B (3) around 90 deg, C (2) around 180 deg; image 10 (labeled in some tests) sits in A.
ANGLES = {0: 0, 1: 2, 2: -2, 3: 1, 4: -1, 5: 92, 6: 90, 7: 88, 8: 181, 9: 179, 10: 0.5}
KEY = {"model_cfg": "sam2.1_hiera_t", "checkpoint": "w.pt (12 bytes)", "img_size": "16"}


def direction(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


class VectorSam(nn.Module):
    """Stands in for LoRA_Sam. Image i (its pixel value) has the embedding direction ANGLES[i]: encode's
    backbone_fpn[-1] is B x 2 x 2 x 2 whose spatial mean is 3 x that unit vector (a +-0.5 checkerboard on top, so
    only the mean gives it). Unprompted decoder 1 covers the first coverage[i] of 16 cells, prompted decoders
    nothing. Records each encode as (images, LoRA on)."""

    def __init__(self, coverage=None):
        super().__init__()
        self.coverage = coverage or {}
        self.weight = nn.Parameter(torch.zeros(1))
        self.lora_on = True
        self.encodes = []

    @contextmanager
    def lora_disabled(self):
        self.lora_on = False
        try:
            yield
        finally:
            self.lora_on = True

    def encode(self, images):
        ids = images[:, 0, 0, 0].round().long().tolist()
        self.encodes.append((len(ids), self.lora_on))
        checker = torch.tensor([[0.5, -0.5], [-0.5, 0.5]])
        top = torch.stack([torch.tensor(direction(ANGLES[i]))[:, None, None] * 3 + checker for i in ids])
        return {"ids": ids, "backbone_fpn": [None, None, top]}

    def decode(self, features, decoder_idx, points=None, boxes=None):
        logits = torch.zeros(len(features["ids"]), 2, LOW_RES * LOW_RES)
        logits[:, 1] = -BIG
        for b, index in enumerate(features["ids"]):
            if points is None and decoder_idx == 1:
                logits[b, 1, :self.coverage.get(index, 0)] = BIG
        return {"low_res_logits": logits.view(-1, 2, LOW_RES, LOW_RES)}

    def predict_logits(self, images, decoder_idx=1, points=None, boxes=None, features=None):
        return self.decode(self.encode(images) if features is None else features, decoder_idx, points)["low_res_logits"]

    def images_encoded(self, lora_on):
        return sum(n for n, on in self.encodes if on == lora_on)


def dataset(n=11):
    return [{"image": torch.full((3, IMAGE_SIZE, IMAGE_SIZE), float(i)), "index": i} for i in range(n)]


def select(name, model, pool, k, labeled=(), data=None, **context):
    strategy = context.pop("strategy", None) or ActiveLearningStrategyFactory.create_strategy(name)
    select.strategy = strategy
    return strategy.select(SelectionContext(model, dataset() if data is None else data, pool, k, torch.device("cpu"),
                                            labeled=list(labeled), batch_size=3, seed=5, **context))


@pytest.fixture
def strategy_log():
    """The lines the strategies log (they go to the trainer's log.txt in a run)."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("trainer.strategies")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


# ---- the embedding of an image --------------------------------------------------------------


def test_embedding_vectors_are_the_normalised_spatial_mean_of_the_top_fpn_level():
    top = torch.randn(3, 256, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.3
    vectors = embedding_vectors({"backbone_fpn": [None, None, top], "image_embed": top + 100})
    mean = top.sum(dim=(2, 3)) / 16  # written out: the mean over the 4 x 4 positions, then divided by its length
    expected = mean / mean.pow(2).sum(dim=1, keepdim=True).sqrt()
    torch.testing.assert_close(vectors, expected, rtol=0, atol=1e-6)
    assert vectors.shape == (3, 256) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3), rtol=0, atol=1e-6)


def test_an_image_embedding_does_not_depend_on_batch_size_or_position():
    """With the real encoder (hiera_t, 64 px, seeded random weights): an image's vector is the same alone, in a batch
    of three and at another position in it."""
    from sam2.build_sam import build_sam2
    from sam_lora_image_encoder_prompt import LoRA_Sam

    torch.manual_seed(0)
    net = LoRA_Sam(build_sam2("sam2.1_hiera_t", None, device="cpu", image_size=64), r=4).eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = embedding_vectors(net.encode(images))
        alone = torch.cat([embedding_vectors(net.encode(images[i:i + 1])) for i in range(3)])
        reversed_batch = embedding_vectors(net.encode(images.flip(0))).flip(0)
    torch.testing.assert_close(batch.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(alone, batch, rtol=0, atol=1e-5)
    torch.testing.assert_close(reversed_batch, batch, rtol=0, atol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-3, "different images, different vectors"


# ---- the set strategies, worked out by hand ----------------------------------------------------


def test_typiclust_takes_the_most_typical_image_of_each_large_uncovered_cluster():
    model = VectorSam()
    pool = list(range(10))
    # clusters = the blobs A (5), B (3), C (2), largest first; the most typical (smallest mean distance to the rest
    # of its cluster) is the middle one: A 0 deg = image 0, B 90 deg = image 6; C's two tie -> lower position, 8
    selection = select("typiclust", model, pool, 3)
    assert selection.chosen == [0, 6, 8]
    assert selection.ranks()[0] == 1 and selection.ranks()[8] == 3 and sorted(selection.ranks().values()) == \
        list(range(1, 11)), "chosen first, in order, then the rest of the pool"
    assert selection.scores == {i: {0: 1.0, 6: 2 / 3, 8: 1 / 3}.get(i, 0.0) for i in pool}
    # image 10 (0.5 deg) is labeled: |L| + k = 3 clusters again, A holds it, so B and C
    assert select("typiclust", VectorSam(), pool, 2, labeled=[10]).chosen == [6, 8]
    assert model.images_encoded(lora_on=True) == 0, "fixed features: the pretrained encoder only"


def test_coreset_spreads_from_the_labeled_images():
    # from image 10 (0.5 deg): the farthest is 181 deg (179.5 deg away) = image 8; then from {0.5, 181}: B's
    # distances are 89 (92 deg), 89.5 (90 deg), 87.5 (88 deg) -> image 6; then A's -2 deg (2.5 from 0.5) = image 2
    assert select("coreset", VectorSam(), list(range(10)), 3, labeled=[10]).chosen == [8, 6, 2]


def test_probcover_covers_the_largest_uncovered_balls_then_falls_back_to_the_farthest():
    # delta 0.1 > every chord within a blob (at most 2 sin(2 deg) = 0.07), < any between blobs: image 10's ball
    # covers A; B's balls cover 3 (lowest position: image 5 at 92 deg), C's 2 (image 8); then nothing is left to
    # cover and the farthest from {0.5, 92, 181 deg} is 88 deg (4 deg from 92) = image 7
    strategy = ActiveLearningStrategyFactory.create_strategy("probcover", probcover_delta=0.1)
    assert select("probcover", VectorSam(), list(range(10)), 3, labeled=[10], strategy=strategy).chosen == [5, 8, 7]


def test_alps_takes_the_image_nearest_each_centre_and_ignores_the_labeled():
    # pool clusters A, B, C, largest first; nearest to the mean direction: 0 deg, 90 deg, C's tie -> image 8
    assert select("alps", VectorSam(), list(range(10)), 3, labeled=[10]).chosen == [0, 6, 8]


@pytest.mark.parametrize("name", ["coreset", "typiclust", "probcover", "alps"])
def test_k_beyond_the_pool_and_fewer_distinct_images_than_clusters(name):
    """k larger than the pool chooses the whole pool (as top-k does); two copies of one image (fewer distinct
    vectors than clusters) are both chosen, each once."""
    data = dataset(3)
    data[2] = dict(data[1], index=2)  # image 2 is a copy of image 1
    selection = select(name, VectorSam(), [0, 1, 2], 5, data=data)
    assert sorted(selection.chosen) == [0, 1, 2]


def test_coreset_on_current_features_encodes_pool_and_labeled_with_lora_every_epoch(tmp_path):
    model = VectorSam()
    strategy = ActiveLearningStrategyFactory.create_strategy("coreset", coreset_features="current")
    for _ in range(2):
        select("coreset", model, [0, 5, 8], 1, labeled=[10], strategy=strategy, run_dir=tmp_path)
    assert model.images_encoded(lora_on=True) == 2 * 4 and model.images_encoded(lora_on=False) == 0
    assert not (tmp_path / EMBEDDINGS_FILE).exists()


# ---- the pretrained embeddings' cache ---------------------------------------------------------


def test_pretrained_embeddings_are_computed_once_per_run_and_survive_a_restart(tmp_path, strategy_log):
    model = VectorSam()
    first = select("typiclust", model, [0, 1, 5, 8], 2, run_dir=tmp_path, feature_key=KEY)
    assert model.encodes == [(3, False), (1, False)], "the 4 pool images, in batches of 3, LoRA off"
    strategy = select.strategy
    # the next epoch: the two left of the pool and image 6 (new); the two labeled were seen -> one encoder pass
    rest = [i for i in [0, 1, 5, 8] if i not in first.chosen]
    select("typiclust", model, rest + [6], 1, labeled=first.chosen, run_dir=tmp_path, feature_key=KEY,
           strategy=strategy)
    assert model.images_encoded(lora_on=False) == 5
    # a resumed run: a new strategy (another process) reads the run folder's file and encodes nothing it holds
    again = select("typiclust", model, [0, 1, 5, 8], 2, run_dir=tmp_path, feature_key=KEY)
    assert again.chosen == first.chosen and model.images_encoded(lora_on=False) == 5
    assert [line for line in strategy_log if "encoded" in line] == [
        f"pretrained embeddings: 4 image(s) encoded, 0 from the cache ({tmp_path / EMBEDDINGS_FILE})",
        f"pretrained embeddings: 1 image(s) encoded, 4 from the cache ({tmp_path / EMBEDDINGS_FILE})"]
    stored = torch.load(tmp_path / EMBEDDINGS_FILE, weights_only=True)
    assert stored["key"] == KEY and len(stored["digests"]) == 5
    torch.testing.assert_close(stored["vectors"].norm(dim=1), torch.ones(5))


def test_a_cache_of_other_settings_or_a_damaged_one_is_rebuilt_and_said(tmp_path, strategy_log):
    model = VectorSam()
    select("alps", model, [0, 5, 8], 2, run_dir=tmp_path, feature_key=KEY)
    other = dict(KEY, checkpoint="other.pt (13 bytes)")
    select("alps", model, [0, 5, 8], 2, run_dir=tmp_path, feature_key=other)
    assert model.images_encoded(lora_on=False) == 6, "another model's vectors are not used"
    assert f"{tmp_path / EMBEDDINGS_FILE} is not used (it was made with other settings: checkpoint was w.pt " \
           "(12 bytes), now other.pt (13 bytes)); rebuilding it" in strategy_log
    assert torch.load(tmp_path / EMBEDDINGS_FILE, weights_only=True)["key"] == other
    (tmp_path / EMBEDDINGS_FILE).write_bytes(b"half a file")
    select("alps", model, [0, 5, 8], 2, run_dir=tmp_path, feature_key=other)
    assert model.images_encoded(lora_on=False) == 9
    assert any(line.startswith(f"{tmp_path / EMBEDDINGS_FILE} is not used (it cannot be read") for line in strategy_log)
    select("alps", model, [0, 5, 8], 2, run_dir=tmp_path, feature_key=other)
    assert model.images_encoded(lora_on=False) == 9, "rebuilt: used again"


@pytest.mark.parametrize("damage, why", [
    ("a NaN vector", "it holds NaN or inf in the vectors of 1 image(s)"),
    ("an infinite vector", "it holds NaN or inf in the vectors of 1 image(s)"),
    ("vectors of another width", "its vectors are 3 wide, the encoder's 2"),
    ("integer vectors", "it cannot be read: vectors of dtype torch.int64, not floating point"),
    ("vectors of another shape", "it cannot be read: 3 digests for vectors of shape (3, 1, 2)"),
])
def test_a_damaged_cache_is_checked_on_load_rebuilt_and_said(tmp_path, strategy_log, damage, why):
    """Issue 26: a NaN vector was an EmbeddingSelectionError traceback, vectors of another width (cached for some
    images, new ones encoded) a RuntimeError from torch.stack. Every vector is checked (shape, width, finite); a
    damaged file is rebuilt, as any unusable cache is, and the log says why."""
    model = VectorSam()
    select("alps", model, [0, 5, 8], 2, run_dir=tmp_path, feature_key=KEY)
    path = tmp_path / EMBEDDINGS_FILE
    stored = torch.load(path, weights_only=True)
    vectors = stored["vectors"]
    if damage in ("a NaN vector", "an infinite vector"):
        vectors[1, 0] = float("nan") if damage == "a NaN vector" else float("inf")
    elif damage == "vectors of another width":
        vectors = torch.cat([vectors, torch.zeros(3, 1)], dim=1)
    elif damage == "integer vectors":
        vectors = vectors.round().long()
    else:
        vectors = vectors[:, None]
    torch.save(dict(stored, vectors=vectors), path)
    again = select("alps", VectorSam(), [0, 5, 8, 6], 2, run_dir=tmp_path, feature_key=KEY)  # a resumed run
    assert f"{path} is not used ({why}); rebuilding it" in strategy_log
    assert [line for line in strategy_log if "encoded" in line][-1] == \
        f"pretrained embeddings: 4 image(s) encoded, 0 from the cache ({path})"
    rebuilt = torch.load(path, weights_only=True)
    assert rebuilt["vectors"].shape == (4, 2) and torch.isfinite(rebuilt["vectors"]).all()
    torch.testing.assert_close(rebuilt["vectors"].norm(dim=1), torch.ones(4))
    assert again.chosen == select("alps", VectorSam(), [0, 5, 8, 6], 2, feature_key=KEY).chosen, "as from no file"


def test_an_image_whose_pixels_changed_is_encoded_again(tmp_path):
    model, data = VectorSam(), dataset()
    select("alps", model, [0, 5], 1, data=data, run_dir=tmp_path, feature_key=KEY)
    data[5] = {"image": data[5]["image"] + 1e-3, "index": 5}  # another decode of image 5, say
    select("alps", model, [0, 5], 1, data=data, run_dir=tmp_path, feature_key=KEY)
    assert model.images_encoded(lora_on=False) == 3


# ---- mask difference made diverse, tta ------------------------------------------------------------


def test_mask_difference_diverse_takes_at_most_one_near_duplicate_from_one_encoder_pass():
    # images 0, 1, 2 (0, 2, -2 deg) are near-duplicates and score highest (16, 15, 14 of 16 cells covered);
    # 6 (90 deg) and 8 (181 deg) are other kinds of image and score lower
    coverage = {0: 16, 1: 15, 2: 14, 6: 8, 8: 4}
    pool = [0, 1, 2, 6, 8]
    plain = select("mask_difference", VectorSam(coverage), pool, 3)
    assert plain.chosen == [0, 1, 2], "plain top-k takes the three near-duplicates"
    model = VectorSam(coverage)
    diverse = select("mask_difference_diverse", model, pool, 3)
    # three k-means clusters {0, 1, 2}, {6}, {8}: the best score of each, highest first
    assert diverse.chosen == [0, 6, 8]
    assert diverse.scores == pytest.approx(plain.scores), "the scores are mask_difference's"
    assert diverse.ranks() == {0: 1, 6: 2, 8: 3, 1: 4, 2: 5}, "the rest by score"
    assert model.encodes == [(3, True), (2, True)], "one encoder pass per image, for score and embedding"
    assert diverse.figure is not None and diverse.figure.shape[0] == 3


class FlipSensitiveSam(nn.Module):
    """Decoder 1's foreground logit at cell (r, c) = the image's mean over that 4 x 4 cell + BIAS[r, c], BIAS = +30 in
    the top-left cell and -30 elsewhere: a model that is not flip-equivariant. Counts the images encoded."""

    def __init__(self):
        super().__init__()
        self.encoded = 0

    def predict_logits(self, images, decoder_idx=1, points=None, boxes=None, features=None):
        self.encoded += images.shape[0]
        bias = torch.full((LOW_RES, LOW_RES), -BIG)
        bias[0, 0] = BIG
        foreground = nn.functional.avg_pool2d(images[:, :1], IMAGE_SIZE // LOW_RES) + bias
        return torch.cat([torch.zeros_like(foreground), foreground], dim=1)


def test_tta_is_the_mean_pixel_variance_over_four_flips_mapped_back():
    data = [{"image": torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)}, {"image": torch.full((3, IMAGE_SIZE, IMAGE_SIZE), 60.0)}]
    model = FlipSensitiveSam()
    selection = select("tta", model, [0, 1], 1, data=data)
    # image 0: each view's foreground is the top-left cell of what the model saw; mapped back, the four views put it
    # in the four corners. Each corner's values over the views are {1, 0, 0, 0}: variance 1/4 - 1/16 = 3/16; the
    # other 12 cells are 0 in every view. Mean over the 16 cells: 4 * 3/16 / 16 = 3/64.
    # image 1: +60 makes every cell foreground in every view: variance 0.
    assert selection.scores[0] == pytest.approx(3 / 64, abs=1e-9)
    assert selection.scores[1] == pytest.approx(0.0, abs=1e-9)
    assert selection.chosen == [0] and model.encoded == 4 * 2, "one encoder pass per view"


# ---- the command line: --pool_size all, --first_round, parameters -------------------------------


def test_strategy_choices_and_pool_sizes_parse_or_say_why():
    assert StrategyChoice.parse("typiclust@all") == StrategyChoice("typiclust", "all")
    assert StrategyChoice.parse("coreset@12") == StrategyChoice("coreset", 12)
    assert str(StrategyChoice.parse("probcover")) == "probcover"
    for text, message in (("typi@3", "unknown strategy 'typi'"), ("typiclust@0", "a number of images >= 1"),
                          ("typiclust@", "got ''"), ("typiclust@some", "got 'some'")):
        with pytest.raises(StrategySettingError, match=message):
            StrategyChoice.parse(text)


@pytest.mark.parametrize("argv, message", [
    (["--pool_size", "ten"], "argument --pool_size: expected a number of images >= 1 or 'all', got 'ten'"),
    (["--first_round", "typiclust@1"], "--first_round: the pool (1) must be >= --batch_size (2)"),
    (["--first_round", "kmeans"], "argument --first_round: unknown strategy 'kmeans' in 'kmeans'; choose one of"),
    (["--strategy", "probcover", "--probcover_delta", "-1"], "argument --probcover_delta: expected a number > 0"),
])
def test_bad_strategy_flags_are_one_line(argv, message, tmp_path, capsys):
    import settings
    import trainer

    with pytest.raises(SystemExit) as stop:
        trainer.main(["--demo", "--gpu", "cpu", "--batch_size", "2", "--output", str(tmp_path)] + argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "Skin_128").exists()


def test_new_parameters_have_one_way_in_and_a_resume_repeats_them():
    import settings

    args = vars(settings.build_parser().parse_args(["--probcover_delta", "0.3", "--coreset_features", "current",
                                                   "--pool_size", "all", "--first_round", "typiclust@all"]))
    assert ActiveLearningStrategyFactory.from_settings("probcover", args).delta == 0.3
    assert ActiveLearningStrategyFactory.from_settings("coreset", args).features == "current"
    assert args["pool_size"] == "all" and args["first_round"] == "typiclust@all"
    assert "probcover_delta" in settings.resume_keys("probcover") and "first_round" in settings.resume_keys("random")
    assert "coreset_features" in settings.resume_keys("mask_difference", "coreset"), "the first round's too"
    assert "coreset_features" not in settings.resume_keys("mask_difference")
    assert settings.LEGACY["first_round"] == "none", "runs made before --first_round had none"
    assert MaskDifferenceStrategy.parameters == ActiveLearningStrategyFactory.parameters_of("mask_difference_diverse")
