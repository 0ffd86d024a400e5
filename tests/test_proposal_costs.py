"""The annotation cost of a model's proposals (proposal_costs.py): what reaches the model (click coordinates, signs,
decoder, mask prompt) with a hand-made model, and the rows of a real LoRA_Sam."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from annotation_cost import NOT_REACHED, Click
from datasets_skin import resize_mask
from distributed import Ranks
from proposal_costs import COST_COLUMNS, ClickPredictor, interactive_decoder, proposal_cost, proposal_costs
from sam2.build_sam import build_sam2
from sam_lora_image_encoder_prompt import LoRA_Sam

S = 64


class LesionClickModel(torch.nn.Module):
    """A stand-in for LoRA_Sam at S = 64 that knows the lesion: S/4 cells rows 2-4, cols 9-14 (S-grid rows 8-19, cols
    36-59). Its proposal is empty (logit -50); a positive click inside the lesion (input pixels x = column,
    y = row) makes its prediction the lesion. It records every call."""

    num_classes = 1

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.calls = []

    def encode(self, images):
        assert images.shape == (1, 3, S, S)
        return {"image_embed": torch.zeros(1, 256, S // 16, S // 16)}

    def predict_logits(self, images, decoder_idx=1, points=None, boxes=None, features=None, mask_input=None):
        self.calls.append(dict(decoder=decoder_idx, points=points, mask_input=mask_input))
        logits = torch.full((1, 2, S // 4, S // 4), -50.0)
        logits[:, 0] = 0.0
        if points is not None:
            for (x, y), label in zip(points[0][0].tolist(), points[1][0].tolist()):
                if label == 1 and 8 <= y < 20 and 36 <= x < 60:
                    logits[0, 1, 2:5, 9:15] = 50.0
        return logits


def photo_truth():
    """A 128 x 256 photo's lesion (rows 16-39, cols 144-239) that the label resize turns into the stand-in's."""
    truth = np.zeros((128, 256), np.uint8)
    truth[16:40, 144:240] = 1
    return truth


def test_clicks_reach_the_model_as_input_pixels_with_all_clicks_and_the_runs_decoder():
    truth = photo_truth()
    expected_label = np.zeros((S, S), bool)
    expected_label[8:20, 36:60] = True
    assert np.array_equal(resize_mask(truth, S) > 0, expected_label)  # the simulation's truth, by hand
    model = LesionClickModel()
    row = proposal_cost(model, torch.zeros(3, S, S), truth, "clicks", decoder=2)
    # the empty proposal: Dice 0, a quarter of the rows x three eighths of the columns to change
    assert row == dict(dice=0.0, changed_fraction=(24 * 96) / (128 * 256), clicks_85=1, clicks_90=1)
    proposal, click = model.calls
    assert proposal["decoder"] == 1 and proposal["points"] is None  # the round's proposal: decoder 1, no prompt
    # the lesion's deepest pixel at S: row 13, column 41 (6 pixels from its top and left edges) -> x 41, y 13
    coords, labels = click["points"]
    assert coords.tolist() == [[[41.0, 13.0]]] and labels.tolist() == [[1]] and click["decoder"] == 2
    assert click["mask_input"] is None  # off by default


def test_every_click_so_far_reaches_the_model_in_order_with_its_sign():
    model = LesionClickModel()
    predict = ClickPredictor(model, model.encode(torch.zeros(1, 3, S, S)), 2, mask_input=False)
    predicted = predict((Click(13, 41, True), Click(30, 5, False)))
    coords, labels = model.calls[-1]["points"]
    assert coords.tolist() == [[[41.0, 13.0], [5.0, 30.0]]] and labels.tolist() == [[1, 0]]  # SAM2: 1 add, 0 remove
    # the lesion's logits upsampled bilinearly to S: its S-grid block, less one pixel at each corner
    assert predicted.shape == (S, S) and predicted[8:20, 36:60].sum() == predicted.sum() == 12 * 24 - 4
    assert not predict(()).any()  # no click: the proposal again


def test_the_previous_prediction_is_the_mask_prompt_when_asked():
    model = LesionClickModel()
    proposal_cost(model, torch.zeros(3, S, S), photo_truth(), "clicks", decoder=1, mask_input=True)
    mask_prompt = model.calls[1]["mask_input"]
    # the proposal's foreground logits (-50), clamped to -32 as SAM2's predictor returns them
    assert mask_prompt.shape == (1, 1, S // 4, S // 4) and torch.equal(mask_prompt, torch.full_like(mask_prompt, -32))


def test_cost_modes_compute_what_they_name():
    model = LesionClickModel()
    assert proposal_cost(model, torch.zeros(3, S, S), photo_truth(), "none") == dict.fromkeys(COST_COLUMNS)
    assert model.calls == []  # nothing computed
    row = proposal_cost(model, torch.zeros(3, S, S), photo_truth(), "pixels")
    assert row["dice"] == 0.0 and row["clicks_85"] is None and row["clicks_90"] is None
    with pytest.raises(ValueError, match="none, pixels, clicks|'none', 'pixels', 'clicks'"):
        proposal_cost(model, torch.zeros(3, S, S), photo_truth(), "seconds")
    with pytest.raises(ValueError, match="class indices 0..1, got a pixel of 255"):
        proposal_cost(model, torch.zeros(3, S, S), photo_truth() * 255, "pixels")
    with pytest.raises(ValueError, match="2 images but 1 truths"):
        proposal_costs(model, torch.zeros(2, 3, S, S), [photo_truth()])


def test_a_lesion_the_model_never_finds_is_not_reached():
    truth = np.zeros((128, 256), np.uint8)
    truth[90:120, 10:60] = 1  # where the stand-in never predicts anything
    row = proposal_cost(LesionClickModel(), torch.zeros(3, S, S), truth, "clicks", decoder=2)
    assert row["clicks_85"] == NOT_REACHED and row["clicks_90"] == NOT_REACHED


def test_interactive_decoder_follows_the_prompt_mode():
    assert interactive_decoder("none") == 1
    assert [interactive_decoder(m) for m in ("point", "box", "point-box")] == [2, 2, 2]
    with pytest.raises(ValueError, match="prompt mode"):
        interactive_decoder("0")


def test_a_real_model_gives_its_proposals_pixel_cost_at_the_photos_size():
    torch.manual_seed(0)
    model = LoRA_Sam(build_sam2("sam2.1_hiera_t", None, device="cpu", image_size=S), r=4).eval()
    images = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(3))
    truths = [photo_truth(), np.zeros((100, 150), np.uint8)]
    truths[1][30:70, 40:100] = 1
    with torch.no_grad():
        rows = proposal_costs(model, images, truths, "clicks", decoder=2)
        rows_fed_back = proposal_costs(model, images, truths, "clicks", decoder=2, mask_input=True)
        logits = model.predict_logits(images, 1)
    for row, fed_back, one, truth in zip(rows, rows_fed_back, logits, truths):
        # the proposal upsampled bilinearly to the photo's size, foreground where its logit beats background's 0
        predicted = (F.interpolate(one[None, 1:], size=truth.shape, mode="bilinear")[0, 0] > 0).numpy()
        wanted = truth > 0
        both, total = np.count_nonzero(predicted & wanted), np.count_nonzero(predicted) + np.count_nonzero(wanted)
        assert row["dice"] == pytest.approx(2 * both / total)
        assert row["changed_fraction"] == pytest.approx(np.count_nonzero(predicted != wanted) / truth.size)
        assert fed_back["dice"] == row["dice"]  # the proposal does not depend on the mask prompt
        for value in (row["clicks_85"], row["clicks_90"], fed_back["clicks_90"]):
            assert value == NOT_REACHED or (isinstance(value, int) and 0 <= value <= 20)


@pytest.mark.parametrize("promptmode, mode, mask_input, decoder", [("none", "pixels", False, 1),
                                                                   ("point-box", "clicks", True, 2)])
def test_the_trainers_cost_step_hands_over_the_runs_choices(synthetic_copy, monkeypatch, promptmode, mode,
                                                            mask_input, decoder):
    """epoch_steps.annotation_costs: the chosen images as the dataset gives them, their masks at the photo's size
    from where the oracle accepted them, the run's --annotation_cost, interactive decoder and --click_mask_input;
    eval mode without gradients, the model's training mode restored; --annotation_cost none computes nothing."""
    import types

    import datasets_skin
    import epoch_steps
    import proposal_costs

    train_set = datasets_skin.SemiSupervisedSkinDataset(*datasets_skin.find_split(synthetic_copy, "Training"), S)
    accepted = synthetic_copy / "accepted.png"  # a person's mask, accepted from elsewhere than the mask folder
    Image.fromarray(np.full(train_set.samples[2].orig_size, 255, np.uint8)).save(accepted)
    train_set.read_mask_from(2, accepted)
    model = LesionClickModel().train()
    seen = {}

    def recorded(model, images, truths, mode, decoder, mask_input):
        seen.update(images=images, truths=truths, mode=mode, decoder=decoder, mask_input=mask_input,
                    training=model.training, grad=torch.is_grad_enabled())
        return [dict.fromkeys(COST_COLUMNS, 0.5) for _ in truths]

    monkeypatch.setattr(proposal_costs, "proposal_costs", recorded)  # what proposal_costs.run_costs calls
    args = types.SimpleNamespace(annotation_cost=mode, promptmode=promptmode, click_mask_input=mask_input,
                                 precision="float32")
    run = types.SimpleNamespace(args=args, train_set=train_set, model=model, device=torch.device("cpu"),
                                ranks=Ranks())
    rows = epoch_steps.annotation_costs(run, 1, [2, 0])
    assert rows == [dict.fromkeys(COST_COLUMNS, 0.5)] * 2 and model.training
    assert (seen["mode"], seen["decoder"], seen["mask_input"], seen["training"], seen["grad"]) == \
        (mode, decoder, mask_input, False, False)
    assert torch.equal(seen["images"], torch.stack([train_set[2]["image"], train_set[0]["image"]]))
    assert seen["truths"][0].shape == train_set.samples[2].orig_size and seen["truths"][0].all()
    np.testing.assert_array_equal(seen["truths"][1], datasets_skin.decode_mask(train_set.samples[0].mask_path, None))
    seen.clear()
    run.args = types.SimpleNamespace(**{**vars(args), "annotation_cost": "none"})
    assert epoch_steps.annotation_costs(run, 1, [2, 0]) == [dict.fromkeys(COST_COLUMNS)] * 2 and not seen
