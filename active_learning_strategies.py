"""Active-learning selection strategies: which unlabeled images the expert annotates next.

A strategy gets what the selection step knows (``SelectionContext``: the model, the training set, this epoch's
random pool, the whole unlabeled set, the labeled images, k, the device, batch sizes, the epoch's seed, the run
folder for caches, the pretrained encoder) and returns one ``Selection``: the chosen images in order, a score
for every pool image, and optionally per-image details and a picture for TensorBoard. Score-and-top-k strategies
derive from ``TopKStrategy``; a strategy may also choose a set (``select`` is all it must implement). Strategies
register by name (``ActiveLearningStrategyFactory``), and declare their parameters (``Parameter``): the trainer
makes each one a flag, the factory passes it in, and a resumed run must repeat it.

Scores (top-k):

- ``mask_difference`` (DESIGN decisions 3 and 4): disagreement between three predictions of the same image --
  decoder 1 unprompted, decoder 2 prompted with the centre point of decoder 1's mask, decoder 1 prompted with a
  random point of that mask -- from ONE image-encoder pass per image.
- ``entropy``: mean pixel entropy of decoder 1's unprompted prediction.
- ``tta``: mean pixel variance of decoder 1's unprompted foreground probability over four flips, each mapped
  back (one encoder pass per view).
- ``random``: a seeded uniform draw (the usual baseline).

Sets chosen from one embedding vector per image (``embedding_vectors``; the rules are embedding_selection's):

- ``mask_difference_diverse`` (ours): the best mask-difference score of each k-means cluster of the pool; score
  and embedding from the same encoder pass.
- ``coreset``, ``typiclust``, ``probcover``, ``alps``: on the pretrained encoder's embeddings (LoRA off), computed
  once per run and kept in the run folder (``PretrainedEmbeddings``); core-set may use the current model's.

The score formulas are pure tensor functions at the top (baal's heuristics style).

On several processes (torchrun: the context's ``ranks``) each rank scores, or encodes, its share of the images; the
scores and vectors are gathered in image order, and the choice is made once from them (a set rule runs on rank 0
alone), so that the selection is the one a single process makes.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import tb_images
from distributed import Ranks
from safe_io import CheckpointFileError, atomic_torch_save, load_torch_file
from sam_lora_image_encoder_prompt import class_probabilities, prompts_from_logits
from utils import autocast

Scores = Dict[int, float]
PoolSize = Union[int, str]  # a number of images, or ALL_UNLABELED
ALL_UNLABELED = "all"  # --pool_size all: the pool is every unlabeled image
NO_FIRST_ROUND = "none"
EMBEDDINGS_FILE = "pretrained_embeddings.pt"  # in the run folder: the pretrained encoder's embeddings (a cache)
MASK_THRESHOLD = 0.6
# (D(no,center), D(no,rand), D(center,rand), |no-center|, |no-rand|, |center-rand|)
MASK_DIFFERENCE_WEIGHTS = (0.25, 0.20, 0.25, 0.10, 0.10, 0.10)
# tta's views: the dimensions of a B x C x H x W batch each flips (none, horizontal, vertical, both)
TTA_FLIPS: Tuple[Tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))
log = logging.getLogger("trainer.strategies")  # under the trainer's logger: its lines go to log.txt


class StrategySettingError(ValueError, argparse.ArgumentTypeError):
    """A strategy setting, pool size or strategy choice that is not one (argparse shows its message as the flag's
    error)."""


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


def flip_variance(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """V probability maps B x K x h x w of the same images, each mapped back to the unflipped frame -> B mean over
    channels and pixels of the variance over the V views (population variance: divided by V)."""
    stacked = torch.stack([view.float() for view in views])
    return stacked.var(dim=0, unbiased=False).flatten(1).mean(dim=1)


def flipped(images: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
    """The B x C x H x W batch flipped along ``dims`` (its own inverse); () leaves it as it is."""
    return images.flip(dims) if dims else images


def embedding_vectors(features: Mapping[str, object]) -> torch.Tensor:
    """``LoRA_Sam.encode``'s features -> B x 256 float32 unit vectors, one per image.

    The spatial mean of the top FPN level ``backbone_fpn[-1]`` (B x 256 x S/16 x S/16, before SAM2 adds
    ``no_mem_embed``), L2-normalised: the image embedding the mask decoders read, averaged over positions (so it
    does not depend on where the lesion sits or on the image size), without the constant ``no_mem_embed`` that
    carries nothing about the image; unit length as TypiClust and ProbCover normalise their features (why, in
    embedding_selection's docstring). Each image's vector depends on that image alone (tested against batch size
    and position in the batch).
    """
    top = features["backbone_fpn"][-1].float()
    return F.normalize(top.mean(dim=(2, 3)), dim=1)


def image_digest(image: torch.Tensor) -> str:
    """A fingerprint of one encoder input (3 x S x S): the cache key of its embedding, so that a cached vector is
    used only for exactly the pixels it was computed from (another decode, size or file gives another key)."""
    data = image.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha1(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()


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
    CUDA (None: ``utils.amp_dtype``, bf16 where supported; the trainer passes ``utils.scoring_dtype``); feature_key:
    what the pretrained encoder's embedding of an image depends on besides the image (model config, checkpoint,
    image size, ...), the key of that cache; ranks: this process's place in a run on several (``distributed``),
    whose ranks each score their share of the pool.
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
    feature_key: Mapping[str, str] = field(default_factory=dict)
    ranks: Ranks = field(default_factory=Ranks)

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
    image), ``figure`` (optional 3 x H x W picture in [0, 1] for TensorBoard, e.g. why these were chosen) and
    ``strategy``, the name of the strategy that chose (al_selection.csv's strategy column)."""

    chosen: List[int]
    scores: Scores
    ranking: Optional[List[int]] = None
    details: Dict[int, dict] = field(default_factory=dict)
    figure: Optional[torch.Tensor] = None
    strategy: str = ""  # the name of the strategy that made it (set by Strategy.select)

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
            return Selection([], {}, strategy=self.name)
        selection = self.choose(context)
        bad = [index for index, value in selection.scores.items() if not np.isfinite(value)]
        if bad:
            raise RuntimeError(f"{self.name}: non-finite scores for images {bad[:5]} (model produced NaN/inf?)")
        selection.strategy = self.name
        return selection

    @abstractmethod
    def choose(self, context: SelectionContext) -> Selection:
        """The selection from a non-empty, checked pool."""


class TopKStrategy(Strategy):
    """Scores every pool image, chooses the k highest (ties: smaller index first)."""

    def choose(self, context: SelectionContext) -> Selection:
        scores = self.score_pool(context)
        chosen = top_k(scores, min(context.k, len(scores)))
        return Selection(chosen, scores, figure=self.figure(context, chosen, scores) if context.ranks.first else None)

    @abstractmethod
    def score_pool(self, context: SelectionContext) -> Scores:
        """{index: score} for every pool image (higher = more worth annotating)."""

    def figure(self, context: SelectionContext, chosen: List[int], scores: Scores) -> Optional[torch.Tensor]:
        """A picture of why ``chosen`` were chosen, for TensorBoard; None by default."""
        return None


class ModelScoringStrategy(TopKStrategy):
    """Runs the model over the pool in mini-batches (eval mode, no grad, the context's autocast on CUDA); each rank
    of a run on several processes its share of the pool, the scores gathered in pool order."""

    def score_pool(self, context: SelectionContext) -> Scores:
        def score_share() -> List[Tuple[int, float]]:
            scores: List[Tuple[int, float]] = []
            with scoring_mode(context.model, context.device, context.autocast_dtype):
                for indices, images in context.batches(context.ranks.share(context.pool), f"AL scoring ({self.name})"):
                    batch_scores = self.score_batch(context.model, images, indices, context.seed)
                    scores += zip(indices, batch_scores.float().cpu().tolist())
            return scores

        scores = dict(context.ranks.gather(score_share))
        self.gather_kept(context.ranks)
        return scores

    def gather_kept(self, ranks: Ranks) -> None:
        """Bring together what ``score_batch`` kept on each rank besides the scores (nothing, by default)."""

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

    def compare(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int], seed: int,
                features: Optional[Dict[str, object]] = None) -> ComparedPredictions:
        """The three predictions the score compares, from one encoder pass (points seeded per (seed, index)); pass
        the images' ``features`` when they are encoded already."""
        features = model.encode(images) if features is None else features
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

    def gather_kept(self, ranks: Ranks) -> None:
        if ranks.active:  # each rank's best k: the pool's best k are among them
            self._kept = dict(ranks.gather(lambda: list(self._kept.items())))

    def score_batch(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int], seed: int) -> torch.Tensor:
        compared = self.compare(model, images, indices, seed)
        scores = mask_difference_scores(compared.no_prompt, compared.center, compared.random, self.threshold)
        self._keep_best(indices, scores.float().cpu().tolist(), compared)
        return scores

    def _keep_best(self, indices: List[int], scores: List[float], compared: ComparedPredictions) -> None:
        """Keep the predictions of the ``_keep`` best-scoring images so far (those top-k will choose); only the
        batch's images that make the cut are copied to the CPU, in one copy."""
        candidates = {i: s for i, (s, _) in self._kept.items()}
        candidates.update(zip(indices, scores))
        best = top_k(candidates, self._keep)
        position = {index: p for p, index in enumerate(indices)}
        new = [i for i in best if i in position]
        copied = compared.rows([position[i] for i in new]) if new else None
        row_of = {index: row for row, index in enumerate(new)}
        self._kept = {i: (candidates[i], copied.rows([row_of[i]])) if i in row_of else self._kept[i] for i in best}

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


class TTAStrategy(ModelScoringStrategy):
    """Test-time-augmentation uncertainty (after MONAI Label's TTA scoring and Wang et al. 2019): decoder 1's
    unprompted foreground probability for the image flipped four ways (none, horizontal, vertical, both), each
    prediction flipped back onto the image; the score is the mean pixel variance over the four (``flip_variance``).
    One encoder pass per view: four per image."""

    name = "tta"

    def score_batch(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int], seed: int) -> torch.Tensor:
        return flip_variance([flipped(class_probabilities(model.predict_logits(flipped(images, dims), 1)), dims)
                              for dims in TTA_FLIPS])


# --------------------------------------------------------------------------------------
# set strategies on embedding vectors
# --------------------------------------------------------------------------------------


def positive_number(text: str) -> float:
    """A Parameter type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise StrategySettingError(f"expected a number > 0, got {text!r}")
    return value


def selection_rules():
    """The embedding_selection module, imported when a set strategy first selects: it brings scikit-learn, which
    adds seconds to the start of every run that never uses it."""
    import embedding_selection

    return embedding_selection


def preference_scores(pool: Sequence[int], chosen: Sequence[int]) -> Scores:
    """The scores of a strategy that chooses a set: (k - j) / k for the j-th image chosen (1 for the first), 0 for
    every other pool image."""
    scores = {int(i): 0.0 for i in pool}
    scores.update({index: (len(chosen) - j) / len(chosen) for j, index in enumerate(chosen)})
    return scores


def set_ranking(chosen: Sequence[int], rest: Sequence[int]) -> List[int]:
    """The pool in a set strategy's order: the chosen images in the order chosen, then ``rest`` in its order."""
    taken = set(chosen)
    return list(chosen) + [i for i in rest if i not in taken]


class PretrainedEmbeddings:
    """The pretrained encoder's embedding (``embedding_vectors``, LoRA off) of each image a strategy asks for,
    computed once per run: kept in the run folder's EMBEDDINGS_FILE (without a run folder: in memory only), keyed
    by ``SelectionContext.feature_key`` (model config, checkpoint, image size, ...) and, per image, by the digest of
    its encoder input (``image_digest``). A file made with other settings, one that cannot be read, or one whose
    vectors are not finite or not as wide as the encoder's (checked when it first encodes an image), is rebuilt, and
    the log says why: it is a cache, nothing a person wrote.

    The file: dict(key={setting: text}, digests=[N hex strings], vectors=N x 256 float32 tensor).
    """

    def __init__(self) -> None:
        self._key: Optional[Dict[str, str]] = None
        self._vectors: Dict[str, torch.Tensor] = {}
        self._width: Optional[int] = None  # the encoder's, once it has encoded an image in this process
        self._file_outdated = False

    def vectors(self, context: SelectionContext, indices: Sequence[int]) -> np.ndarray:
        """len(indices) x 256 float32 unit vectors of these dataset images; only images not seen before in this
        run are encoded (one pretrained encoder pass each). On several processes rank 0 reads the file and sends
        what it holds to the others (no shared file system is assumed), each rank digests and encodes its share,
        and rank 0 alone writes the file."""
        ranks = context.ranks
        path = None if context.run_dir is None else Path(context.run_dir) / EMBEDDINGS_FILE
        key = {name: str(value) for name, value in context.feature_key.items()}
        if not ranks.active:
            self._load(path, key)
        elif key != self._key:
            self._received(*ranks.from_first(self._held_after_load, path, key))
        digests = dict(ranks.gather(lambda: [(int(i), image_digest(context.dataset[int(i)]["image"]))
                                             for i in ranks.share(indices)]))
        encoded = self._encode_missing(context, digests)
        if self._drop_other_widths(path):
            encoded += self._encode_missing(context, digests)
        if encoded:
            log.info("pretrained embeddings: %d image(s) encoded, %d from the cache%s", encoded,
                     len(set(digests.values())) - encoded, "" if path is None else f" ({path})")
        if path is not None and (encoded or self._file_outdated):
            ranks.from_first(lambda: atomic_torch_save(dict(key=self._key, digests=list(self._vectors),
                                                            vectors=torch.stack(list(self._vectors.values()))), path))
            self._file_outdated = False
        return torch.stack([self._vectors[digests[int(i)]] for i in indices]).numpy()

    def _encode_missing(self, context: SelectionContext, digests: Dict[int, str]) -> int:
        """Encode the images of ``digests`` (index -> digest) whose vector is not kept, each rank its share; how many
        were encoded."""
        ranks = context.ranks
        new = list({digest: index for index, digest in digests.items() if digest not in self._vectors}.values())
        if new:
            def encode_share() -> List[Tuple[str, torch.Tensor]]:
                found: List[Tuple[str, torch.Tensor]] = []
                with scoring_mode(context.model, context.device):
                    for batch, images in context.batches(ranks.share(new), "pretrained embeddings"):
                        vectors = embedding_vectors(context.encode_pretrained(images)).cpu()
                        found += zip((digests[i] for i in batch), vectors)
                return found

            found = ranks.gather(encode_share)
            self._vectors.update(found)
            self._width = len(found[0][1])
        return len(new)

    def _drop_other_widths(self, path: Optional[Path]) -> bool:
        """Drop the vectors (a damaged file's) whose width is not the encoder's, once that is known, saying so;
        whether there were any."""
        other = sorted({len(v) for v in self._vectors.values()} - {self._width}) if self._width is not None else []
        if other:
            self._outdated(path, f"its vectors are {', '.join(map(str, other))} wide, the encoder's {self._width}")
            self._vectors = {d: v for d, v in self._vectors.items() if len(v) == self._width}
        return bool(other)

    def _held_after_load(self, path: Optional[Path], key: Dict[str, str]) -> tuple:
        """``_load``, then what this object holds, as rank 0 sends it: (key, digests, N x D vectors, outdated)."""
        self._load(path, key)
        vectors = torch.stack(list(self._vectors.values())) if self._vectors else None
        return self._key, list(self._vectors), vectors, self._file_outdated

    def _received(self, key: Dict[str, str], digests: List[str], vectors: Optional[torch.Tensor],
                  outdated: bool) -> None:
        self._key, self._file_outdated = key, outdated
        self._vectors = dict(zip(digests, vectors)) if vectors is not None else {}

    def _load(self, path: Optional[Path], key: Dict[str, str]) -> None:
        """Take the file's vectors when it was made with ``key`` and they are usable (2-D, floating point, finite,
        one per digest; their width is checked against the encoder's by ``_drop_other_widths``); otherwise say why
        it is rebuilt."""
        if key != self._key:
            self._key, self._vectors = key, {}
        if path is None or not path.is_file():
            return
        try:
            stored = load_torch_file(path)
            stored_key, digests, vectors = dict(stored["key"]), list(stored["digests"]), stored["vectors"]
            if not vectors.is_floating_point():
                raise ValueError(f"vectors of dtype {vectors.dtype}, not floating point")
            if vectors.dim() != 2 or len(digests) != len(vectors) or not all(isinstance(d, str) for d in digests):
                raise ValueError(f"{len(digests)} digests for vectors of shape {tuple(vectors.shape)}")
        except (CheckpointFileError, KeyError, TypeError, ValueError, AttributeError) as err:
            self._outdated(path, f"it cannot be read: {err}")
            return
        changed = [f"{name} was {stored_key.get(name)}, now {key.get(name)}" for name in sorted(set(key) | set(stored_key))
                   if stored_key.get(name) != key.get(name)]
        if changed:
            self._outdated(path, "it was made with other settings: " + "; ".join(changed))
            return
        broken = int((~torch.isfinite(vectors).all(dim=1)).sum())
        if broken:
            self._outdated(path, f"it holds NaN or inf in the vectors of {broken} image(s)")
            return
        self._vectors.update(zip(digests, vectors.float()))

    def _outdated(self, path: Path, why: str) -> None:
        if not self._file_outdated:
            log.info("%s is not used (%s); rebuilding it", path, why)
        self._file_outdated = True


class EmbeddingStrategy(Strategy):
    """Chooses a set from one embedding vector per pool and labeled image (``pick``: an embedding_selection rule),
    and draws where the chosen images sit (a PCA picture, TensorBoard's al/why_selected).

    features "pretrained": the pretrained encoder's vectors (LoRA off), computed once per run (``PretrainedEmbeddings``);
    "current": the model being fine-tuned, encoded again every epoch (pool and labeled images). k beyond the pool
    chooses the whole pool, as the top-k strategies do. k-means and neighbour searches run on one thread, so that
    the choice does not depend on the machine's core count (and no OpenMP thread waits on a busy CPU)."""

    features = "pretrained"

    def __init__(self) -> None:
        self._pretrained = PretrainedEmbeddings()

    def choose(self, context: SelectionContext) -> Selection:
        pool, labeled = [int(i) for i in context.pool], [int(i) for i in context.labeled]
        vectors = self.embed(context, pool + labeled)
        pool_vectors, labeled_vectors = vectors[:len(pool)], vectors[len(pool):]
        with threadpool_limits(limits=1):  # once: on rank 0 of a run on several processes
            positions = context.ranks.from_first(self.pick, pool_vectors, labeled_vectors, min(context.k, len(pool)),
                                                 context.seed)
            figure = tb_images.embedding_projection(pool_vectors, labeled_vectors, positions,
                                                    f"{self.name} ({self.features} embeddings)") \
                if context.ranks.first else None
        chosen = [pool[int(p)] for p in positions]
        return Selection(chosen, preference_scores(pool, chosen), ranking=set_ranking(chosen, sorted(pool)),
                         figure=figure)

    def embed(self, context: SelectionContext, indices: Sequence[int]) -> np.ndarray:
        """len(indices) x 256 unit vectors of these images, from the features this strategy uses."""
        if self.features == "pretrained":
            return self._pretrained.vectors(context, indices)

        def encode_share() -> List[torch.Tensor]:
            parts = []
            with scoring_mode(context.model, context.device):
                for _, images in context.batches(context.ranks.share(indices), f"embeddings ({self.name})"):
                    parts.append(embedding_vectors(context.model.encode(images)).cpu())
            return parts

        return torch.cat(context.ranks.gather(encode_share)).numpy()

    @abstractmethod
    def pick(self, pool: np.ndarray, labeled: np.ndarray, k: int, seed: int) -> np.ndarray:
        """N x D pool vectors, M x D labeled vectors (M may be 0) -> k pool positions, in the order chosen."""


class CoresetStrategy(EmbeddingStrategy):
    """Sener & Savarese 2018, core-set by k-center greedy (``embedding_selection.k_center_greedy``): the labeled
    images are the first centres (none labeled: the pool image nearest the pool's mean)."""

    name = "coreset"
    parameters = (
        Parameter("coreset_features", str, "pretrained", choices=("pretrained", "current"),
                  help="coreset: the embeddings it spreads over. pretrained: SAM2's own (LoRA off), computed once per "
                       "run and cached in the run folder, as MedCAL-Bench runs core-set on foundation-model features; "
                       "current: the model being fine-tuned, as Sener & Savarese (one encoder pass per pool and "
                       "labeled image every epoch)"),
    )

    def __init__(self, coreset_features: str = "pretrained"):
        super().__init__()
        self.features = coreset_features

    def pick(self, pool: np.ndarray, labeled: np.ndarray, k: int, seed: int) -> np.ndarray:
        return selection_rules().k_center_greedy(pool, labeled, k)


class TypiClustStrategy(EmbeddingStrategy):
    """Hacohen et al. 2022, TypiClust (TPC_RP, ``embedding_selection.typiclust``): the most typical image of each of
    the k largest k-means clusters (of labeled and pool, into |L| + k) that hold no labeled image."""

    name = "typiclust"

    def pick(self, pool: np.ndarray, labeled: np.ndarray, k: int, seed: int) -> np.ndarray:
        return selection_rules().typiclust(pool, labeled, k, seed)


class ProbCoverStrategy(EmbeddingStrategy):
    """Yehuda et al. 2022, ProbCover (``embedding_selection.probcover``): greedy maximum coverage of delta-balls around
    every image, the labeled images' balls counting as covered."""

    name = "probcover"
    parameters = (
        Parameter("probcover_delta", positive_number, None,
                  help="probcover: the ball radius delta between unit embedding vectors (distances lie in 0..2); "
                       "default: each epoch, the largest delta whose balls stay 95%% pure against a k-means partition "
                       "of labeled and pool images into |L| + k clusters"),
    )

    def __init__(self, probcover_delta: Optional[float] = None):
        super().__init__()
        self.delta = probcover_delta

    def pick(self, pool: np.ndarray, labeled: np.ndarray, k: int, seed: int) -> np.ndarray:
        return selection_rules().probcover(pool, labeled, k, delta=self.delta, seed=seed)


class ALPSStrategy(EmbeddingStrategy):
    """ALPS as MedCAL-Bench adapts it to images (``embedding_selection.alps``): the image nearest the centre of each
    of k k-means clusters of the pool. It ignores the labeled images (a one-shot cold-start rule: it suits
    --first_round)."""

    name = "alps"

    def pick(self, pool: np.ndarray, labeled: np.ndarray, k: int, seed: int) -> np.ndarray:
        return selection_rules().alps(pool, k, seed)


class DiverseMaskDifferenceStrategy(MaskDifferenceStrategy):
    """Ours: mask difference made diversity-aware (``embedding_selection.mask_difference_diverse``): the pool's
    embeddings in k k-means clusters, the highest mask-difference score of each. Scores and embeddings come from
    the same encoder pass (the model being fine-tuned, so the clusters follow what it has learned); the scores are
    mask_difference's. The picture shows where the chosen images sit among the pool's (PCA)."""

    name = "mask_difference_diverse"

    def __init__(self, threshold: float = MASK_THRESHOLD, score_channels: str = "all"):
        super().__init__(threshold, score_channels)
        self._pool_vectors: Dict[int, np.ndarray] = {}

    def choose(self, context: SelectionContext) -> Selection:
        self._pool_vectors = {}
        scores = self.score_pool(context)
        if not all(math.isfinite(value) for value in scores.values()):
            return Selection([], scores)  # Strategy.select names the images
        pool = [int(i) for i in context.pool]
        vectors = np.stack([self._pool_vectors[i] for i in pool])
        with threadpool_limits(limits=1):  # once: on rank 0 of a run on several processes
            positions = context.ranks.from_first(selection_rules().mask_difference_diverse, vectors,
                                                 np.array([scores[i] for i in pool]), min(context.k, len(pool)),
                                                 context.seed)
            figure = tb_images.embedding_projection(vectors, vectors[:0], positions, f"{self.name} (current model)") \
                if context.ranks.first else None
        chosen = [pool[int(p)] for p in positions]
        return Selection(chosen, scores, ranking=set_ranking(chosen, top_k(scores, len(scores))), figure=figure)

    def gather_kept(self, ranks: Ranks) -> None:
        super().gather_kept(ranks)
        if ranks.active:
            self._pool_vectors = dict(ranks.gather(lambda: list(self._pool_vectors.items())))

    def score_batch(self, model: torch.nn.Module, images: torch.Tensor, indices: List[int], seed: int) -> torch.Tensor:
        features = model.encode(images)
        self._pool_vectors.update(zip(indices, embedding_vectors(features).cpu().numpy()))
        compared = self.compare(model, images, indices, seed, features)
        return mask_difference_scores(compared.no_prompt, compared.center, compared.random, self.threshold)


class ActiveLearningStrategyFactory:
    """Strategies by name; the names and parameters every command line offers come from here."""

    STRATEGIES: Dict[str, Type[Strategy]] = {
        cls.name: cls for cls in (MaskDifferenceStrategy, EntropyStrategy, RandomStrategy, TTAStrategy,
                                  DiverseMaskDifferenceStrategy, CoresetStrategy, TypiClustStrategy, ProbCoverStrategy,
                                  ALPSStrategy)}

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


# --------------------------------------------------------------------------------------
# naming a strategy and its pool: --pool_size, --first_round, compare_strategies' arms
# --------------------------------------------------------------------------------------


def parse_pool_size(text: str) -> PoolSize:
    """A pool size: a whole number of images >= 1, or "all" (every unlabeled image)."""
    if text == ALL_UNLABELED:
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise StrategySettingError(f"expected a number of images >= 1 or {ALL_UNLABELED!r}, got {text!r}")


def draw_pool(unlabeled: Sequence[int], pool_size: PoolSize, seed: int, epoch: int) -> List[int]:
    """The epoch's random pool: ``pool_size`` unlabeled images drawn by the (seed, epoch) generator, or all of them."""
    if pool_size == ALL_UNLABELED:
        return sorted(int(i) for i in unlabeled)
    rng = np.random.default_rng([seed, epoch])
    size = min(pool_size, len(unlabeled))
    return sorted(int(i) for i in rng.choice(np.asarray(unlabeled), size=size, replace=False))


@dataclass(frozen=True)
class StrategyChoice:
    """A strategy and the pool it selects from: "NAME" or "NAME@POOL" (POOL: a number of images or "all"; without
    it, the run's --pool_size)."""

    name: str
    pool_size: Optional[PoolSize] = None

    @classmethod
    def parse(cls, text: str) -> "StrategyChoice":
        name, at, pool = str(text).partition("@")
        if name not in ActiveLearningStrategyFactory.STRATEGIES:
            raise StrategySettingError(f"unknown strategy {name!r} in {text!r}; choose one of "
                                      f"{', '.join(ActiveLearningStrategyFactory.available_strategies())}")
        return cls(name, parse_pool_size(pool) if at else None)

    def __str__(self) -> str:
        return self.name if self.pool_size is None else f"{self.name}@{self.pool_size}"


def parse_first_round(text: str) -> str:
    """--first_round: "none", or a StrategyChoice, as its canonical text."""
    return NO_FIRST_ROUND if text == NO_FIRST_ROUND else str(StrategyChoice.parse(text))


@dataclass(frozen=True)
class EpochSelector:
    """Who selects in an epoch: a strategy and the size of the random pool it selects from."""

    strategy: Strategy
    pool_size: PoolSize

    @property
    def name(self) -> str:
        return self.strategy.name


@dataclass(frozen=True)
class SelectionPlan:
    """Which strategy selects in each epoch of a run, and from which pool, decided once when the run starts:
    ``first`` (--first_round) in epoch 1 when given, ``later`` (--strategy over --pool_size) in every other epoch.
    Each strategy is built once, so what it keeps between epochs (the embedding cache) is kept for the run."""

    later: EpochSelector
    first: Optional[EpochSelector] = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, object]) -> "SelectionPlan":
        """The plan of a run's settings (the trainer's flags, or a run folder's config): strategy, pool_size,
        first_round ("none" or NAME[@POOL], its pool defaulting to pool_size) and each strategy's parameters."""
        def selector(name: str, pool_size: PoolSize) -> EpochSelector:
            return EpochSelector(ActiveLearningStrategyFactory.from_settings(name, settings), pool_size)

        pool_size = settings["pool_size"]
        first = settings.get("first_round", NO_FIRST_ROUND)
        first = None if first in (NO_FIRST_ROUND, None) else StrategyChoice.parse(str(first))
        return cls(selector(str(settings["strategy"]), pool_size),
                   None if first is None else selector(first.name, first.pool_size or pool_size))

    def for_epoch(self, epoch: int) -> EpochSelector:
        return self.first if epoch == 1 and self.first is not None else self.later

    @property
    def selectors(self) -> List[EpochSelector]:
        """Every selector of the run: ``later``, then ``first`` when given."""
        return [self.later] + ([self.first] if self.first is not None else [])

