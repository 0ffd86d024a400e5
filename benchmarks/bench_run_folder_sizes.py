"""How large a run folder gets: the bytes of best_model_dice*.pth / last_model.pth (the full LoRA_Sam state_dict)
and of last_state.pth (what --resume needs: the trained tensors, AdamW's state, the labeled names), per model.

    python3 benchmarks/bench_run_folder_sizes.py [--models sam2.1_hiera_t sam2.1_hiera_l]

Seeded random weights (the sizes do not depend on the values); the files are written with the trainer's own code
(epoch_steps.cpu_state_dict, run_folder.ResumeState) into a temporary folder that is removed afterwards.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from epoch_steps import cpu_state_dict  # noqa: E402
from run_folder import ResumeState, RunFolder  # noqa: E402
from safe_io import atomic_torch_save  # noqa: E402
from sam_lora_image_encoder_prompt import build_model  # noqa: E402


def sizes(model_cfg: str, folder: Path) -> tuple:
    """(full state_dict bytes, resume state bytes) of ``model_cfg`` after one optimiser step."""
    net = build_model(model_cfg, None, 512, seed=0)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)
    for p in trainable:  # one step creates AdamW's two moments per trained tensor, as after the first epoch
        p.grad = torch.zeros_like(p)
    optimizer.step()
    atomic_torch_save(cpu_state_dict(net), folder / "last_model.pth")
    state = ResumeState(1, {}, {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad},
                        optimizer.state_dict(), torch.amp.GradScaler("cuda", enabled=False).state_dict(),
                        [f"ISIC_{i:07d}" for i in range(200)], 0.5, "")
    RunFolder(folder).save_state(state)
    return (folder / "last_model.pth").stat().st_size, (folder / "last_state.pth").stat().st_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["sam2.1_hiera_t", "sam2.1_hiera_l"])
    args = p.parse_args(argv)
    print("| model | best_model_dice*.pth = last_model.pth | last_state.pth | run folder (best + last + state) |")
    print("|---|---|---|---|")
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            full, state = sizes(model, Path(tmp))
        mb = 2 ** 20
        print(f"| {model} | {full / mb:.0f} MiB | {state / mb:.0f} MiB | {(2 * full + state) / mb:.0f} MiB |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
