"""LoRA_Sam: prompt helpers, LoRA surgery, zero-shot parity with official SAM2, training step,
checkpoint formats."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prompt_geometry import (box_from_mask, center_point_from_mask, largest_component, mask_box_to_input,
                             mask_point_to_input, random_point_from_mask)
from safe_io import CheckpointFileError
from sam2.build_sam import build_sam2
from sam_lora_image_encoder_prompt import LoRA_Sam, LoRAQKV, prompts_from_logits

SIZE = 128  # model input size for the model tests (hiera_t)


def tiny_sam(seed=0, size=SIZE, ckpt=None):
    torch.manual_seed(seed)
    return build_sam2("sam2.1_hiera_t", ckpt, device="cpu", image_size=size)


def images(batch=2, size=SIZE, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- prompt helpers on constructed masks ------------------------------------------------------


def two_blobs():
    """12 x 14 mask: a 2 x 3 blob (rows 0-1, cols 0-2) and an L-shaped 5 x 5 square with a
    one-pixel tail (rows 5-9, cols 6-10, tail row 7, cols 11-13)."""
    mask = np.zeros((12, 14), dtype=bool)
    mask[0:2, 0:3] = True
    mask[5:10, 6:11] = True
    mask[7, 11:14] = True
    return mask


def test_largest_component_keeps_only_the_biggest():
    mask = two_blobs()
    component = largest_component(mask)
    assert component.sum() == 25 + 3
    assert not component[0:2, 0:3].any()
    assert component[5:10, 6:11].all() and component[7, 11:14].all()
    assert not largest_component(np.zeros((4, 5), dtype=bool)).any()
    # diagonal neighbours are connected (8-connectivity): a 3-pixel diagonal beats a 2-pixel bar
    diagonal = np.zeros((5, 5), dtype=bool)
    diagonal[[0, 1, 2], [0, 1, 2]] = True
    diagonal[4, 3:5] = True
    assert largest_component(diagonal).sum() == 3 and largest_component(diagonal)[1, 1]
    # torch input works the same
    assert np.array_equal(largest_component(torch.from_numpy(mask)), component)


def test_center_point_is_the_deepest_pixel_not_the_centroid():
    # the square's middle (row 7, col 8) is 3 pixels from the background; the tail pulls the
    # centroid to the right (col ~8.6) but cannot be deeper than 1
    assert center_point_from_mask(two_blobs()) == (8.0, 7.0)
    # a band along the top border: the border counts as background, so the middle row wins
    band = np.zeros((8, 9), dtype=bool)
    band[0:3, :] = True
    x, y = center_point_from_mask(band)
    assert y == 1.0 and 1.0 <= x <= 7.0  # without the border as background: row 0
    # empty mask: the image centre
    assert center_point_from_mask(np.zeros((8, 10), dtype=bool)) == (4.5, 3.5)


def test_random_points_stay_inside_the_largest_component():
    mask = two_blobs()
    component = largest_component(mask)
    rng = np.random.default_rng(0)
    points = [random_point_from_mask(mask, rng) for _ in range(300)]
    assert all(component[int(y), int(x)] for x, y in points)
    assert len(set(points)) > 20  # spread over the component, not stuck on one pixel
    tail = sum(1 for x, y in points if x > 10)
    assert 0 < tail < 100  # 3 of 28 pixels: ~32 expected
    again = [random_point_from_mask(mask, np.random.default_rng(0)) for _ in range(3)]
    assert again == [points[0]] * 3  # same seed, same first draw
    assert random_point_from_mask(np.zeros((8, 10), dtype=bool), rng) == (4.5, 3.5)


def test_box_bounds_of_the_largest_component():
    assert box_from_mask(two_blobs()) == (6.0, 5.0, 13.0, 9.0)
    assert box_from_mask(np.zeros((8, 10), dtype=bool)) == (0.0, 0.0, 9.0, 7.0)


def test_mask_to_input_coordinates():
    # 4 x 4 mask on a 16-pixel input: cell 0 covers input pixels 0..3, centre index 1.5
    assert mask_point_to_input((0.0, 3.0), (4, 4), 16) == (1.5, 13.5)
    assert mask_point_to_input((1.5, 1.5), (4, 4), 16) == (7.5, 7.5)  # empty-mask centre
    assert mask_box_to_input((1.0, 0.0, 2.0, 3.0), (4, 4), 16) == (4.0, 0.0, 11.0, 15.0)


def test_prompts_from_logits_batches_the_helpers():
    mask = two_blobs()
    logits = torch.zeros(2, 2, 12, 14)
    logits[0, 1] = torch.where(torch.from_numpy(mask), 5.0, -5.0)
    logits[1, 1] = -5.0  # empty prediction
    prompts = prompts_from_logits(logits, 56, [np.random.default_rng(1), np.random.default_rng(1)])
    assert prompts.center_points.shape == (2, 1, 2) and prompts.boxes.shape == (2, 4)
    cx, cy = mask_point_to_input((8.0, 7.0), (12, 14), 56)
    assert prompts.center_points[0, 0].tolist() == pytest.approx([cx, cy])
    assert prompts.center_points[1, 0].tolist() == pytest.approx([27.5, 27.5])  # centre of 56
    assert prompts.random_points[1, 0].tolist() == pytest.approx([27.5, 27.5])
    rx, ry = random_point_from_mask(mask, np.random.default_rng(1))
    assert prompts.random_points[0, 0].tolist() == pytest.approx(list(mask_point_to_input((rx, ry), (12, 14), 56)))
    assert prompts.boxes[0].tolist() == pytest.approx(list(mask_box_to_input((6.0, 5.0, 13.0, 9.0), (12, 14), 56)))


# ---- LoRA surgery ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_net():
    """An untrained LoRA_Sam (eval) for the tests that do not change it."""
    return LoRA_Sam(tiny_sam(), r=4).eval()


def test_lora_widths_init_and_frozen_parameters(shared_net):
    blocks = shared_net.sam.image_encoder.trunk.blocks
    widths = [block.attn.qkv.base.out_features // 3 for block in blocks]
    assert len(set(widths)) > 1  # stage transitions change the width
    assert any(block.dim != width for block, width in zip(blocks, widths))
    assert shared_net.lora_width == "input"  # the reference code's width is the default
    output_blocks = LoRA_Sam(tiny_sam(), r=4, lora_width="output").sam.image_encoder.trunk.blocks
    for block, width, output_block in zip(blocks, widths, output_blocks):
        qkv = block.attn.qkv
        assert isinstance(qkv, LoRAQKV)
        assert qkv.lora_a_q.weight.shape == (4, block.dim) == qkv.lora_a_v.weight.shape
        assert qkv.lora_b_q.weight.shape == (block.dim, 4) == qkv.lora_b_v.weight.shape  # the block's input width
        out_qkv = output_block.attn.qkv
        assert out_qkv.lora_b_q.weight.shape == (width, 4) == out_qkv.lora_b_v.weight.shape  # q/v's width
        assert qkv.lora_a_q.weight.abs().sum() > 0 and qkv.lora_b_q.weight.abs().sum() == 0
    trainable = {name for name, p in shared_net.named_parameters() if p.requires_grad}
    allowed = ("sam.sam_prompt_encoder.", "sam.sam_mask_decoder.", "sam.sam_mask_decoder2.")
    assert "sam.no_mem_embed" in trainable  # the reference freezes only the image encoder
    assert all(".lora_" in name or name.startswith(allowed) for name in trainable - {"sam.no_mem_embed"})
    assert sum(".lora_" in name for name in trainable) == 4 * len(blocks)
    assert any(name.startswith("sam.sam_mask_decoder2.") for name in trainable)
    assert any(name.startswith("sam.sam_prompt_encoder.") for name in trainable)
    assert not any(
        p.requires_grad for n, p in shared_net.named_parameters() if n.startswith("sam.image_encoder") and ".lora_" not in n
    )


def test_no_mem_embed_is_trained_by_default_and_kept_in_the_lora_file(tmp_path):
    """Trainable unless train_no_mem_embed=False; a trained one is saved in the LoRA file and read back; a file
    without it (written while it was frozen) loads and leaves the model's value as it is."""
    trained, frozen = LoRA_Sam(tiny_sam(), r=4), LoRA_Sam(tiny_sam(), r=4, train_no_mem_embed=False)
    assert trained.sam.no_mem_embed.requires_grad and not frozen.sam.no_mem_embed.requires_grad
    with torch.no_grad():
        trained.sam.no_mem_embed.fill_(0.5)
    trained.save_lora_parameters(tmp_path / "trained.pth")
    frozen.save_lora_parameters(tmp_path / "frozen.pth")
    assert "sam.no_mem_embed" in torch.load(tmp_path / "trained.pth", weights_only=True)
    assert "sam.no_mem_embed" not in torch.load(tmp_path / "frozen.pth", weights_only=True)
    for file, expected in (("trained.pth", 0.5), ("frozen.pth", 0.25)):
        for train in (True, False):
            fresh = LoRA_Sam(tiny_sam(), r=4, train_no_mem_embed=train)
            with torch.no_grad():
                fresh.sam.no_mem_embed.fill_(0.25)
            fresh.load_lora_parameters(tmp_path / file)
            assert torch.equal(fresh.sam.no_mem_embed, torch.full_like(fresh.sam.no_mem_embed, expected)), file


def test_lora_layer_choice_and_bad_arguments():
    sam = tiny_sam()
    with pytest.raises(ValueError, match="out of range"):
        LoRA_Sam(sam, r=2, lora_layer=[99])
    with pytest.raises(ValueError, match="rank"):
        LoRA_Sam(sam, r=0)
    with pytest.raises(ValueError, match="num_classes"):
        LoRA_Sam(sam, r=2, num_classes=5)
    partial = LoRA_Sam(sam, r=2, lora_layer=[0, 3])  # the failed calls above left sam untouched
    wrapped = [isinstance(b.attn.qkv, LoRAQKV) for b in partial.sam.image_encoder.trunk.blocks]
    assert [i for i, w in enumerate(wrapped) if w] == [0, 3]
    with pytest.raises(ValueError, match="already carries LoRA"):
        LoRA_Sam(sam, r=2)


@pytest.mark.parametrize("width", ["input", "output"])
def test_lora_updates_only_q_and_v(width):
    """A stage change (input 6, q/k/v 12 wide each): "output" updates all of q and v; "input" (the reference's)
    adds its 6-wide updates to the first 6 outputs of q and the last 6 of v."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 3 * 12)
    lora = LoRAQKV(base, r=2, width=width)
    x = torch.randn(2, 3, 5, 6)
    assert torch.equal(lora(x), base(x))  # B = 0: exactly the original projection
    torch.nn.init.normal_(lora.lora_b_q.weight)
    torch.nn.init.normal_(lora.lora_b_v.weight)
    q, k, v = lora(x).detach().split(12, dim=-1)
    q0, k0, v0 = base(x).detach().split(12, dim=-1)
    a_q, b_q = lora.lora_a_q.weight.detach(), lora.lora_b_q.weight.detach()
    a_v, b_v = lora.lora_a_v.weight.detach(), lora.lora_b_v.weight.detach()
    span = 6 if width == "input" else 12
    assert b_q.shape == (span, 2) == b_v.shape
    zeros = torch.zeros(2, 3, 5, 12 - span)
    torch.testing.assert_close(q, q0 + torch.cat([x @ a_q.T @ b_q.T, zeros], dim=-1))
    assert torch.equal(k, k0)
    torch.testing.assert_close(v, v0 + torch.cat([zeros, x @ a_v.T @ b_v.T], dim=-1))
    # inference folds the updates into the weight: same numbers as the low-rank training path
    with torch.no_grad():
        torch.testing.assert_close(lora(x), torch.cat([q, k, v], dim=-1))
    lora.requires_grad_(False)  # frozen LoRA (e.g. scoring) also takes the folded path
    torch.testing.assert_close(lora(x), torch.cat([q, k, v], dim=-1))


def test_untrained_lora_encoder_equals_the_original(shared_net):
    x = images()
    with torch.no_grad():
        reference = tiny_sam().eval().encode_image(x)  # same seed: same weights
        ours = shared_net.encode(x)
    torch.testing.assert_close(ours["image_embed"], reference["image_embed"], rtol=0, atol=1e-6)
    assert len(ours["backbone_fpn"]) == 3
    for a, b in zip(ours["backbone_fpn"], reference["backbone_fpn"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---- outputs --------------------------------------------------------------------------------


def test_forward_outputs_shapes_and_class_layout(shared_net):
    x = images()
    with torch.no_grad():
        out = shared_net(x, True, SIZE)
    assert set(out) == {f"{k}{d}" for k in ("low_res_logits", "iou_predictions", "masks") for d in (1, 2)}
    assert out["low_res_logits1"].shape == (2, 2, SIZE // 4, SIZE // 4)
    assert out["iou_predictions1"].shape == (2, 1)
    assert torch.equal(out["low_res_logits1"][:, 0], torch.zeros(2, SIZE // 4, SIZE // 4))
    torch.testing.assert_close(out["masks2"], F.interpolate(out["low_res_logits2"], size=(SIZE, SIZE), mode="bilinear"))
    # both decoders are the same copy at init
    torch.testing.assert_close(out["low_res_logits1"], out["low_res_logits2"])

    with pytest.raises(ValueError, match="image_size"):
        shared_net(x, True, 256)
    with pytest.raises(ValueError, match="prompt_mode"):
        shared_net(x, True, SIZE, 0, "scribble")
    with pytest.raises(ValueError, match="decoder_idx"):
        shared_net.decode({"image_embed": None}, 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        shared_net.encode(torch.zeros(1, 3, 100, 100))
    with pytest.raises(ValueError, match="multiple of 32"):
        shared_net(torch.zeros(1, 3, 100, 100), True, 100)
    with pytest.raises(ValueError, match="B x 3 x S x S"):
        shared_net.encode(torch.zeros(1, 3, 64, 96))


def test_multi_class_channels_are_mask_tokens():
    net = LoRA_Sam(tiny_sam(), r=4, num_classes=3).eval()
    x = images()
    with torch.no_grad():
        features = net.encode(x)
        decoded = net.decode(features, 1)
        sparse, dense = net.sam.sam_prompt_encoder(points=None, boxes=None, masks=None)
        all_tokens = net.sam.sam_mask_decoder.predict_masks(
            features["image_embed"], net.sam.sam_prompt_encoder.get_dense_pe(), sparse.expand(2, -1, -1),
            dense.expand(2, -1, -1, -1), repeat_image=False,
            high_res_features=net.sam.project_high_res(features["backbone_fpn"], net.sam.sam_mask_decoder))[0]
    assert decoded["low_res_logits"].shape == (2, 4, SIZE // 4, SIZE // 4)
    assert decoded["iou_predictions"].shape == (2, 3)
    assert torch.equal(decoded["low_res_logits"][:, 0], torch.zeros_like(decoded["low_res_logits"][:, 0]))
    torch.testing.assert_close(decoded["low_res_logits"][:, 1:], all_tokens[:, :3])  # class c = token c-1


@pytest.mark.parametrize("prompt_idx, mode", [(0, "point"), (1, "box"), (0, "point-box")])
def test_prompted_forward_uses_prompts_from_the_other_decoder(shared_net, prompt_idx, mode):
    net = shared_net
    x = images()
    free, prompted = (1, 2) if prompt_idx == 0 else (2, 1)
    with torch.no_grad():
        out = net(x, False, SIZE, prompt_idx, mode, generator=np.random.default_rng(5))
        features = net.encode(x)
        prompts = prompts_from_logits(out[f"low_res_logits{free}"], SIZE, [np.random.default_rng(5)] * 2)
        center = net.decode(features, prompted, **prompts.as_decoder_prompts(mode, "center"))
        rand = net.decode(features, prompted, **prompts.as_decoder_prompts(mode, "random"))
        unprompted = net.decode(features, prompted)
    torch.testing.assert_close(out[f"low_res_logits{free}"], net.decode(features, free)["low_res_logits"])
    torch.testing.assert_close(out[f"low_res_logits{prompted}"], center["low_res_logits"])
    torch.testing.assert_close(out[f"low_res_logits{prompted}_r"], rand["low_res_logits"])
    assert not torch.allclose(center["low_res_logits"], unprompted["low_res_logits"])  # the prompt is used
    assert f"masks{prompted}_r" in out and f"low_res_logits{free}_r" not in out


@pytest.mark.parametrize("mode", ["point", None, "point-box"])
def test_the_reference_s_random_point_call_is_refused_not_answered_with_the_centre(shared_net, mode):
    """The reference's select_samples takes forward(images, True, 512, 1, 'point')["low_res_logits1"] as decoder 1's
    random-point prediction; here it would be the centre point of decoder 2's mask, so the call is refused, pointing
    at predict_logits and the scoring code (prompt_idx 1 with a box, which the tests above use, still runs)."""
    from sam_lora_image_encoder_prompt import ReferenceCallError

    with pytest.raises(ReferenceCallError, match=r"prompt_idx=1.*random-point prediction.*predict_logits.*compare"):
        shared_net(images(), True, SIZE, 1, mode)


def test_a_module_with_the_reference_s_lora_sam_is_named_with_what_it_lacks():
    from sam_lora_image_encoder_prompt import lora_sam_misfit

    class ReferenceLoRASam(torch.nn.Module):  # the reference's signature: LoRA_Sam(sam, r), forward only
        def __init__(self, sam_model, r, lora_layer=None):
            super().__init__()

    misfit = lora_sam_misfit(ReferenceLoRASam)
    assert "parameter(s) num_classes, lora_width, train_no_mem_embed" in misfit
    assert "method(s) encode, decode, predict_logits, set_grad_checkpointing, lora_disabled" in misfit
    assert lora_sam_misfit(LoRA_Sam) is None


def all_token_logits(net, features, decoder_idx):
    """Raw B x 4 x S/4 x S/4 logits of every mask token of one decoder (no prompt), and the
    official single-mask output of the same decoder (`MaskDecoder.forward`, multimask off)."""
    decoder = net._decoder(decoder_idx)
    sparse, dense = net.sam.sam_prompt_encoder(points=None, boxes=None, masks=None)
    batch = features["image_embed"].shape[0]
    args = dict(image_embeddings=features["image_embed"], image_pe=net.sam.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse.expand(batch, -1, -1), dense_prompt_embeddings=dense.expand(batch, -1, -1, -1),
                repeat_image=False, high_res_features=net.sam.project_high_res(features["backbone_fpn"], decoder))
    return decoder.predict_masks(**args)[0], decoder(multimask_output=False, **args)[0]


def test_class_logits_are_raw_tokens_in_eval_even_where_sam2_falls_back():
    """Class c is token c-1 in eval as in train: SAM2's eval-time single-mask fallback (an
    unstable token 0 replaced by the best of tokens 1-3) is not used by LoRA_Sam."""
    net = LoRA_Sam(tiny_sam(), r=4)
    for decoder in (net.sam.sam_mask_decoder, net.sam.sam_mask_decoder2):
        assert decoder.dynamic_multimask_via_stability  # built with the official post-processing
        decoder.dynamic_multimask_stability_thresh = 1.5  # a stability score (an IoU) never reaches it
    x = images()
    with torch.no_grad():
        evaluated = net.eval()(x, True, SIZE)
        trained = net.train()(x, True, SIZE)
        net.eval()
        features = net.encode(x)
        for d in (1, 2):
            raw, official = all_token_logits(net, features, d)
            assert not torch.allclose(official, raw[:, :1])  # SAM2's own eval path did fall back
            assert torch.equal(evaluated[f"low_res_logits{d}"], trained[f"low_res_logits{d}"])
            torch.testing.assert_close(evaluated[f"low_res_logits{d}"][:, 1:], raw[:, :1], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def built_at_two_sizes():
    """The same weights in LoRA_Sam built at SIZE and at the config's default (1024), eval mode."""
    built_small = LoRA_Sam(tiny_sam(seed=3), r=4).eval()
    torch.manual_seed(3)
    built_default = LoRA_Sam(build_sam2("sam2.1_hiera_t", None, device="cpu"), r=4).eval()
    return built_small, built_default


@pytest.mark.parametrize("prompt_idx, mode", [(-1, "none"), (0, "point"), (1, "box"), (0, "point-box")])
def test_working_size_comes_from_the_call_not_the_build(built_at_two_sizes, prompt_idx, mode):
    """A model built at the config's 1024 px run on 128-px images predicts what a model built with
    image_size=128 predicts (same weights), and its stored sizes stay as built."""
    built_small, built_default = built_at_two_sizes
    assert built_default.sam.image_size == 1024 != SIZE
    x = images()
    with torch.no_grad():
        small = built_small(x, True, SIZE, prompt_idx, mode, generator=np.random.default_rng(2))
        default = built_default(x, True, SIZE, prompt_idx, mode, generator=np.random.default_rng(2))
    assert set(small) == set(default)
    for key in small:
        assert default[key].shape == small[key].shape, key
        assert (default[key] - small[key]).abs().max().item() <= 1e-5, key
    prompt_encoder = built_default.sam.sam_prompt_encoder
    assert (built_default.sam.image_size, prompt_encoder.input_image_size, prompt_encoder.image_embedding_size) == (
        1024, (1024, 1024), (64, 64))


# ---- zero-shot parity with the official SAM2 ----------------------------------------------------

ORACLE_MODEL, ORACLE_SIZE = "sam2.1_hiera_t", 256  # the parity tests' cached case


@pytest.fixture(scope="module")
def oracle(sam2_oracle):
    outputs = torch.load(sam2_oracle.oracle_outputs(ORACLE_MODEL, ORACLE_SIZE, "full"), weights_only=True)
    net = LoRA_Sam(build_sam2(ORACLE_MODEL, str(sam2_oracle.weights_file(ORACLE_MODEL)), device="cpu",
                              image_size=ORACLE_SIZE), r=4).eval()
    cases = {(c["image"], c["name"]): c for c in outputs["cases"]}
    # the images whose model input the oracle stored (the official predictor's own transform)
    names = sorted(name for name, features in outputs["features"].items() if "input" in features)
    assert names, "the oracle stored no model input"
    x = torch.cat([outputs["features"][name]["input"] for name in names])
    return net, cases, names, x


def test_zero_shot_equals_official_single_mask_prediction(oracle, report_figure):
    net, cases, names, x = oracle
    with torch.no_grad():
        out = net(x, True, ORACLE_SIZE)
    expected = torch.stack([torch.sigmoid(cases[(name, "none_mm0")]["low_res_logits"][0]) for name in names])
    for decoder in (1, 2):
        ours = torch.softmax(out[f"low_res_logits{decoder}"], dim=1)[:, 1]
        diff = (ours - expected).abs().max().item()
        report_figure(f"zero-shot LoRA_Sam vs official SAM2 ({ORACLE_MODEL}, {ORACLE_SIZE} px), decoder {decoder}: "
                      f"max |softmax fg - sigmoid(official logit)| = {diff:.2e}")
        assert diff < 1e-4
    official_iou = torch.stack([cases[(name, "none_mm0")]["iou_predictions"] for name in names])
    torch.testing.assert_close(out["iou_predictions1"], official_iou, rtol=1e-3, atol=1e-4)


# hiera_s keeps sam2_oracle's token 0 unscaled: its official single-mask output is unstable and falls back
FALLBACK_MODEL = "sam2.1_hiera_s"


def test_zero_shot_equals_official_token0_where_the_official_fallback_triggers(sam2_oracle, report_figure):
    """Where the official predictor replaces an unstable token 0 by the best multi-mask token, the
    untrained LoRA_Sam still gives sigmoid(official single-mask logits with the fallback off)."""
    import sam2_oracle_fallback

    ref = torch.load(sam2_oracle_fallback.fallback_outputs(sam2_oracle, FALLBACK_MODEL, ORACLE_SIZE), weights_only=True)
    net = LoRA_Sam(build_sam2(FALLBACK_MODEL, str(sam2_oracle.weights_file(FALLBACK_MODEL)), device="cpu",
                              image_size=ORACLE_SIZE), r=4).eval()
    assert net.sam.sam_mask_decoder.dynamic_multimask_via_stability  # the official setting is kept in the model
    with torch.no_grad():
        features = net.encode(ref["input"])
        unprompted = net(ref["input"], True, ORACLE_SIZE)
    for case in ref["cases"]:
        on, off = case["fallback"], case["no_fallback"]
        assert (on["stability"] < ref["meta"]["fallback_thresh"]).all(), "the official fallback did not trigger"
        assert not torch.allclose(on["low_res_logits"], off["low_res_logits"]), "the fallback changed nothing"
        if case["name"] == "none":
            outs = [(d, unprompted[f"low_res_logits{d}"], unprompted[f"iou_predictions{d}"]) for d in (1, 2)]
        else:
            points = (case["point_coords"][None].float(), case["point_labels"][None])
            with torch.no_grad():
                decoded = net.decode(features, 1, points=points)
            outs = [(1, decoded["low_res_logits"], decoded["iou_predictions"])]
        for decoder, logits, iou in outs:
            ours = torch.softmax(logits, dim=1)[0, 1]
            diff = (ours - torch.sigmoid(off["low_res_logits"][0])).abs().max().item()
            report_figure(f"zero-shot LoRA_Sam vs official token 0 ({FALLBACK_MODEL}, {ORACLE_SIZE} px, prompt "
                          f"{case['name']}, decoder {decoder}; official fallback triggered): "
                          f"max |softmax fg - sigmoid(logit)| = {diff:.2e}")
            assert diff < 1e-4
            assert (ours - torch.sigmoid(on["low_res_logits"][0])).abs().max().item() > 1e-2
            torch.testing.assert_close(iou[0], off["iou_predictions"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("case", ["point_mm0", "box_mm0", "box_point_mm0", "mask_feedback_mm0"])
def test_prompted_decode_equals_official_prompts(oracle, case):
    """Point / box / mask prompts follow the official predictor's conventions (square image: the
    official pixel coordinates are already input coordinates; a mask prompt is the official call's
    ``mask_input``: an earlier call's clamped low-res logits, fed back as they are)."""
    net, cases, names, x = oracle
    record = cases[("square", case)]
    prompts = {}
    if "point_coords" in record:
        prompts["points"] = (record["point_coords"][None].float(), record["point_labels"][None])
    if "box" in record:
        prompts["boxes"] = record["box"].reshape(1, 4).float()
    if "mask_input" in record:
        prompts["mask_input"] = record["mask_input"][None].float()  # 1 x 1 x S/4 x S/4
    with torch.no_grad():
        out = net.decode(net.encode(x[names.index("square")][None]), 1, **prompts)
    ours = torch.softmax(out["low_res_logits"], dim=1)[0, 1]
    assert (ours - torch.sigmoid(record["low_res_logits"][0])).abs().max().item() < 1e-4


def test_mask_input_none_keeps_the_unmasked_decoder_and_a_mask_changes_it(shared_net):
    """mask_input None: the prompt encoder's no-mask embedding, bit for bit the decoder's output without a mask
    prompt (computed here from SAM2's parts); a mask prompt changes the output."""
    sam, x = shared_net.sam, images()
    points = (torch.tensor([[[40.0, 70.0], [90.0, 20.0]]]).expand(2, -1, -1), torch.tensor([[1, 0]]).expand(2, -1))
    grid = (SIZE // 16, SIZE // 16)
    with torch.no_grad():
        features = shared_net.encode(x)
        sparse, dense = sam.sam_prompt_encoder(points=points, boxes=None, masks=None, image_embedding_size=grid,
                                               input_image_size=(SIZE, SIZE))
        expected, _ = sam.sam_mask_decoder.predict_masks(
            image_embeddings=features["image_embed"], image_pe=sam.sam_prompt_encoder.get_dense_pe(grid),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, repeat_image=False,
            high_res_features=sam.project_high_res(features["backbone_fpn"], sam.sam_mask_decoder))[:2]
        plain = shared_net.predict_logits(None, 1, points=points, features=features, mask_input=None)
        mask = torch.full((2, 1, SIZE // 4, SIZE // 4), -8.0)
        mask[:, :, 4:20, 6:26] = 8.0
        masked = shared_net.predict_logits(None, 1, points=points, features=features, mask_input=mask)
        masked_alone = shared_net.predict_logits(None, 1, features=features, mask_input=mask)
    assert torch.equal(plain[:, 1], expected[:, 0])
    assert (masked - plain).abs().max().item() > 0.1
    assert masked_alone.shape == plain.shape


def test_mask_input_of_the_wrong_shape_is_a_typed_error(shared_net):
    from sam_lora_image_encoder_prompt import MaskInputError

    with torch.no_grad():
        features = shared_net.encode(images())
    low = SIZE // 4
    for bad in (torch.zeros(1, 1, low, low), torch.zeros(2, 2, low, low), torch.zeros(2, 1, SIZE, SIZE),
                torch.zeros(2, low, low), np.zeros((2, 1, low, low), np.float32)):
        with pytest.raises(MaskInputError, match=r"B x 1 x S/4 x S/4.*\(2, 1, 32, 32\)"):
            shared_net.decode(features, 2, mask_input=bad)


# ---- training step -----------------------------------------------------------------------------


def test_training_step_changes_only_lora_prompt_encoder_decoders_and_no_mem_embed():
    net = LoRA_Sam(tiny_sam(), r=4).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    x = images()
    target = torch.zeros(2, SIZE // 4, SIZE // 4, dtype=torch.long)
    target[:, 8:24, 8:24] = 1
    out = net(x, True, SIZE, 0, "point-box", generator=np.random.default_rng(0))
    loss = sum(F.cross_entropy(out[k], target) for k in ("low_res_logits1", "low_res_logits2", "low_res_logits2_r"))
    loss.backward()
    optimizer.step()

    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = ("sam.sam_prompt_encoder.", "sam.sam_mask_decoder.", "sam.sam_mask_decoder2.")
    assert all(".lora_" in k or k.startswith(allowed) for k in changed - {"sam.no_mem_embed"}), sorted(changed)[:5]
    for group in allowed:
        assert any(k.startswith(group) for k in changed), group
    assert "sam.no_mem_embed" in changed  # trained, as the reference's LoRA_Sam leaves it trainable
    assert any(".lora_b_q." in k for k in changed) and any(".lora_b_v." in k for k in changed)
    frozen = [k for k in before if k.startswith("sam.image_encoder") and ".lora_" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    b = net.sam.image_encoder.trunk.blocks[0].attn.qkv.lora_b_q.weight
    assert b.abs().sum() > 0


# ---- checkpoints -------------------------------------------------------------------------------


def perturbed_net(seed):
    net = LoRA_Sam(tiny_sam(), r=4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return net


def test_lora_file_roundtrip(tmp_path):
    trained = perturbed_net(1)
    path = tmp_path / "lora.pth"
    trained.save_lora_parameters(path)
    saved = torch.load(path, weights_only=True)
    assert "sam.no_mem_embed" in saved  # trained by default, so it is in the file
    assert all(".lora_" in k or k.startswith(("sam.sam_prompt_encoder.", "sam.sam_mask_decoder")) for k in saved
               if k != "sam.no_mem_embed")
    assert not any(".attn.qkv.base." in k for k in saved)  # small file: no frozen encoder weights
    fresh = LoRA_Sam(tiny_sam(), r=4)
    fresh.load_lora_parameters(path)
    theirs, ours = trained.state_dict(), fresh.state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write left nothing behind


def test_lora_file_errors(tmp_path, shared_net):
    path = tmp_path / "lora.pth"
    LoRA_Sam(tiny_sam(), r=2).save_lora_parameters(path)
    # every failing load below is refused before anything is copied into shared_net
    with pytest.raises(ValueError, match=r"lora_a_q\.weight.*rank: file 2, model 4"):
        shared_net.load_lora_parameters(path)
    full = tmp_path / "full.pth"
    torch.save(shared_net.state_dict(), full)
    with pytest.raises(ValueError, match="load_state_dict"):
        shared_net.load_lora_parameters(full)
    with pytest.raises(CheckpointFileError, match="missing.pth: no such file"):
        shared_net.load_lora_parameters(tmp_path / "missing.pth")
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": object()}, pickled)
    with pytest.raises(CheckpointFileError, match="holds pickled Python objects .*refused for safety") as refused:
        shared_net.load_lora_parameters(pickled)
    assert "weights_only=False" not in str(refused.value), "never advise loading untrusted code"


def test_full_state_dict_roundtrip_readme_snippet(tmp_path):
    trained = perturbed_net(2).eval()
    path = tmp_path / "best_model_dice0.8732.pth"
    torch.save(trained.state_dict(), path)
    # the README's notebook code path
    net = LoRA_Sam(tiny_sam(seed=9), r=4)
    net.load_state_dict(torch.load(path, weights_only=True))
    net.eval()
    x = images(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(net(x, True, SIZE)["low_res_logits2"], trained(x, True, SIZE)["low_res_logits2"])
