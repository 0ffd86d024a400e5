"""Active-learning strategies: score formulas by hand, selection order, prompt fallbacks, seeding."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import tb_images
from active_learning_strategies import (
    ActiveLearningStrategyFactory,
    EntropyStrategy,
    MaskDifferenceStrategy,
    RandomStrategy,
    Selection,
    SelectionContext,
    Strategy,
    dice_difference,
    mask_difference_scores,
    mean_entropy,
)

LOW_RES = 4  # stub decoder resolution
IMAGE_SIZE = 16  # stub input size: one low-res cell = 4 input pixels
BIG = 30.0  # a logit whose sigmoid is 1 to ~1e-13


def probs(rows):
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def select(strategy, model, dataset, pool, k, batch_size=8, seed=0, **context):
    """(chosen, scores) of one selection; the Selection itself is ``select.last``."""
    select.last = strategy.select(SelectionContext(model, dataset, pool, k, torch.device("cpu"),
                                                   batch_size=batch_size, seed=seed, **context))
    return select.last.chosen, select.last.scores


def test_mask_difference_formula_by_hand():
    p_no = probs([[0.9, 0.7], [0.1, 0.0]])  # mask: top row
    p_center = probs([[0.9, 0.5], [0.65, 0.0]])  # mask: left column
    p_rand = probs([[0.2, 0.2], [0.2, 0.2]])  # empty mask
    # D(no,center) = 1 - 2*1/(2+2) = 0.5; D(no,rand) = D(center,rand) = 1 (one mask empty)
    # mean|no-center| = (0+0.2+0.55+0)/4, mean|no-rand| = (0.7+0.5+0.1+0.2)/4,
    # mean|center-rand| = (0.7+0.3+0.45+0.2)/4
    expected = 0.25 * 0.5 + 0.20 * 1 + 0.25 * 1 + 0.10 * (0.75 / 4 + 1.5 / 4 + 1.65 / 4)
    score = mask_difference_scores(p_no, p_center, p_rand)
    assert score.shape == (1,)
    assert score.item() == pytest.approx(expected, abs=1e-6)


def test_threshold_is_strict_and_configurable():
    p = probs([[0.6, 0.6]])
    zero = torch.zeros_like(p)
    # 0.6 is not above 0.6: all masks empty, only the probability terms remain (0.1 * 0.6 * 2)
    assert mask_difference_scores(p, zero, zero).item() == pytest.approx(0.12, abs=1e-6)
    # at threshold 0.5 p's mask is full, the others empty: D(no,*) = 1
    assert mask_difference_scores(p, zero, zero, threshold=0.5).item() == pytest.approx(0.25 + 0.20 + 0.12, abs=1e-6)


def test_dice_difference_conventions():
    empty = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    full = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    assert dice_difference(empty, empty).tolist() == [0.0, 0.0]  # both empty: Dice 1 -> D 0
    assert dice_difference(empty, full).tolist() == [1.0, 1.0]
    assert dice_difference(full, full).tolist() == [0.0, 0.0]
    half = full.clone()
    half[:, :, :, :1] = False  # 6 of 9 pixels
    assert dice_difference(half, full)[0].item() == pytest.approx(1 - 2 * 6 / 15)


def test_identical_predictions_score_zero():
    p = torch.rand(3, 1, 5, 5)
    assert torch.allclose(mask_difference_scores(p, p, p), torch.zeros(3))


def test_mean_entropy_by_hand():
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 1] = 40.0  # certain foreground pixel; the other pixel is 50/50
    assert mean_entropy(logits).item() == pytest.approx(math.log(2) / 2, abs=1e-6)
    three = torch.zeros(1, 3, 1, 1)  # uniform over three classes
    assert mean_entropy(three).item() == pytest.approx(math.log(3), abs=1e-6)


# ---- strategies against a stub model -----------------------------------------------------


class StubSam(nn.Module):
    """Stands in for LoRA_Sam: image i (its pixel value) has its unprompted decoder-1 mask
    covering the first `coverage[i]` of 16 low-res cells; prompted predictions are empty."""

    def __init__(self, coverage):
        super().__init__()
        self.coverage = coverage
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls = []  # (decoder_idx, image index, points or None)
        self.encodes = 0
        self.modes = []

    def encode(self, images):
        self.encodes += images.shape[0]
        self.modes.append((self.training, torch.is_grad_enabled()))
        return {"ids": images[:, 0, 0, 0].round().long().tolist()}

    def decode(self, features, decoder_idx, points=None, boxes=None):
        logits = torch.zeros(len(features["ids"]), 2, LOW_RES, LOW_RES)
        for b, index in enumerate(features["ids"]):
            self.calls.append((decoder_idx, index, None if points is None else points[b].tolist()))
            fg = torch.full((LOW_RES * LOW_RES,), -BIG)
            if points is None and decoder_idx == 1:
                fg[: self.coverage[index]] = BIG
            logits[b, 1] = fg.view(LOW_RES, LOW_RES)
        return {"low_res_logits": logits, "iou_predictions": torch.zeros(len(features["ids"]), 1)}

    def predict_logits(self, images, decoder_idx=1, points=None, boxes=None, features=None):
        features = self.encode(images) if features is None else features
        return self.decode(features, decoder_idx, points, boxes)["low_res_logits"]


def stub_dataset(n):
    return [{"image": torch.full((3, IMAGE_SIZE, IMAGE_SIZE), float(i)), "index": i, "name": f"img{i}"} for i in range(n)]


COVERAGE = {0: 3, 1: 5, 2: 8, 3: 1, 4: 0, 5: 16}


def expected_stub_score(n_cells, score_channels="all"):
    """Prompted masks are empty: D(no,.) = 1 unless p_no is empty too, D(center,rand) = 0,
    mean|p_no - p_prompted| = n/16 twice over the foreground; score_channels "all" (the default) averages over the
    background channel too, where all three are sigmoid(0) = 0.5: half of that."""
    if n_cells == 0:
        return 0.0
    probability_terms = 0.10 * 2 * n_cells / 16
    return 0.25 + 0.20 + (probability_terms / 2 if score_channels == "all" else probability_terms)


def test_mask_difference_selects_top_k_in_score_order():
    model = StubSam(COVERAGE)
    pool = [5, 0, 3, 2, 4]
    chosen, scores = select(MaskDifferenceStrategy(), model, stub_dataset(6), pool, 3, batch_size=2)
    assert chosen == [5, 2, 0]
    assert sorted(scores) == sorted(pool)
    for index in pool:
        assert scores[index] == pytest.approx(expected_stub_score(COVERAGE[index]), abs=1e-6)
    assert model.encodes == len(pool)  # encoder once per image
    # per image: decoder 1 unprompted, decoder 2 with the centre point, decoder 1 with the random point
    per_image = {}
    for decoder_idx, index, points in model.calls:
        per_image.setdefault(index, []).append((decoder_idx, points is not None))
    assert all(v == [(1, False), (2, True), (1, True)] for v in per_image.values())


def test_empty_mask_prompts_fall_back_to_image_centre():
    model = StubSam(COVERAGE)
    select(MaskDifferenceStrategy(), model, stub_dataset(6), [4, 5], 1, batch_size=2)
    points = {(d, i): p for d, i, p in model.calls if p is not None}
    centre = [[IMAGE_SIZE / 2 - 0.5, IMAGE_SIZE / 2 - 0.5]]
    assert points[(2, 4)] == centre and points[(1, 4)] == centre
    # full 4 x 4 mask: the border counts as background, so the deepest cells are the inner
    # 2 x 2; the first in raster order is cell (1, 1) -> input pixel 1.5 * 4 - 0.5 = 5.5
    assert points[(2, 5)] == [[5.5, 5.5]]


def test_random_points_are_seeded_per_image_and_inside_the_mask():
    def random_points(pool, seed, batch_size):
        model = StubSam(COVERAGE)
        select(MaskDifferenceStrategy(), model, stub_dataset(6), pool, 2, batch_size=batch_size, seed=seed)
        return {i: p for d, i, p in model.calls if d == 1 and p is not None}

    first = random_points([1, 2, 5], seed=3, batch_size=3)
    # another pool order / batching / pool content: same point for the same (seed, image)
    again = random_points([5, 0, 2, 1], seed=3, batch_size=1)
    assert all(first[i] == again[i] for i in first)
    # the mask of image 2 is the first 8 cells = the top two rows: input y < 8
    assert first[2][0][1] < 8
    different = [random_points([5], seed=s, batch_size=1)[5] for s in range(8)]
    assert len({tuple(p[0]) for p in different}) > 1  # the seed matters


def test_select_restores_mode_and_scores_without_grad():
    model = StubSam(COVERAGE)
    model.train()
    select(MaskDifferenceStrategy(), model, stub_dataset(6), [0, 1], 1)
    assert model.training
    assert model.modes == [(False, False)]
    model.eval()
    select(EntropyStrategy(), model, stub_dataset(6), [0, 1], 1)
    assert not model.training


def test_scores_do_not_depend_on_batch_size():
    pool = [0, 1, 2, 3, 5]
    _, one = select(MaskDifferenceStrategy(), StubSam(COVERAGE), stub_dataset(6), pool, 2, batch_size=1)
    _, four = select(MaskDifferenceStrategy(), StubSam(COVERAGE), stub_dataset(6), pool, 2, batch_size=4)
    assert one == pytest.approx(four)


def test_entropy_strategy_prefers_uncertain_images():
    # a 16-cell mask is certain everywhere; half-covered at logit +-30 is certain too;
    # so build logits by hand: image 0 certain, image 1 all-zero logits (maximal entropy)
    class Flat(StubSam):
        def decode(self, features, decoder_idx, points=None, boxes=None):
            out = super().decode(features, decoder_idx, points, boxes)
            out["low_res_logits"][torch.tensor(features["ids"]) == 1] = 0.0
            return out

    chosen, scores = select(EntropyStrategy(), Flat(COVERAGE), stub_dataset(6), [0, 1], 1)
    assert chosen == [1]
    assert scores[1] == pytest.approx(math.log(2), abs=1e-6)
    assert scores[0] < 1e-9


def test_random_strategy_is_seeded_and_distinct():
    pool = list(range(10, 30))
    chosen_a, scores_a = select(RandomStrategy(), None, None, pool, 5, seed=7)
    chosen_b, _ = select(RandomStrategy(), None, None, pool, 5, seed=7)
    chosen_c, _ = select(RandomStrategy(), None, None, pool, 5, seed=8)
    assert chosen_a == chosen_b and chosen_a != chosen_c
    assert len(set(chosen_a)) == 5 and set(chosen_a) <= set(pool) and sorted(scores_a) == pool
    assert [scores_a[i] for i in chosen_a] == sorted((scores_a[i] for i in chosen_a), reverse=True)


def test_k_larger_than_pool_and_bad_arguments():
    chosen, _ = select(RandomStrategy(), None, None, [3, 1], 5)
    assert sorted(chosen) == [1, 3]
    with pytest.raises(ValueError, match="duplicates"):
        select(RandomStrategy(), None, None, [3, 3], 1)
    assert select(RandomStrategy(), None, None, [], 2) == ([], {})


def test_non_finite_scores_are_an_error():
    class Broken(StubSam):
        def decode(self, *args, **kwargs):
            out = super().decode(*args, **kwargs)
            out["low_res_logits"][:] = float("nan")
            return out

    with pytest.raises(RuntimeError, match="non-finite"):
        select(EntropyStrategy(), Broken(COVERAGE), stub_dataset(6), [0, 2], 1)


def test_factory_names_and_unknown_name():
    """The registry gives every command line its strategy names (trainer --strategy, compare_strategies)."""
    import compare_strategies
    import settings

    names = ActiveLearningStrategyFactory.available_strategies()
    strategy_flag = next(a for a in settings.build_parser()._actions if a.dest == "strategy")
    assert list(strategy_flag.choices) == names == sorted(names)
    assert [compare_strategies.Arm.parse(name).strategy.name for name in names] == names  # an arm of each name
    # no strategy silently disappears; a new one joins without editing this test
    assert {"alps", "coreset", "entropy", "mask_difference", "mask_difference_diverse", "probcover", "random", "tta",
            "typiclust"} <= set(names)
    assert isinstance(ActiveLearningStrategyFactory.create_strategy("mask_difference"), MaskDifferenceStrategy)
    assert isinstance(ActiveLearningStrategyFactory.create_strategy("entropy"), EntropyStrategy)
    assert isinstance(ActiveLearningStrategyFactory.create_strategy("random"), RandomStrategy)
    assert ActiveLearningStrategyFactory.create_strategy("mask_difference", threshold=0.7).threshold == 0.7
    with pytest.raises(ValueError, match="alps, coreset, entropy, mask_difference, mask_difference_diverse"):
        ActiveLearningStrategyFactory.create_strategy("uncertainty")


# ---- with the real model (hiera_t, 128 px) -----------------------------------------------------


@pytest.fixture(scope="module")
def real_net():
    """Untrained LoRA_Sam whose decoder 2 differs from decoder 1 (so swapped roles would show)."""
    from sam2.build_sam import build_sam2
    from sam_lora_image_encoder_prompt import LoRA_Sam

    torch.manual_seed(0)
    net = LoRA_Sam(build_sam2("sam2.1_hiera_t", None, device="cpu", image_size=128), r=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.sam.sam_mask_decoder2.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net


def real_dataset(n, size=128):
    gen = torch.Generator().manual_seed(3)
    return [{"image": torch.randn(3, size, size, generator=gen), "index": i} for i in range(n)]


@pytest.mark.parametrize("name", ["mask_difference", "entropy"])
def test_real_model_runs_the_encoder_once_per_image(real_net, name):
    calls = []
    hook = real_net.sam.image_encoder.trunk.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        pool = [4, 0, 2, 1, 3]
        chosen, scores = select(ActiveLearningStrategyFactory.create_strategy(name), real_net, real_dataset(5), pool,
                                3, batch_size=2, seed=11)
    finally:
        hook.remove()
    assert calls == [2, 2, 1]  # three mini-batches, every image through the encoder once
    assert len(chosen) == 3 and len(set(chosen)) == 3 and set(chosen) <= set(pool)
    assert sorted(scores) == sorted(pool)
    assert [scores[i] for i in chosen] == sorted(scores.values(), reverse=True)[:3]
    assert all(0.0 <= s <= (1.0 if name == "mask_difference" else math.log(2)) for s in scores.values())


def test_real_model_mask_difference_uses_the_designed_decoders(real_net):
    from active_learning_strategies import point_generator
    from sam_lora_image_encoder_prompt import class_probabilities, prompts_from_logits

    data = real_dataset(3)
    _, scores = select(MaskDifferenceStrategy(score_channels="foreground"), real_net, data, [0, 1, 2], 1,
                       batch_size=3, seed=4)
    x = torch.stack([d["image"] for d in data])
    real_net.eval()
    with torch.no_grad():
        features = real_net.encode(x)
        p_no = real_net.decode(features, 1)["low_res_logits"]
        prompts = prompts_from_logits(p_no, 128, [point_generator(4, i) for i in range(3)])
        p_center = real_net.decode(features, 2, points=prompts.center_points)["low_res_logits"]
        p_rand = real_net.decode(features, 1, points=prompts.random_points)["low_res_logits"]
        swapped = real_net.decode(features, 1, points=prompts.center_points)["low_res_logits"]
    fg = class_probabilities
    expected = mask_difference_scores(fg(p_no), fg(p_center), fg(p_rand))
    assert [scores[i] for i in range(3)] == pytest.approx(expected.tolist(), abs=1e-5)
    # decoder 2 really differs from decoder 1 here, so a swapped assignment would be caught
    assert not torch.allclose(fg(swapped), fg(p_center), atol=1e-3)


def test_why_selected_picture_shows_what_the_scores_compared_without_another_model_pass():
    """The TensorBoard picture of why the chosen images were chosen (al/why_selected) is made from the predictions
    scoring made: no encoder or decoder call after scoring, and it equals the picture drawn from those very
    predictions (recomputed here from the stub's recorded points and masks)."""
    model = StubSam(COVERAGE)
    strategy = MaskDifferenceStrategy(score_channels="foreground")  # the maps strategy_probs writes out
    data = stub_dataset(6)
    chosen, scores = select(strategy, model, data, [5, 0, 3, 2], 2, batch_size=1, seed=7)
    assert chosen == [5, 2] and model.encodes == 4, "one encoder pass per pool image, none for the picture"
    figure = select.last.figure
    assert figure is not None and figure.shape[0] == 3
    points = {(d, i): p for d, i, p in model.calls if p is not None}
    images = torch.stack([data[i]["image"] for i in chosen])
    with torch.no_grad():
        features = model.encode(images)
        p_no = strategy_probs(model.decode(features, 1))
        p_center = strategy_probs(model.decode(features, 2, points=torch.tensor([points[(2, i)] for i in chosen])))
        p_rand = strategy_probs(model.decode(features, 1, points=torch.tensor([points[(1, i)] for i in chosen])))
    expected = tb_images.why_selected_image(images, p_no, p_center, p_rand,
                                            torch.tensor([points[(2, i)][0] for i in chosen]),
                                            torch.tensor([points[(1, i)][0] for i in chosen]),
                                            [scores[i] for i in chosen], strategy.threshold)
    torch.testing.assert_close(figure, expected, rtol=0, atol=0)
    assert mask_difference_scores(p_no, p_center, p_rand).tolist() == pytest.approx([scores[i] for i in chosen])


def strategy_probs(out):
    """softmax foreground probability, written out: exp(l1) / (exp(l0) + exp(l1))."""
    logits = out["low_res_logits"]
    return (logits[:, 1:].exp() / logits.exp().sum(dim=1, keepdim=True)).float()


def test_score_channels_all_is_the_reference_formula():
    """score_channels "all": sigmoid of every one of the C+1 channels, masks and means over all of them. With the
    constant-zero background logit (sigmoid 0.5, below the 0.6 threshold) the Dice terms are those of the
    foreground alone and the three probability terms are halved."""
    model = StubSam(COVERAGE)
    pool = [0, 1, 2, 5]
    _, fg = select(MaskDifferenceStrategy(score_channels="foreground"), model, stub_dataset(6), pool, 2)
    _, every = select(MaskDifferenceStrategy(score_channels="all"), StubSam(COVERAGE), stub_dataset(6), pool, 2)
    for index in pool:
        n = COVERAGE[index]  # stub: p_no covers n of 16 cells, the prompted predictions are empty
        dice_terms = 0.25 + 0.20 if n else 0.0
        assert fg[index] == pytest.approx(dice_terms + 0.10 * 2 * n / 16, abs=1e-6)
        assert every[index] == pytest.approx(dice_terms + 0.10 * 2 * n / 16 / 2, abs=1e-6)


class RandomLogitsSam(StubSam):
    """Image i's three predictions (decoder 1 unprompted, decoder 2 prompted, decoder 1 prompted) are fixed random
    (C+1)-channel logits, the background channel included (so a formula that drops or keeps it is told apart)."""

    def __init__(self, n_images, channels, seed=0):
        super().__init__({i: 0 for i in range(n_images)})
        gen = torch.Generator().manual_seed(seed)
        self.logits = {key: 3 * torch.randn(n_images, channels, LOW_RES, LOW_RES, generator=gen)
                       for key in ((1, False), (2, True), (1, True))}

    def decode(self, features, decoder_idx, points=None, boxes=None):
        logits = self.logits[(decoder_idx, points is not None)][features["ids"]]
        return {"low_res_logits": logits, "iou_predictions": torch.zeros(len(features["ids"]), 1)}


def plain_mask_difference(no, center, rand, probabilities):
    """The score written out in numpy from three B x K x h x w logit arrays, as the reference code writes it
    (eps 1e-8 in its Dice), with ``probabilities`` turning logits into the compared maps."""
    p = [probabilities(x.numpy().astype(np.float64)) for x in (no, center, rand)]
    m = [x > 0.6 for x in p]

    def dice_diff(a, b):
        return 1 - (2 * (a & b).sum(axis=(1, 2, 3)) + 1e-8) / (a.sum(axis=(1, 2, 3)) + b.sum(axis=(1, 2, 3)) + 1e-8)

    def prob_diff(a, b):
        return np.abs(a - b).mean(axis=(1, 2, 3))

    return (0.25 * dice_diff(m[0], m[1]) + 0.20 * dice_diff(m[0], m[2]) + 0.25 * dice_diff(m[1], m[2])
            + 0.10 * prob_diff(p[0], p[1]) + 0.10 * prob_diff(p[0], p[2]) + 0.10 * prob_diff(p[1], p[2]))


@pytest.mark.parametrize("channels", [2, 3])
def test_both_score_formulas_equal_their_plain_transcriptions(channels):
    """score_channels "all" (the default, the reference's select_samples): sigmoid of every channel, masks p > 0.6
    and means of |p_a - p_b| over channels, rows and columns; "foreground": the softmax probabilities of channels
    1..C. Checked on random logits whose background channel is not zero."""
    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    def softmax_foreground(x):
        return (np.exp(x) / np.exp(x).sum(axis=1, keepdims=True))[:, 1:]

    pool = list(range(6))
    model = RandomLogitsSam(6, channels, seed=channels)
    logits = [model.logits[key] for key in ((1, False), (2, True), (1, True))]
    assert MaskDifferenceStrategy().score_channels == "all"
    for strategy, formula in ((MaskDifferenceStrategy(), sigmoid),
                              (MaskDifferenceStrategy(score_channels="foreground"), softmax_foreground)):
        _, scores = select(strategy, model, stub_dataset(6), pool, 2, batch_size=4)
        assert [scores[i] for i in pool] == pytest.approx(plain_mask_difference(*logits, formula).tolist(), abs=1e-6)
    _, every = select(MaskDifferenceStrategy(), model, stub_dataset(6), pool, 2)
    _, fg = select(MaskDifferenceStrategy(score_channels="foreground"), model, stub_dataset(6), pool, 2)
    assert max(abs(every[i] - fg[i]) for i in pool) > 0.01, "the two formulas must differ on these logits"


class PickEveryOther(Strategy):
    """A set strategy: chooses without scoring per image (every other pool image, in reverse)."""

    name = "every_other"

    def choose(self, context):
        pool = sorted(context.pool)
        chosen = pool[::-2][:context.k]
        return Selection(chosen, {i: 0.0 for i in pool}, ranking=chosen + [i for i in pool if i not in chosen])


def test_a_strategy_may_choose_a_set_and_rank_the_pool_its_own_way():
    selection = PickEveryOther().select(SelectionContext(None, None, [3, 1, 4, 2, 5], 2, torch.device("cpu")))
    assert selection.chosen == [5, 3]
    assert selection.ranks() == {5: 1, 3: 2, 1: 3, 2: 4, 4: 5}
    by_score = Selection([2], {1: 0.5, 2: 0.9, 3: 0.5})
    assert by_score.ranks() == {2: 1, 1: 2, 3: 3}, "default: by score, ties by index"


def test_strategy_context_sees_labeled_and_unlabeled_images():
    seen = {}

    class Spy(Strategy):
        name = "spy"

        def choose(self, context):
            seen.update(labeled=list(context.labeled), unlabeled=list(context.unlabeled), pool=list(context.pool))
            return Selection(list(context.pool)[:context.k], {i: 1.0 for i in context.pool})

    Spy().select(SelectionContext(None, None, [4, 6], 1, torch.device("cpu"), unlabeled=[4, 5, 6], labeled=[0, 1]))
    assert seen == dict(labeled=[0, 1], unlabeled=[4, 5, 6], pool=[4, 6])


def test_strategy_parameters_have_one_way_in():
    """A strategy's parameter is a trainer flag (from the registry), reaches the strategy through the factory,
    and is a setting a resumed run must repeat."""
    import settings

    parameters = ActiveLearningStrategyFactory.parameters_of("mask_difference")
    assert [p.name for p in parameters] == ["score_channels"]
    args = settings.build_parser().parse_args(["--score_channels", "all"])
    assert ActiveLearningStrategyFactory.from_settings("mask_difference", vars(args)).score_channels == "all"
    assert "score_channels" in settings.resume_keys("mask_difference")
    assert "score_channels" not in settings.resume_keys("random")
    assert settings.LEGACY["score_channels"] == "foreground", "runs made before the parameter scored foreground"
