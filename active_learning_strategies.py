"""Active-learning selection strategies: which unlabeled images the expert annotates next.

Every strategy answers `select(model, dataset, pool_indices, k, device, batch_size, seed)`
with the k chosen dataset indices (highest score first) and the score of every pool image.

- `mask_difference` (DESIGN decisions 3 and 4): disagreement between three predictions of
  the same image -- decoder 1 unprompted, decoder 2 prompted with the centre point of
  decoder 1's mask, decoder 1 prompted with a random point of that mask -- from ONE
  image-encoder pass per image.
- `entropy`: mean pixel entropy of decoder 1's unprompted prediction.
- `random`: a seeded uniform draw (the usual baseline).
"""

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from sam_lora_image_encoder_prompt import foreground_probabilities, prompts_from_logits
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
    """Three B x C x h x w foreground probability maps -> B mask-difference scores.

    0.25 D(no,center) + 0.20 D(no,rand) + 0.25 D(center,rand)
    + 0.10 mean|p_no - p_center| + 0.10 mean|p_no - p_rand| + 0.10 mean|p_center - p_rand|,
    with D = 1 - Dice of the masks p > threshold (over all C classes together).
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


def default_score_batch_size(device: torch.device, batch_size: int) -> int:
    """Pool-scoring batch size when none is given (--score_batch_size): 16 on CUDA, where larger batches fill
    the device, else the training `batch_size`. Selections do not depend on it (tested for 1, 3 and 16)."""
    return 16 if torch.device(device).type == "cuda" else batch_size


@contextmanager
def scoring_mode(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, no autograd (inference mode) and autocast on CUDA, as scoring runs; the model's training
    mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device):
            yield
    finally:
        model.train(was_training)


def top_k(scores: Scores, k: int) -> List[int]:
    """The k indices with the highest scores, highest first (ties: smaller index first)."""
    return sorted(scores, key=lambda index: (-scores[index], index))[:k]


def point_generator(seed: int, index: int) -> np.random.Generator:
    """The random-point generator of one image: depends only on (seed, dataset index)."""
    return np.random.default_rng([seed, index])


@dataclass
class ComparedPredictions:
    """What mask_difference compares for B images: foreground probabilities (B x C x h x w) of decoder 1
    unprompted, decoder 2 at the centre point, decoder 1 at the random point; the points (B x 2, x/y in
    input-image pixels)."""

    no_prompt: torch.Tensor
    center: torch.Tensor
    random: torch.Tensor
    center_points: torch.Tensor
    random_points: torch.Tensor


# --------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------


class BaseActiveLearningStrategy(ABC):
    """Scores a pool of unlabeled images and picks the k highest."""

    name = "base"

    def select(
        self,
        model: torch.nn.Module,
        dataset: Dataset,
        pool_indices: Sequence[int],
        k: int,
        device: torch.device,
        batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        progress: bool = False,
    ) -> Tuple[List[int], Scores]:
        """-> (chosen dataset indices sorted by score, highest first; {index: score} for the pool).

        k larger than the pool selects the whole pool. `seed` fixes every random choice,
        so the same call gives the same selection (also after a resumed run).
        """
        pool = [int(i) for i in pool_indices]
        if len(set(pool)) != len(pool):
            raise ValueError("pool_indices contains duplicates")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not pool:
            return [], {}
        scores = self.score_pool(model, dataset, pool, torch.device(device), batch_size, seed, num_workers, progress)
        bad = [index for index, value in scores.items() if not np.isfinite(value)]
        if bad:
            raise RuntimeError(f"{self.name}: non-finite scores for images {bad[:5]} (model produced NaN/inf?)")
        return top_k(scores, k), scores

    @abstractmethod
    def score_pool(
        self,
        model: torch.nn.Module,
        dataset: Dataset,
        pool: List[int],
        device: torch.device,
        batch_size: int,
        seed: int,
        num_workers: int,
        progress: bool,
    ) -> Scores:
        """{index: score} for every index in `pool` (higher = more worth annotating)."""


class ModelScoringStrategy(BaseActiveLearningStrategy):
    """Runs the model over the pool in mini-batches (eval mode, no grad, AMP on CUDA)."""

    def score_pool(self, model: torch.nn.Module, dataset: Dataset, pool: List[int], device: torch.device,
                   batch_size: int, seed: int, num_workers: int, progress: bool) -> Scores:
        loader = DataLoader(
            Subset(dataset, pool),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_stack_images,
            pin_memory=device.type == "cuda",
        )
        batches = tqdm(loader, desc=f"AL scoring ({self.name})", leave=False) if progress else loader
        scores: Scores = {}
        with scoring_mode(model, device):
            offset = 0
            for images in batches:
                indices = pool[offset : offset + images.shape[0]]
                offset += images.shape[0]
                batch_scores = self.score_batch(model, images.to(device, non_blocking=True), indices, seed)
                scores.update(zip(indices, batch_scores.float().cpu().tolist()))
        return scores

    @abstractmethod
    def score_batch(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int], seed: int) -> torch.Tensor:
        """B x 3 x S x S images (dataset indices `indices`) -> B scores."""


class MaskDifferenceStrategy(ModelScoringStrategy):
    """Mask discrepancy under three prompts (DESIGN decision 4), one encoder pass per image.

    p_no: decoder 1 unprompted; p_center: decoder 2 with the EDT-centre point of the
    largest component of decoder 1's mask; p_rand: decoder 1 with a uniform random point
    of that component (seeded per (seed, image index)). Empty mask: the image centre.
    """

    name = "mask_difference"

    def __init__(self, threshold: float = MASK_THRESHOLD):
        self.threshold = threshold

    def compare(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int], seed: int
                ) -> ComparedPredictions:
        """The three predictions the score compares, from one encoder pass (points seeded per (seed, index))."""
        features = model.encode(images)
        unprompted = model.decode(features, 1)["low_res_logits"]
        generators = [point_generator(seed, index) for index in indices]
        prompts = prompts_from_logits(unprompted, images.shape[-1], generators)
        centered = model.decode(features, 2, points=prompts.center_points)["low_res_logits"]
        randomised = model.decode(features, 1, points=prompts.random_points)["low_res_logits"]
        return ComparedPredictions(foreground_probabilities(unprompted), foreground_probabilities(centered),
                                   foreground_probabilities(randomised), prompts.center_points[:, 0],
                                   prompts.random_points[:, 0])

    def score_batch(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int], seed: int) -> torch.Tensor:
        compared = self.compare(model, images, indices, seed)
        return mask_difference_scores(compared.no_prompt, compared.center, compared.random, self.threshold)

    def compared_predictions(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int],
                             device: torch.device, seed: int) -> ComparedPredictions:
        """For images already scored with ``seed`` (e.g. the selected ones): what their scores compared, as
        float32 on the CPU (eval mode, no grad; the model's training mode is restored)."""
        with scoring_mode(model, torch.device(device)):
            compared = self.compare(model, images.to(device), [int(i) for i in indices], seed)
        return ComparedPredictions(*(t.float().cpu() for t in astuple(compared)))


class EntropyStrategy(ModelScoringStrategy):
    """Mean pixel entropy of decoder 1's unprompted prediction."""

    name = "entropy"

    def score_batch(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int], seed: int) -> torch.Tensor:
        return mean_entropy(model.decode(model.encode(images), 1)["low_res_logits"])


class RandomStrategy(BaseActiveLearningStrategy):
    """Uniform random scores from `seed` (the model is not run)."""

    name = "random"

    def score_pool(self, model: torch.nn.Module, dataset: Dataset, pool: List[int], device: torch.device,
                   batch_size: int, seed: int, num_workers: int, progress: bool) -> Scores:
        values = np.random.default_rng(seed).random(len(pool))
        return {index: float(value) for index, value in zip(pool, values)}


class ActiveLearningStrategyFactory:
    """Strategies by name: `mask_difference`, `entropy`, `random`."""

    STRATEGIES = {cls.name: cls for cls in (MaskDifferenceStrategy, EntropyStrategy, RandomStrategy)}

    @classmethod
    def available_strategies(cls) -> List[str]:
        return sorted(cls.STRATEGIES)

    @classmethod
    def create_strategy(cls, name: str, **kwargs) -> BaseActiveLearningStrategy:
        if name not in cls.STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(cls.available_strategies())}")
        return cls.STRATEGIES[name](**kwargs)


def _stack_images(items: List[dict]) -> torch.Tensor:
    return torch.stack([item["image"] for item in items])


