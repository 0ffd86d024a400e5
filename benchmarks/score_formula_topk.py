"""How often the choice of mask-difference formula changes which images a pool's top k are.

Ours (foreground only): the score of `active_learning_strategies.mask_difference_scores` on the C foreground
probability maps (softmax of our logits, = sigmoid of SAM2's mask logit). The reference code's
(active_learning_strategies.MaskDifferenceStrategy.select_samples): sigmoid of every one of the C+1 output
channels, the Dice terms over all of them (threshold 0.6) and the probability terms averaged over all of them.
With our constant-zero background logit the background channel is sigmoid(0) = 0.5 in every prediction: never
above 0.6 (the Dice terms are unchanged) and equal in all three (it adds zeros to the probability terms, which
are therefore multiplied by C / (C + 1): halved for C = 1). So reference = D + P / 2 where ours = D + P.

Each pool holds `--pool_size` synthetic images; each image three predictions (no prompt, centre, random point)
of one soft elliptic lesion, disagreeing by an image-specific shift, size change and logit offset, so that some
images disagree in their masks (D) more than in their probabilities (P) and others the other way round.

    python3 benchmarks/score_formula_topk.py                # 20 pools of 10, top 4, seed 0
    python3 benchmarks/score_formula_topk.py --pools 200 --seed 1
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from active_learning_strategies import mask_difference_scores, top_k  # noqa: E402

SIDE = 64  # decoder resolution of a 256-px input


def three_predictions(gen: torch.Generator) -> torch.Tensor:
    """3 x 1 x SIDE x SIDE foreground probabilities of one image under the three prompts."""
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=gen))

    centre = torch.tensor([uniform(16, 48), uniform(16, 48)])
    radius, sharpness = uniform(6, 20), uniform(0.5, 4.0)
    shift, stretch, offset = uniform(0, 6), uniform(0, 0.3), uniform(0, 2)
    rows, cols = torch.meshgrid(torch.arange(SIDE, dtype=torch.float32), torch.arange(SIDE, dtype=torch.float32),
                                indexing="ij")
    maps = []
    for _ in range(3):
        moved = centre + torch.randn(2, generator=gen) * shift
        size = radius * math.exp(float(torch.randn((), generator=gen)) * stretch)
        distance = torch.sqrt((rows - moved[0]) ** 2 + (cols - moved[1]) ** 2)
        logit = sharpness * (size - distance) / 2 + float(torch.randn((), generator=gen)) * offset
        maps.append(torch.sigmoid(logit)[None])
    return torch.stack(maps)


def pool_scores(pool: torch.Tensor) -> tuple:
    """pool: N x 3 x 1 x h x w foreground probabilities -> (ours, reference's) N scores each."""
    p_no, p_center, p_rand = pool.unbind(1)
    ours = mask_difference_scores(p_no, p_center, p_rand)

    def all_channels(p: torch.Tensor) -> torch.Tensor:  # sigmoid of [background logit 0, foreground logits]
        return torch.cat([torch.full_like(p[:, :1], 0.5), p], dim=1)

    reference = mask_difference_scores(all_channels(p_no), all_channels(p_center), all_channels(p_rand))
    return ours, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", type=int, default=20)
    parser.add_argument("--pool_size", type=int, default=10)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    changed_set = changed_order = 0
    identity_error = 0.0
    for _ in range(args.pools):
        pool = torch.stack([three_predictions(gen) for _ in range(args.pool_size)])
        ours, reference = pool_scores(pool)
        pairs = ((pool[:, 0], pool[:, 1]), (pool[:, 0], pool[:, 2]), (pool[:, 1], pool[:, 2]))
        prob_part = 0.1 * sum((a - b).abs().flatten(1).mean(1) for a, b in pairs)  # P; ours = D + P
        identity_error = max(identity_error, float((reference - (ours - prob_part / 2)).abs().max()))
        top_ours = top_k(dict(enumerate(ours.tolist())), args.k)
        top_reference = top_k(dict(enumerate(reference.tolist())), args.k)
        changed_set += set(top_ours) != set(top_reference)
        changed_order += top_ours != top_reference
    print(f"{args.pools} pools of {args.pool_size}, top {args.k}, seed {args.seed}:")
    print(f"  top-{args.k} set differs (foreground-only vs all-channel formula): {changed_set} of {args.pools} pools")
    print(f"  top-{args.k} order differs: {changed_order} of {args.pools} pools")
    print(f"  max |reference - (D + P/2)| over all images: {identity_error:.1e}")


if __name__ == "__main__":
    main()
