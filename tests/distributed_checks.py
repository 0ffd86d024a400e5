"""The pieces of a run on several processes against one process, in one torchrun launch (gloo, CPU, 64 px);
tests/test_distributed.py starts it and reads what each rank writes:

    torchrun --standalone --nproc_per_node 3 tests/distributed_checks.py OUT CHECKPOINT

OUT/rank<r>.json, per rank:
- ``steps``: training steps through the product's code (``epoch_steps.train_step`` with the model in
  DistributedDataParallel, each rank on its share of the batch) and, on rank 0, the same step in one process on
  the whole batch, from the same weights: both losses, the largest gradient (as it was before clipping) and
  weight differences, and which parameters got no gradient. Batches of 4 (on 3 ranks: 2 + 1 + 1) and of 2 (1 + 1
  + 0: a rank with no image), with --promptmode none and point (per-image prompt points);
- ``selections``: every strategy's selection with each rank scoring its share of a pool of 7 (3 + 2 + 2), and on
  rank 0 the one-process selection;
- ``errors``: what each rank raised when one rank's work raised (the lowest rank's error reaches every rank).
"""
from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import epoch_steps  # noqa: E402
from active_learning_strategies import ActiveLearningStrategyFactory, SelectionContext  # noqa: E402
from datasets_skin import DatasetError  # noqa: E402
from distributed import Ranks  # noqa: E402
from sam_lora_image_encoder_prompt import build_model  # noqa: E402

SIZE, LR = 64, 1e-3


def step_run(model: torch.nn.Module, ranks: Ranks, promptmode: str) -> types.SimpleNamespace:
    """What ``train_step`` reads of a Run: the settings, the model (in DDP on several ranks), its optimiser."""
    args = types.SimpleNamespace(promptmode=promptmode, num_classes=1, img_size=SIZE, dice_weight=0.8,
                                 prompt_draw="per_image", seed=5)
    run = types.SimpleNamespace(args=args, model=model, ranks=ranks, device=torch.device("cpu"), parallel=None,
                                optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                                            weight_decay=0.01),
                                scaler=torch.amp.GradScaler("cuda", enabled=False),
                                autocast=lambda: torch.autocast("cpu", enabled=False))
    run.parallel = epoch_steps.parallel_model(run)
    return run


CLIP = torch.nn.utils.clip_grad_norm_
UNCLIPPED: list = []  # the gradients train_step clipped last, as they were before clipping


def recording_clip(parameters, *args, **kwargs):
    """torch.nn.utils.clip_grad_norm_, keeping the gradients it is given (clipping would hide a wrong scale)."""
    parameters = list(parameters)
    UNCLIPPED[:] = [None if p.grad is None else p.grad.clone() for p in parameters]
    return CLIP(parameters, *args, **kwargs)


torch.nn.utils.clip_grad_norm_ = recording_clip


def one_step(model: torch.nn.Module, ranks: Ranks, promptmode: str, batch: dict) -> dict:
    run = step_run(model, ranks, promptmode)
    loss = float(epoch_steps.train_step(run, 3, batch, None)["loss"])
    grads = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], UNCLIPPED))
    return dict(loss=loss, grads=grads, weights={n: p.detach().clone() for n, p in model.named_parameters()})


def compare_steps(base: torch.nn.Module, ranks: Ranks, batch: dict, promptmode: str) -> dict:
    split = one_step(copy.deepcopy(base), ranks, promptmode, batch)
    found = dict(batch=len(batch["index"]), promptmode=promptmode, loss=split["loss"],
                 no_grad=sorted(n for n, g in split["grads"].items() if g is None))
    if ranks.first:
        whole = one_step(copy.deepcopy(base), Ranks(), promptmode, batch)
        both = [n for n, g in whole["grads"].items() if g is not None and split["grads"][n] is not None]
        found.update(whole_loss=whole["loss"], whole_no_grad=sorted(n for n, g in whole["grads"].items() if g is None),
                     grad_diff=max(float((split["grads"][n] - whole["grads"][n]).abs().max()) for n in both),
                     grad_scale=max(float(whole["grads"][n].abs().max()) for n in both),
                     lora_grads=sum(1 for n in both if ".lora_" in n and bool(whole["grads"][n].abs().sum() > 0)),
                     weight_diff=max(float((split["weights"][n] - whole["weights"][n]).abs().max())
                                     for n in whole["weights"]))
    return found


def compare_selections(base: torch.nn.Module, ranks: Ranks, images: torch.Tensor, out: Path) -> dict:
    dataset = [{"image": image} for image in images]
    found = {}
    for name in ActiveLearningStrategyFactory.available_strategies():
        def select(ranks_: Ranks, run_dir):
            context = SelectionContext(base, dataset, list(range(7)), 3, torch.device("cpu"), unlabeled=range(7),
                                       labeled=[7, 8], batch_size=2, seed=11, run_dir=run_dir, ranks=ranks_)
            return ActiveLearningStrategyFactory.create_strategy(name).select(context)

        split = select(ranks, out)  # the pretrained-embedding cache: written in OUT by rank 0
        found[name] = dict(chosen=split.chosen, scores={str(k): v for k, v in split.scores.items()},
                           figure=split.figure is not None)
        if ranks.first:
            whole = select(Ranks(), None)
            found[name].update(whole_chosen=whole.chosen, whole_scores={str(k): v for k, v in whole.scores.items()},
                               figure_diff=None if whole.figure is None or split.figure is None
                               else float((whole.figure - split.figure).abs().max()))
    return found


def exchanged_errors(ranks: Ranks) -> dict:
    """What each rank raises when rank 1's share fails (gather) and when rank 0's work fails (from_first)."""
    def share_of_rank_one_fails():
        if ranks.rank == 1:
            raise DatasetError("'b.jpg' is damaged")
        return [ranks.rank]

    def stopped_on_first():
        raise epoch_steps.RunStopped(2, "bad_file", "'c.jpg' is damaged")

    found = {}
    for what, exchange in (("gather", lambda: ranks.gather(share_of_rank_one_fails)),
                           ("from_first", lambda: ranks.from_first(stopped_on_first))):
        try:
            exchange()
            found[what] = None
        except Exception as err:  # noqa: BLE001 - what was raised is the result
            found[what] = [type(err).__name__, str(err), getattr(err, "where", None)]
    return found


def main(out: Path, checkpoint: str) -> None:
    ranks = Ranks.from_environment()
    base = build_model("sam2.1_hiera_t", checkpoint, SIZE, seed=0)
    with torch.no_grad():  # LoRA B starts at 0, which would leave every A without gradient
        generator = torch.Generator().manual_seed(1)
        for module in base.lora_modules():
            for b in (module.lora_b_q.weight, module.lora_b_v.weight):
                b.copy_(torch.randn(b.shape, generator=generator) * 0.02)
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(9, 3, SIZE, SIZE, generator=gen)
    labels = (torch.rand(9, SIZE, SIZE, generator=gen) > 0.6).long()
    steps = [compare_steps(base, ranks, dict(image=images[:n], label=labels[:n], index=torch.arange(n) + 2), mode)
             for n in (4, 2) for mode in ("none", "point")]
    result = dict(rank=ranks.rank, size=ranks.size, steps=steps,
                  selections=compare_selections(base, ranks, images, out), errors=exchanged_errors(ranks))
    (out / f"rank{ranks.rank}.json").write_text(json.dumps(result, indent=1))
    ranks.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
