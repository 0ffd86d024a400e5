"""Options that change speed or memory but not what is learned or selected: activation checkpointing of the
Hiera blocks (--grad_ckpt) and the pool-scoring batch size (--score_batch_size)."""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import utils
from active_learning_strategies import ActiveLearningStrategyFactory, SelectionContext, default_score_batch_size
from sam_lora_image_encoder_prompt import build_model

MODEL, SIZE = "sam2.1_hiera_t", 64
GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def count_block_calls(net):
    calls = []
    for block in net.sam.image_encoder.trunk.blocks:
        block.register_forward_pre_hook(lambda *args: calls.append(1))  # recomputation may stop early
    return calls


def loss_and_grads(net, images, labels):
    net.zero_grad(set_to_none=True)
    outputs = net(images, False, SIZE, 0, "point", generator=np.random.default_rng(0))
    loss = sum(utils.segmentation_loss(F.interpolate(outputs[f"low_res_logits{d}"], size=labels.shape[-2:],
                                                     mode="bilinear", align_corners=False), labels)[0]
               for d in (1, 2))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    net = build_model(MODEL, None, SIZE, seed=0).train()
    with torch.no_grad():  # LoRA B starts at 0, which would leave every A without gradient
        for module in net.lora_modules():
            module.lora_b_q.weight.normal_(0, 0.02)
            module.lora_b_v.weight.normal_(0, 0.02)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    labels = (torch.rand(2, SIZE, SIZE, generator=gen) > 0.5).long()
    calls = count_block_calls(net)
    blocks = len(net.sam.image_encoder.trunk.blocks)

    plain_loss, plain_grads = loss_and_grads(net, images, labels)
    assert len(calls) == blocks
    net.set_grad_checkpointing(True)
    calls.clear()
    ckpt_loss, ckpt_grads = loss_and_grads(net, images, labels)
    assert len(calls) == 2 * blocks  # each block ran again in backward: checkpointing was really on

    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert plain_grads.keys() == ckpt_grads.keys()
    lora = [n for n in plain_grads if ".lora_" in n]
    assert len(lora) == 4 * blocks and all(plain_grads[n].abs().sum() > 0 for n in lora)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)

    calls.clear()
    with torch.no_grad():
        net(images, False, SIZE, -1)
    net.eval()
    net(images, False, SIZE, -1)
    assert len(calls) == 2 * blocks  # no_grad and eval passes are not checkpointed


@pytest.mark.parametrize("strategy", ["mask_difference", "entropy"])
def test_selection_does_not_depend_on_the_scoring_batch_size(strategy, decisive):
    net = decisive(build_model(MODEL, None, SIZE, seed=0))
    gen = torch.Generator().manual_seed(0)
    dataset = [{"image": image} for image in torch.randn(19, 3, SIZE, SIZE, generator=gen)]
    pool = [int(i) for i in torch.randperm(19, generator=gen)[:17]]  # 17: partial last batches for 3 and 16
    chooser = ActiveLearningStrategyFactory.create_strategy(strategy)
    results = {size: chooser.select(SelectionContext(net, dataset, pool, 5, torch.device("cpu"), batch_size=size,
                                                     seed=3)) for size in (1, 3, 16)}
    figures = {size: selection.figure for size, selection in results.items()}
    results = {size: (selection.chosen, selection.scores) for size, selection in results.items()}
    chosen, scores = results[1]
    assert np.ptp(list(scores.values())) > 0.02  # scores differ between images (by far more than the tolerance)
    for size in (3, 16):
        assert results[size][0] == chosen, size
        assert results[size][1] == pytest.approx(scores, abs=1e-5)
        if strategy == "mask_difference":  # the picture shows each chosen image's own predictions, whatever the batch
            torch.testing.assert_close(figures[size], figures[1], atol=1 / 255 + 1e-6, rtol=0)


def test_default_score_batch_size():
    assert default_score_batch_size(torch.device("cuda", 0), 4) == 16
    assert default_score_batch_size(torch.device("cpu"), 4) == 4


def test_gpu_check_script_parses_and_its_dry_run_prints_the_tables():
    """benchmarks/gpu_check.sh is the prepared GPU check; on the CPU its --dry-run runs the same code at toy sizes."""
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # toy sizes: threads only add overhead, a lot on a busy CPU
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", "--compile"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines() if line.startswith("| hiera_t")]
    assert len(rows) == 2, done.stdout  # the main table and the torch.compile table
    cells = [cell.strip() for cell in rows[0]]
    assert cells[:3] == ["hiera_t", "64", "yes"]
    # encoder ms, scoring, ratio, then training and validation in both precisions (float32, mixed)
    assert all(float(value) > 0 for value in cells[3:10])
    assert cells[10:13] == ["-", "-", "-"]  # no CUDA peak memory on the CPU
    # the dry run compares bf16 (CPU autocast) with float32 scores: they differ, and still rank alike
    assert 0 < float(cells[13]) < 0.05 and 0.5 < float(cells[14]) <= 1.0
