"""The named metric protocols on tiny hand-made cases whose values are worked out by hand (in the
comments), and the accumulator against one call on the whole set."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from soundstage.metrics import PROTOCOLS, Accumulator, MetricInputError, evaluate

# Frames are 1×4 pixels. Frame A: gt [1,1,0,0], p [.9,.2,.6,.1]. Its F curve (β² 0.3) by threshold t:
#   t ≤ .1: all 4 predicted, P=.5, R=1 -> 1.3·.5/(.15+1) = .565217
#   .1 < t ≤ .2: P=2/3, R=1 -> .722222      .2 < t ≤ .6: P=.5, R=.5 -> .5
#   .6 < t ≤ .9: P=1, R=.5 -> .65/.8 = .8125 (its max)      t > .9: 0
# IoU at p > .5: mask [1,0,1,0] -> inter 1 / union 3.
# Frame B: gt [1,0,0,0], p [.3,.05,.05,.05]: t ≤ .05 -> .325/1.075; .05 < t ≤ .3 -> 1 (max); IoU 0.
# Frame E (empty gt): p [.7,.1,.1,.1]: IoU = true negatives 3 / 4 pixels; no F curve.
A_GT, A_P = [1, 1, 0, 0], [0.9, 0.2, 0.6, 0.1]
B_GT, B_P = [1, 0, 0, 0], [0.3, 0.05, 0.05, 0.05]
E_GT, E_P = [0, 0, 0, 0], [0.7, 0.1, 0.1, 0.1]
F_A, F_B, F_AB = 0.8125, 1.0, (0.65 / 0.9 + 1.0) / 2  # F_AB: max of the mean curve, at .1 < t ≤ .2
IOU_A, IOU_B, IOU_E = 1 / 3, 0.0, 0.75


def frames(*pairs):
    gt = np.array([[g] for g, _ in pairs], dtype=np.float32)
    prob = np.array([[p] for _, p in pairs], dtype=np.float32)
    return prob, gt


def probs(name, pairs, **options):
    prob, gt = frames(*pairs)
    return evaluate(name, prob, gt, pred_kind="probabilities", **options)


def test_single_frame_curve_max_and_iou():
    r = probs("avsbench-binary", [(A_GT, A_P)])
    assert r["fscore"] == pytest.approx(F_A, abs=1e-6)
    assert r["miou"] == pytest.approx(IOU_A, abs=1e-6)


def test_logits_are_squashed_by_sigmoid():
    prob, gt = frames((A_GT, A_P), (B_GT, B_P))
    logits = np.log(prob / (1 - prob))
    assert evaluate("avsbench-binary", logits, gt)["fscore"] == pytest.approx(F_AB, abs=1e-5)


def test_empty_ground_truth_scores_true_negatives_and_is_skipped_by_f():
    r = probs("avsbench-binary", [(E_GT, E_P)])
    assert r["miou"] == pytest.approx(IOU_E, abs=1e-6)
    assert r["fscore"] == 0.0 and r["frames_with_foreground"] == 0
    r = probs("avsbench-binary", [(A_GT, A_P), (E_GT, E_P)])
    assert r["fscore"] == pytest.approx(F_A, abs=1e-6)  # E contributes nothing to the F curve
    assert r["miou"] == pytest.approx((IOU_A + IOU_E) / 2, abs=1e-6)


def test_f_depends_on_batch_size():
    whole = probs("avsbench-binary", [(A_GT, A_P), (B_GT, B_P)])
    per_frame = probs("avsbench-binary", [(A_GT, A_P), (B_GT, B_P)], batch_size=1, frames_per_video=1)
    assert whole["fscore"] == pytest.approx(F_AB, abs=1e-6)  # 0.861111
    assert per_frame["fscore"] == pytest.approx((F_A + F_B) / 2, abs=1e-6)  # 0.90625
    assert whole["miou"] == pytest.approx(per_frame["miou"], abs=1e-9)  # equal batches: IoU agrees


def test_all_empty_batch_counts_as_zero_f():
    pairs = [(A_GT, A_P), (E_GT, E_P), (B_GT, B_P)]
    batched = probs("avsbench-binary", pairs, batch_size=1, frames_per_video=1)
    assert batched["batches"] == 3
    assert batched["fscore"] == pytest.approx((F_A + 0.0 + F_B) / 3, abs=1e-6)
    assert probs("avsbench-binary", pairs)["fscore"] == pytest.approx(F_AB, abs=1e-6)


def test_partial_last_batch_is_a_batch_of_its_own():
    pairs = [(A_GT, A_P), (B_GT, B_P), (A_GT, A_P)]  # batches of 2 videos: [A, B], [A]
    r = probs("avsbench-binary", pairs, batch_size=2, frames_per_video=1)
    assert r["batches"] == 2
    assert r["fscore"] == pytest.approx((F_AB + F_A) / 2, abs=1e-6)
    assert r["miou"] == pytest.approx(((IOU_A + IOU_B) / 2 + IOU_A) / 2, abs=1e-6)  # 0.25, not 2/9


def test_video_ids_define_batches():
    pairs = [(A_GT, A_P), (A_GT, A_P), (B_GT, B_P)]  # video "a" has 2 frames, "b" one
    r = probs("bias-in-avs", pairs, videos=["a", "a", "b"], beta2=0.3, threshold=0.5)
    assert r["batches"] == 2
    assert r["fscore"] == pytest.approx((F_A + F_B) / 2, abs=1e-6)


def test_variant_thresholds_and_beta():
    # bias_in_AVS: IoU at p > .4 -> A's mask [1,0,1,0] still (p .6 > .4, .2 < .4); β² .1 at .6 < t ≤ .9:
    # P=1, R=.5 -> 1.1·.5/(.1+.5) = .916667
    r = probs("bias-in-avs", [(A_GT, A_P)], frames_per_video=1)
    assert r["fscore"] == pytest.approx(0.55 / 0.6, abs=1e-6)
    # threshold .4 vs .5 on gt [1,0,0,0], p [.45,0,0,0]: IoU 1 at .4, 0 at .5
    gt, p = [1, 0, 0, 0], [0.45, 0.0, 0.0, 0.0]
    assert probs("segpref", [(gt, p)])["miou"] == pytest.approx(1.0, abs=1e-6)
    assert probs("avsbench-binary", [(gt, p)])["miou"] == pytest.approx(0.0, abs=1e-6)


def test_stepping_stones_two_channel_rules():
    # l0 [0,1,0,0], l1 [1,1,-1,0]: argmax (ties -> background) [1,0,0,0] -> IoU 1/2 against [1,1,0,0];
    # F on sigmoid(2·l1 − l0) = sigmoid([2,1,-2,0]) = [.881,.731,.119,.5]: at .5 < t ≤ .731, P = R = 1.
    logits = np.array([[[[0, 1, 0, 0]], [[1, 1, -1, 0]]]], dtype=np.float32)
    gt = np.array([[[1, 1, 0, 0]]], dtype=np.float32)
    r = evaluate("stepping-stones", logits, gt)
    assert r["miou"] == pytest.approx(0.5, abs=1e-6)
    assert r["fscore"] == pytest.approx(1.0, abs=1e-6)


def test_binary_masks_give_iou_but_no_protocol_f():
    gt = np.array([[[0, 255, 255, 0]]], dtype=np.uint8)
    r = evaluate("avsbench-binary", gt.copy(), gt)
    assert r["miou"] == pytest.approx(1.0, abs=1e-6)
    assert r["fscore"] is None and r["fscore_of_mask"] == pytest.approx(1.0, abs=1e-6)
    assert "binary masks" in r["notes"][0]


# Semantic, C = 4, frames of 1×4 pixels.
# Frame 1: gt [0,0,1,1], pred [0,1,1,1]: class 0: inter 1, pred 1, lab 2 -> IoU 1/2, F(P=1,R=.5) = .8125;
#          class 1: inter 2, pred 3, lab 2 -> IoU 2/3, F(P=2/3,R=1) = .722222; classes 2, 3: union 0.
# Frame 2: gt [0,0,0,0], pred [0,0,0,2] (class 2 predicted, never in gt): class 0: IoU 3/4,
#          F(P=1,R=.75) = .975/1.05 = .928571; class 2: union 1, IoU 0, F 0 — counted; class 1: union 0.
# Per class: IoU [.625, 2/3, 0, absent], F [.870536, .722222, 0, absent].
SEM_GT = np.array([[[0, 0, 1, 1]], [[0, 0, 0, 0]]])
SEM_PRED = np.array([[[0, 1, 1, 1]], [[0, 0, 0, 2]]])


def test_avsbench_semantic_hand_case():
    r = evaluate("avsbench-semantic", SEM_PRED, SEM_GT, num_classes=4)
    iou_sum, f_sum = 0.625 + 2 / 3, (0.8125 + 0.975 / 1.05) / 2 + 0.65 / 0.9
    assert r["classes_present"] == 3
    assert r["miou"] == pytest.approx(iou_sum / 4, abs=1e-6)
    assert r["fscore"] == pytest.approx(f_sum / 4, abs=1e-6)
    assert r["miou_present"] == pytest.approx(iou_sum / 3, abs=1e-6)
    assert r["fscore_present"] == pytest.approx(f_sum / 3, abs=1e-6)
    assert r["miou_nobg_reference_drops_last_class"] == pytest.approx(iou_sum / 3, abs=1e-6)  # drops class 3
    assert r["miou_no_background"] == pytest.approx((2 / 3) / 3, abs=1e-6)  # drops class 0


def test_semantic_logits_take_the_argmax():
    logits = np.eye(4, dtype=np.float32)[SEM_PRED].transpose(0, 3, 1, 2) * 5  # one-hot -> [N, C, H, W]
    by_logits = evaluate("avsbench-semantic", logits, SEM_GT)
    assert by_logits["miou"] == pytest.approx(evaluate("avsbench-semantic", SEM_PRED, SEM_GT, num_classes=4)["miou"])


def test_cavp_dataset_confusion_matrix():
    # rows gt, columns pred: gt0 -> pred0 4, pred1 1, pred2 1; gt1 -> pred1 2. tp [4,2,0,0],
    # fp [0,1,1,0], fn [2,0,0,0]. IoU [4/6, 2/3, 0, 0] over 4 classes; F1 [.8, .8, 0, NaN] -> mean of 3;
    # F(β² .3) [5.2/5.8, 2.6/3.6, 0, NaN]; FDR [0, 1/3, 1, NaN].
    r = evaluate("cavp-dataset", SEM_PRED, SEM_GT, num_classes=4)
    assert r["miou"] == pytest.approx((4 / 6 + 2 / 3) / 4, abs=1e-9)
    assert r["f1"] == pytest.approx(1.6 / 3, abs=1e-9)
    assert r["fscore"] == pytest.approx((5.2 / 5.8 + 2.6 / 3.6) / 3, abs=1e-9)
    assert r["fdr"] == pytest.approx((1 / 3 + 1) / 3, abs=1e-9)
    assert r["pixel_accuracy"] == pytest.approx(6 / 8, abs=1e-9)


def test_refavs_null_score():
    masks = np.array([[[1, 0, 0, 0]], [[1, 1, 1, 0]]], dtype=np.uint8)
    assert evaluate("refavs-null", masks)["null_score"] == pytest.approx(math.sqrt(4 / 8), abs=1e-9)
    per_frame = evaluate("refavs-null", masks, batch_size=1, frames_per_video=1)["null_score"]
    assert per_frame == pytest.approx((math.sqrt(1 / 4) + math.sqrt(3 / 4)) / 2, abs=1e-9)


@pytest.mark.parametrize(
    "name,options",
    [
        ("avsbench-binary", {}),
        ("avsbench-binary", {"batch_size": 4}),
        ("bias-in-avs", {}),
        ("segpref", {"frames_per_video": 3}),
        ("refavs-null", {"batch_size": 2}),
    ],
)
def test_accumulator_in_uneven_batches_equals_one_call(name, options):
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2, size=(23, 6, 5)).astype(np.float32)
    gt = (rng.random((23, 6, 5)) > 0.6).astype(np.float32)
    gt[[2, 7, 8, 9, 10, 11]] = 0  # includes an all-empty video of 5 frames
    whole = evaluate(name, logits, gt, **options)
    acc = Accumulator(name, **options)
    for start, stop in ((0, 3), (3, 10), (10, 11), (11, 23)):
        acc.update(logits[start:stop], gt[start:stop])
    parts = acc.compute()
    for key in ("miou", "fscore", "null_score"):
        if key in whole:
            assert parts[key] == pytest.approx(whole[key], abs=1e-9)


@pytest.mark.parametrize("name", ["avsbench-binary", "avsbench-semantic", "cavp-dataset", "refavs-null"])
def test_summed_states_equal_the_whole_set(name):
    """DDP: each rank's state_dict summed field by field gives the numbers of the whole set."""
    rng = np.random.default_rng(5)
    gt = rng.integers(0, 3, size=(10, 6, 5))
    logits = rng.normal(size=(10, 3, 6, 5)).astype(np.float32)
    if name in ("avsbench-binary", "refavs-null"):
        logits, gt = logits[:, 1] - logits[:, 0], (gt > 0).astype(np.float32)
    states = []
    for half in (slice(0, 4), slice(4, 10)):
        acc = Accumulator(name)
        acc.update(logits[half], gt[half])
        states.append(acc.state_dict())
    summed = {k: (None if states[0][k] is None else states[0][k] + states[1][k]) for k in states[0]}
    merged = Accumulator(name)
    merged.load_state_dict(summed, ranks=2)
    whole = evaluate(name, logits, gt)
    for key in ("miou", "fscore", "null_score", "miou_present"):
        if key in whole:
            assert merged.compute()[key] == pytest.approx(whole[key], abs=1e-9)


def test_eval_size_resizes_scores_bilinearly_and_labels_nearest():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(2, 8, 8)).astype(np.float32))
    gt = torch.from_numpy((rng.random((2, 8, 8)) > 0.5).astype(np.float32))
    resized = evaluate("avsbench-binary", logits, gt, eval_size=16)
    by_hand = evaluate(
        "avsbench-binary",
        torch.nn.functional.interpolate(logits[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0],
        gt.repeat_interleave(2, 1).repeat_interleave(2, 2),  # nearest ×2 = each pixel twice
    )
    assert resized["miou"] == pytest.approx(by_hand["miou"], abs=1e-9)
    assert resized["fscore"] == pytest.approx(by_hand["fscore"], abs=1e-9)


def test_registry_and_bad_options():
    for proto in PROTOCOLS.values():
        assert "/" in proto.doc  # names its upstream file
    with pytest.raises(MetricInputError, match="no option"):
        evaluate("avsbench-binary", np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), beta=1)
    with pytest.raises(MetricInputError, match="unknown protocol"):
        evaluate("miou", np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))
    with pytest.raises(MetricInputError, match="differ"):
        evaluate("avsbench-binary", np.zeros((1, 2, 2)), np.zeros((1, 3, 2)))
