"""Active-learning selection strategies: which unlabeled images the expert annotates next.

A strategy gets what the selection step knows (``SelectionContext``: the model, the training set, this epoch's
random pool, the whole unlabeled set, the labeled images, k, the device, batch sizes, the epoch's seed, the run
folder for caches, the pretrained encoder) and returns one ``Selection``: the chosen images in order, a score
for every pool image, and optionally per-image details and a picture for TensorBoard. Score-and-top-k strategies
derive from ``TopKStrategy``; a strategy may also choose a set (``select`` is all it must implement). Strategies
register by name (``ActiveLearningStrategyFactory``), and declare their parameters (``Parameter``): the trainer
makes each one a flag, the factory passes it in, and a resumed run must repeat it.

- ``mask_difference`` (DESIGN decisions 3 and 4): disagreement between three predictions of the same image --
  decoder 1 unprompted, decoder 2 prompted with the centre point of decoder 1's mask, decoder 1 prompted with a
  random point of that mask -- from ONE image-encoder pass per image.
- ``entropy``: mean pixel entropy of decoder 1's unprompted prediction.
- ``random``: a seeded uniform draw (the usual baseline).

The score formulas are pure tensor functions at the top (baal's heuristics style).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import tb_images
from sam_lora_image_encoder_prompt import class_probabilities, prompts_from_logits
from utils import autocast

Scores = Dict[int, float]
MASK_THRESHOLD = 0.6
# (D(no,center), D(no,rand), D(center,rand), |no-center|, |no-rand|, |center-rand|)
MASK_DIFFERENCE_WEIGHTS = (0.25, 0.20, 0.25, 0.10, 0.10, 0.10)


# --------------------------------------------------------------------------------------
# score formulas (pure tensor functions)
# --------------------------------------------------------------------------------------


def dice_difference(mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """1 - Dice of two B x ... binary masks, per image -> B.

    Two empty masks agree perfectly: Dice = 1, difference 0.
    """
    a, b = mask_a.flatten(1).float(), mask_b.flatten(1).float()
    overlap = (a * b).sum(dim=1)
    total = a.sum(dim=1) + b.sum(dim=1)
    dice = torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total))
    return 1 - dice


def mask_difference_scores(
    p_no: torch.Tensor, p_center: torch.Tensor, p_rand: torch.Tensor, threshold: float = MASK_THRESHOLD
) -> torch.Tensor:
    """Three B x K x h x w probability maps -> B mask-difference scores.

    0.25 D(no,center) + 0.20 D(no,rand) + 0.25 D(center,rand)
    + 0.10 mean|p_no - p_center| + 0.10 mean|p_no - p_rand| + 0.10 mean|p_center - p_rand|,
    with D = 1 - Dice of the masks p > threshold (over all K channels together) and the means over all K
    channels and pixels. Which channels come in is ``class_probabilities``' choice.
    """
    pairs = ((p_no, p_center), (p_no, p_rand), (p_center, p_rand))
    mask_terms = [dice_difference(a > threshold, b > threshold) for a, b in pairs]
    prob_terms = [(a.float() - b.float()).abs().flatten(1).mean(dim=1) for a, b in pairs]
    return sum(w * term for w, term in zip(MASK_DIFFERENCE_WEIGHTS, mask_terms + prob_terms))


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """B x (C+1) x h x w class logits -> B mean pixel entropy (nats) of their softmax.

    With one foreground class and the zero background logit this is the binary entropy
    of sigmoid(SAM2 logit).
    """
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).flatten(1).mean(dim=1)


def top_k(scores: Scores, k: int) -> List[int]:
    """The k indices with the highest scores, highest first (ties: smaller index first)."""
    return sorted(scores, key=lambda index: (-scores[index], index))[:k]


def default_score_batch_size(device: torch.device, batch_size: int) -> int:
    """Pool-scoring batch size when none is given (--score_batch_size): 16 on CUDA, where larger batches fill
    the device, else the training `batch_size`. Selections do not depend on it (tested for 1, 3 and 16)."""
    return 16 if torch.device(device).type == "cuda" else batch_size


@contextmanager
def scoring_mode(model: torch.nn.Module, device: torch.device, dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """Eval mode, no autograd (inference mode) and autocast on CUDA (``dtype``; None: ``utils.amp_dtype``), as
    scoring runs; the model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, dtype=dtype):
            yield
    finally:
        model.train(was_training)


def point_generator(seed: int, index: int) -> np.random.Generator:
    """The random-point generator of one image: depends only on (seed, dataset index)."""
    return np.random.default_rng([seed, index])


def stack_images(items: List[dict]) -> torch.Tensor:
    return torch.stack([item["image"] for item in items])


# --------------------------------------------------------------------------------------
# what a strategy is given, and what it returns
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionContext:
    """What one selection step knows. Indices are dataset indices of ``dataset`` (the training split).

    pool: this epoch's random candidates; unlabeled: every unlabeled image (the pool is drawn from it);
    labeled: the images labeled so far; k: how many to choose; batch_size: images per scoring batch;
    seed: this epoch's seed (every random choice derives from it); run_dir: where a strategy may cache what it
    computes once per run; progress: show a progress bar; autocast_dtype: the autocast dtype of model scoring on
    CUDA (None: ``utils.amp_dtype``, bf16 where supported; the trainer passes ``utils.scoring_dtype``).
    """

    model: torch.nn.Module
    dataset: Dataset
    pool: Sequence[int]
    k: int
    device: torch.device
    unlabeled: Sequence[int] = ()
    labeled: Sequence[int] = ()
    batch_size: int = 8
    seed: int = 0
    num_workers: int = 0
    run_dir: Optional[Path] = None
    progress: bool = False
    autocast_dtype: Optional[torch.dtype] = None

    def batches(self, indices: Sequence[int], desc: str) -> Iterator[Tuple[List[int], torch.Tensor]]:
        """(dataset indices, B x 3 x S x S images on the device) in ``batch_size`` chunks, in order."""
        loader = DataLoader(Subset(self.dataset, list(indices)), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, collate_fn=stack_images,
                            pin_memory=self.device.type == "cuda")
        offset = 0
        for images in (tqdm(loader, desc=desc, leave=False) if self.progress else loader):
            yield list(indices[offset:offset + images.shape[0]]), images.to(self.device, non_blocking=True)
            offset += images.shape[0]

    def encode_pretrained(self, images: torch.Tensor) -> Dict[str, object]:
        """SAM2 features of B x 3 x S x S images from the pretrained encoder (LoRA off): fixed features that do
        not change as training goes on (at initialisation the model is exactly pretrained SAM2)."""
        with self.model.lora_disabled():
            return self.model.encode(images)


@dataclass
class Selection:
    """What a strategy chose: ``chosen`` (dataset indices, in the order chosen), ``scores`` (every pool image;
    higher = more worth annotating), ``ranking`` (optional: the whole pool in the strategy's order of preference,
    for a strategy that chooses a set rather than the top scores; default: by score), ``details`` (optional, per
    image) and ``figure`` (optional 3 x H x W picture in [0, 1] for TensorBoard, e.g. why these were chosen)."""

    chosen: List[int]
    scores: Scores
    ranking: Optional[List[int]] = None
    details: Dict[int, dict] = field(default_factory=dict)
    figure: Optional[torch.Tensor] = None

    def ranks(self) -> Dict[int, int]:
        """1-based rank of each pool image in ``ranking`` (default: highest score first, ties by index)."""
        order = self.ranking if self.ranking is not None else top_k(self.scores, len(self.scores))
        return {index: r + 1 for r, index in enumerate(order)}


@dataclass(frozen=True)
class Parameter:
    """A strategy's setting: ``--<name>`` on the trainer's command line, a keyword of the strategy's constructor,
    a setting a resumed run must repeat. ``legacy``: the value that reproduces runs made before it existed (what
    an older config.txt or resume state without it means)."""

    name: str
    type: Callable
    default: object
    help: str
    choices: Optional[Sequence] = None
    legacy: object = None


# --------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------


class Strategy(ABC):
    """Chooses k images for annotation from the context's pool."""

    name: ClassVar[str] = "base"
    parameters: ClassVar[Tuple[Parameter, ...]] = ()

    def select(self, context: SelectionContext) -> Selection:
        """One selection (chosen in order, every pool image's score); checked arguments, seeded, deterministic."""
        pool = [int(i) for i in context.pool]
        if len(set(pool)) != len(pool):
            raise ValueError("the pool contains duplicates")
        if context.k < 0:
            raise ValueError(f"k must be >= 0, got {context.k}")
        if context.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {context.batch_size}")
        if not pool:
            return Selection([], {})
        selection = self.choose(context)
        bad = [index for index, value in selection.scores.items() if not np.isfinite(value)]
        if bad:
            raise RuntimeError(f"{self.name}: non-finite scores for images {bad[:5]} (model produced NaN/inf?)")
        return selection

    @abstractmethod
    def choose(self, context: SelectionContext) -> Selection:
        """The selection from a non-empty, checked pool."""


class TopKStrategy(Strategy):
    """Scores every pool image, chooses the k highest (ties: smaller index first)."""

    def choose(self, context: SelectionContext) -> Selection:
        scores = self.score_pool(context)
        chosen = top_k(scores, min(context.k, len(scores)))
        return Selection(chosen, scores, figure=self.figure(context, chosen, scores))

    @abstractmethod
    def score_pool(self, context: SelectionContext) -> Scores:
        """{index: score} for every pool image (higher = more worth annotating)."""

    def figure(self, context: SelectionContext, chosen: List[int], scores: Scores) -> Optional[torch.Tensor]:
        """A picture of why ``chosen`` were chosen, for TensorBoard; None by default."""
        return None


class ModelScoringStrategy(TopKStrategy):
    """Runs the model over the pool in mini-batches (eval mode, no grad, the context's autocast on CUDA)."""

    def score_pool(self, context: SelectionContext) -> Scores:
        scores: Scores = {}
        with scoring_mode(context.model, context.device, context.autocast_dtype):
            for indices, images in context.batches(list(context.pool), f"AL scoring ({self.name})"):
                batch_scores = self.score_batch(context.model, images, indices, context.seed)
                scores.update(zip(indices, batch_scores.float().cpu().tolist()))
        return scores

    @abstractmethod
    def score_batch(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int], seed: int) -> torch.Tensor:
        """B x 3 x S x S images (dataset indices ``indices``) -> B scores."""


@dataclass
class ComparedPredictions:
    """What mask_difference compares for B images: probabilities (B x K x h x w) of decoder 1 unprompted, decoder 2
    at the centre point, decoder 1 at the random point; the points (B x 2, x/y in input-image pixels)."""

    no_prompt: torch.Tensor
    center: torch.Tensor
    random: torch.Tensor
    center_points: torch.Tensor
    random_points: torch.Tensor

    def rows(self, positions: Sequence[int]) -> "ComparedPredictions":
        """The predictions of the batch rows ``positions``, as float32 on the CPU."""
        picked = [t[list(positions)].float().cpu() for t in
                  (self.no_prompt, self.center, self.random, self.center_points, self.random_points)]
        return ComparedPredictions(*picked)

    @staticmethod
    def concatenate(parts: Sequence["ComparedPredictions"]) -> "ComparedPredictions":
        fields = zip(*[(p.no_prompt, p.center, p.random, p.center_points, p.random_points) for p in parts])
        return ComparedPredictions(*(torch.cat(list(f)) for f in fields))


class MaskDifferenceStrategy(ModelScoringStrategy):
    """Mask discrepancy under three prompts (DESIGN decision 4), one encoder pass per image.

    p_no: decoder 1 unprompted; p_center: decoder 2 with the EDT-centre point of the largest component of decoder
    1's mask; p_rand: decoder 1 with a uniform random point of that component (seeded per (seed, image index)).
    Empty mask: the image centre. The chosen images' three predictions are kept from scoring, so the TensorBoard
    picture of why they were chosen costs no model pass.
    """

    name = "mask_difference"
    parameters = (
        Parameter("score_channels", str, "all", choices=("all", "foreground"), legacy="foreground",
                  help="mask_difference: the probability maps compared. all: sigmoid of every one of the C+1 output "
                       "channels, background included (the reference code's formula; with the constant-zero "
                       "background logit the three probability terms are half those of foreground, the Dice terms "
                       "the same); foreground: softmax probabilities of the foreground classes"),
    )

    def __init__(self, threshold: float = MASK_THRESHOLD, score_channels: str = "all"):
        self.threshold = threshold
        self.score_channels = score_channels
        self._kept: Dict[int, Tuple[float, ComparedPredictions]] = {}
        self._keep = 0

    def compare(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int], seed: int
                ) -> ComparedPredictions:
        """The three predictions the score compares, from one encoder pass (points seeded per (seed, index))."""
        features = model.encode(images)
        unprompted = model.predict_logits(None, 1, features=features)
        generators = [point_generator(seed, index) for index in indices]
        prompts = prompts_from_logits(unprompted, images.shape[-1], generators)
        centered = model.predict_logits(None, 2, points=prompts.center_points, features=features)
        randomised = model.predict_logits(None, 1, points=prompts.random_points, features=features)
        probabilities = [class_probabilities(logits, self.score_channels)
                         for logits in (unprompted, centered, randomised)]
        return ComparedPredictions(*probabilities, prompts.center_points[:, 0], prompts.random_points[:, 0])

    def score_pool(self, context: SelectionContext) -> Scores:
        self._kept, self._keep = {}, context.k
        return super().score_pool(context)

    def score_batch(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int], seed: int) -> torch.Tensor:
        compared = self.compare(model, images, indices, seed)
        scores = mask_difference_scores(compared.no_prompt, compared.center, compared.random, self.threshold)
        self._keep_best(indices, scores.float().cpu().tolist(), compared)
        return scores

    def _keep_best(self, indices: List[int], scores: List[float], compared: ComparedPredictions) -> None:
        """Keep the predictions of the ``_keep`` best-scoring images so far (those top-k will choose)."""
        for position, (index, score) in enumerate(zip(indices, scores)):
            self._kept[index] = (score, compared.rows([position]))
        best = top_k({i: s for i, (s, _) in self._kept.items()}, self._keep)
        self._kept = {i: self._kept[i] for i in best}

    def figure(self, context: SelectionContext, chosen: List[int], scores: Scores) -> Optional[torch.Tensor]:
        if not chosen:
            return None
        compared = ComparedPredictions.concatenate([self._kept[i][1] for i in chosen])
        images = torch.stack([context.dataset[i]["image"] for i in chosen])
        return tb_images.why_selected_image(images, compared.no_prompt, compared.center, compared.random,
                                            compared.center_points, compared.random_points,
                                            [scores[i] for i in chosen], self.threshold)


class EntropyStrategy(ModelScoringStrategy):
    """Mean pixel entropy of decoder 1's unprompted prediction."""

    name = "entropy"

    def score_batch(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int], seed: int) -> torch.Tensor:
        return mean_entropy(model.predict_logits(images, 1))


class RandomStrategy(TopKStrategy):
    """Uniform random scores from the epoch's seed (the model is not run)."""

    name = "random"

    def score_pool(self, context: SelectionContext) -> Scores:
        pool = [int(i) for i in context.pool]
        values = np.random.default_rng(context.seed).random(len(pool))
        return {index: float(value) for index, value in zip(pool, values)}


class ActiveLearningStrategyFactory:
    """Strategies by name; the names and parameters every command line offers come from here."""

    STRATEGIES: Dict[str, Type[Strategy]] = {
        cls.name: cls for cls in (MaskDifferenceStrategy, EntropyStrategy, RandomStrategy)}

    @classmethod
    def available_strategies(cls) -> List[str]:
        return sorted(cls.STRATEGIES)

    @classmethod
    def parameters_of(cls, name: str) -> Tuple[Parameter, ...]:
        return cls._strategy_class(name).parameters

    @classmethod
    def all_parameters(cls) -> List[Parameter]:
        """Every strategy's parameters, once each, in registry order."""
        seen: Dict[str, Parameter] = {}
        for strategy in cls.STRATEGIES.values():
            for parameter in strategy.parameters:
                seen.setdefault(parameter.name, parameter)
        return list(seen.values())

    @classmethod
    def create_strategy(cls, name: str, **kwargs) -> Strategy:
        return cls._strategy_class(name)(**kwargs)

    @classmethod
    def from_settings(cls, name: str, settings: Mapping[str, object]) -> Strategy:
        """The strategy ``name`` with its parameters taken from ``settings`` (e.g. the trainer's flags)."""
        return cls.create_strategy(name, **{p.name: settings[p.name] for p in cls.parameters_of(name)})

    @classmethod
    def _strategy_class(cls, name: str) -> Type[Strategy]:
        if name not in cls.STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(cls.available_strategies())}")
        return cls.STRATEGIES[name]
