"""The reference code's checkpoints load into ours and reproduce its LoRA exactly, at Hiera stage changes too.

The reference (Aileen0402/MD-SAM-AL, sam_lora_image_encoder_prompt.py) wraps each Hiera block's qkv projection
(d_in -> 3 d_out) with rank-r updates as wide as the block's INPUT: its forward is qkv(x), then B_q A_q x added
to the first d_in outputs and B_v A_v x to the last d_in outputs. `reference_qkv` below transcribes that; a
"reference model" is our SAM2 whose blocks run the transcription, with the reference checkpoint's tensors.
Its files: the full state_dict of its LoRA_Sam (`best_model_dice*.pth`) and its LoRA-only file (w_a_<i>, w_b_<i>
for the q, then v, update of each block in order, plus SAM2 entries named *prompt_encoder*, *mask_decoder*,
*no_mem*, *memory*, *obj*).
"""
import io
import logging

import pytest
import torch

from sam2.build_sam import build_sam2
from sam_lora_image_encoder_prompt import LoRA_Sam, LoRACheckpointError, build_model

SIZE = 64
RANK = 4
STAGE_CHANGES = (1, 3, 10)  # hiera_t blocks whose qkv output is 3 x twice their input
BLOCK = "sam.image_encoder.trunk.blocks.{}.attn.qkv"
# what upstream's video SAM2 adds (our image-only SAM2 has none of it), as it appears in the reference's files
VIDEO_ENTRIES = ("memory_attention.layers.0.linear1.weight", "memory_encoder.out_proj.weight", "no_mem_pos_enc",
                 "obj_ptr_proj.layers.0.weight", "no_obj_ptr")


def reference_qkv(x, weight, bias, a_q, b_q, a_v, b_v):
    """The reference's qkv forward: W x + b; the first d_in outputs += B_q A_q x; the last d_in += B_v A_v x."""
    out = x @ weight.T + bias
    dim = weight.shape[1]
    out[..., :dim] += x @ a_q.T @ b_q.T
    out[..., -dim:] += x @ a_v.T @ b_v.T
    return out


class ReferenceQKV(torch.nn.Module):
    """A block's attn.qkv running `reference_qkv` with fixed tensors."""

    def __init__(self, tensors):
        super().__init__()
        self.tensors = tensors

    def forward(self, x):
        return reference_qkv(x, *self.tensors)


def tiny_sam(seed):
    torch.manual_seed(seed)
    return build_sam2("sam2.1_hiera_t", None, device="cpu", image_size=SIZE)


@pytest.fixture(scope="module")
def reference():
    """A trained-looking reference model: seed-5 SAM2 with changed decoders and no_mem_embed, non-zero LoRA
    updates in every block. -> dict(sam=its SAM2 state_dict, lora=[(W, b, A_q, B_q, A_v, B_v) per block], model)."""
    sam = tiny_sam(5)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if name.startswith(("sam_mask_decoder", "sam_prompt_encoder", "no_mem_embed")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    lora = []
    for block in sam.image_encoder.trunk.blocks:
        dim = block.attn.qkv.in_features
        a_q, a_v = (torch.randn(RANK, dim, generator=gen) * 0.1 for _ in range(2))
        b_q, b_v = (torch.randn(dim, RANK, generator=gen) * 0.1 for _ in range(2))
        lora.append((block.attn.qkv.weight.detach().clone(), block.attn.qkv.bias.detach().clone(), a_q, b_q, a_v, b_v))
    state = {k: v.clone() for k, v in sam.state_dict().items()}
    for block, tensors in zip(sam.image_encoder.trunk.blocks, lora):
        block.attn.qkv = ReferenceQKV(tensors)
    # our decoders and prompt encoder on the reference's encoder: lora_layer=[] leaves its qkv modules alone
    model = LoRA_Sam(sam, r=RANK, lora_layer=[]).eval()
    return dict(sam=state, lora=lora, model=model)


def full_state_dict(reference):
    """The reference trainer's best_model_dice*.pth: LoRA_Sam.state_dict() with its key names, video groups too."""
    state = {"sam." + k: v for k, v in reference["sam"].items()}
    for i, (weight, bias, a_q, b_q, a_v, b_v) in enumerate(reference["lora"]):
        block = BLOCK.format(i)
        del state[block + ".weight"], state[block + ".bias"]
        state.update({f"{block}.qkv.weight": weight, f"{block}.qkv.bias": bias,
                      f"{block}.linear_a_q.weight": a_q, f"{block}.linear_b_q.weight": b_q,
                      f"{block}.linear_a_v.weight": a_v, f"{block}.linear_b_v.weight": b_v})
    state.update({"sam." + k: torch.ones(3) for k in VIDEO_ENTRIES})
    return state


def lora_file(reference):
    """The reference's save_lora_parameters: w_a/w_b for update 2j (q) and 2j+1 (v) of block j, plus SAM2
    entries with the five words in their names (no "sam." prefix)."""
    tensors = {}
    for j, (_, _, a_q, b_q, a_v, b_v) in enumerate(reference["lora"]):
        tensors.update({f"w_a_{2 * j:03d}": a_q, f"w_b_{2 * j:03d}": b_q,
                        f"w_a_{2 * j + 1:03d}": a_v, f"w_b_{2 * j + 1:03d}": b_v})
    words = ("prompt_encoder", "mask_decoder", "no_mem", "memory", "obj")
    tensors.update({k: v for k, v in reference["sam"].items() if any(w in k for w in words)})
    tensors.update({k: torch.ones(3) for k in VIDEO_ENTRIES})
    return tensors


def loaded(reference, path, width, tmp_path):
    """Our model with the reference's weights, read the way its users have them."""
    if path == "full state_dict":  # the README notebook line; the frozen SAM2 weights come from the file
        net = LoRA_Sam(tiny_sam(9), r=RANK, lora_width=width)
        saved = io.BytesIO()  # a file's bytes, kept in memory (~100 MB)
        torch.save(full_state_dict(reference), saved)
        saved.seek(0)
        net.load_state_dict(torch.load(saved, weights_only=True))
    else:  # --lora_ckpt on top of the same frozen SAM2 (the reference's file holds no image encoder)
        net = LoRA_Sam(tiny_sam(5), r=RANK, lora_width=width)
        torch.save(lora_file(reference), tmp_path / "lora.pth")
        net.load_lora_parameters(tmp_path / "lora.pth")
    return net


@pytest.mark.parametrize("width", ["input", "output"])
@pytest.mark.parametrize("path", ["full state_dict", "LoRA-only file"])
def test_reference_checkpoint_reproduces_the_reference_forward(reference, path, width, tmp_path):
    net = loaded(reference, path, width, tmp_path)
    blocks = net.sam.image_encoder.trunk.blocks
    x_gen = torch.Generator().manual_seed(3)
    for i in (0,) + STAGE_CHANGES:
        qkv = blocks[i].attn.qkv
        assert qkv.base.out_features == 3 * qkv.base.in_features * (2 if i in STAGE_CHANGES else 1)
        x = torch.randn(2, 4, 4, qkv.base.in_features, generator=x_gen)
        expected = reference_qkv(x, *reference["lora"][i])
        qkv.requires_grad_(True)
        torch.testing.assert_close(qkv(x), expected, rtol=1e-5, atol=1e-5)  # training: low-rank path
        with torch.no_grad():
            torch.testing.assert_close(qkv(x), expected, rtol=1e-5, atol=1e-5)  # inference: merged weight
    images = torch.randn(2, 3, SIZE, SIZE, generator=x_gen)
    net.eval()
    with torch.no_grad():
        ours, theirs = net(images, True, SIZE), reference["model"](images, True, SIZE)
    for key in ("low_res_logits1", "low_res_logits2"):  # every block, no_mem_embed, both decoders
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-4)
    assert (ours["low_res_logits1"] - ours["low_res_logits2"]).abs().max() > 1e-3  # the decoders differ


def test_video_groups_are_skipped_with_one_log_line(reference, tmp_path, caplog):
    for path in ("full state_dict", "LoRA-only file"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sam_lora_image_encoder_prompt"):
            loaded(reference, path, "input", tmp_path)
        lines = [r.getMessage() for r in caplog.records if "video-only" in r.getMessage()]
        assert len(lines) == 1, lines
        assert f"skipping {len(VIDEO_ENTRIES)} video-only tensors" in lines[0]
        assert all(name.split(".")[0] in lines[0] for name in VIDEO_ENTRIES)


def test_reference_full_state_dict_that_does_not_fit_is_one_error_listing_every_key(reference):
    net = LoRA_Sam(tiny_sam(9), r=RANK)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = full_state_dict(reference)
    state["sam.sam_mask_decoder_2.iou_token.weight"] = state.pop("sam.sam_mask_decoder2.iou_token.weight")
    state["sam.extra_head.weight"] = torch.zeros(2)
    with pytest.raises(LoRACheckpointError) as error:
        net.load_state_dict(state)
    message = str(error.value)
    assert "sam.sam_mask_decoder_2.iou_token.weight" in message and "sam.extra_head.weight" in message
    assert "missing keys (1): sam.sam_mask_decoder2.iou_token.weight" in message
    assert "sam.sam_mask_decoder2.*" in message  # the decoder-2 name we assume is said
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing was copied
    # strict=False: the keys that fit nothing are reported as PyTorch does, the rest is loaded
    result = net.load_state_dict(state, strict=False)
    assert set(result.unexpected_keys) == {"sam.sam_mask_decoder_2.iou_token.weight", "sam.extra_head.weight"}
    assert result.missing_keys == ["sam.sam_mask_decoder2.iou_token.weight"]


@pytest.mark.parametrize("path", ["full state_dict", "LoRA-only file"])
def test_shapes_that_cannot_fit_name_the_key_and_both_shapes(reference, path, tmp_path):
    if path == "full state_dict":
        state, key = full_state_dict(reference), BLOCK.format(3) + ".linear_b_v.weight"
        net = LoRA_Sam(tiny_sam(9), r=RANK, lora_width="output")
    else:
        state, key = lora_file(reference), "w_b_007"  # block 3's v update
        net = LoRA_Sam(tiny_sam(5), r=RANK, lora_width="output")
    state[key] = torch.zeros(192, 2)  # rank 2: block 3's input is 192 wide
    torch.save(state, tmp_path / "ckpt.pth")
    with pytest.raises(LoRACheckpointError, match=rf"{key}: file \(192, 2\), this model needs \(192, 4\)"):
        if path == "full state_dict":
            net.load_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=True), strict=False)
        else:
            net.load_lora_parameters(tmp_path / "ckpt.pth")


def test_reference_lora_file_of_another_model_lists_the_keys(reference, tmp_path):
    tensors = lora_file(reference)
    tensors["w_a_024"] = tensors["w_b_024"] = torch.zeros(4, 768)  # a 13th block: hiera_t has 12
    del tensors["sam_prompt_encoder.point_embeddings.0.weight"]
    torch.save(tensors, tmp_path / "lora.pth")
    net = LoRA_Sam(tiny_sam(5), r=RANK)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(LoRACheckpointError) as error:
        net.load_lora_parameters(tmp_path / "lora.pth")
    message = str(error.value)
    assert str(tmp_path / "lora.pth") in message
    assert "w_a_024, w_b_024" in message and "sam_prompt_encoder.point_embeddings.0.weight" in message
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_our_checkpoint_of_the_other_width_is_refused_naming_the_width(tmp_path):
    theirs = LoRA_Sam(tiny_sam(5), r=RANK, lora_width="output")
    with pytest.raises(LoRACheckpointError, match=r"lora_b_q\.weight.*lora_width='output'"):
        LoRA_Sam(tiny_sam(5), r=RANK).load_state_dict(theirs.state_dict())
    theirs.save_lora_parameters(tmp_path / "lora.pth")
    with pytest.raises(LoRACheckpointError, match=r"LoRA width.*build it with lora_width='output'"):
        LoRA_Sam(tiny_sam(5), r=RANK).load_lora_parameters(tmp_path / "lora.pth")
    # same width: strict load as before
    LoRA_Sam(tiny_sam(9), r=RANK, lora_width="output").load_state_dict(theirs.state_dict())


def test_build_model_passes_the_lora_width():
    for width, rows in (("input", 96), ("output", 192)):
        net = build_model("sam2.1_hiera_t", None, SIZE, lora_width=width)
        assert net.lora_width == width
        assert net.sam.image_encoder.trunk.blocks[1].attn.qkv.lora_b_v.weight.shape == (rows, RANK)
    with pytest.raises(ValueError, match="lora_width"):
        build_model("sam2.1_hiera_t", None, SIZE, lora_width="full")
