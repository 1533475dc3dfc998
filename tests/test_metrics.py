import math

import numpy as np
import pytest
import torch

from segadapt.adapt.metrics import ConfusionMatrix, format_table, metrics_from_confusion


def test_hand_computed_case():
    # 3 classes, ignore 255. Labels/preds chosen so every number can be checked by hand.
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = ConfusionMatrix(3, 255)
    cm.update(pred, target)
    # rows = label: class0 -> (0:1, 1:1); class1 -> (1:2, 2:1); class2 -> (2:1, 0:1); the 255 pixel is dropped
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    m = cm.compute()
    # IoU0 = 1/(2+2-1)=1/3, IoU1 = 2/(3+3-2)=1/2, IoU2 = 1/(2+2-1)=1/3
    assert m["iou"] == pytest.approx([100 / 3, 50.0, 100 / 3])
    assert m["miou"] == pytest.approx((100 / 3 + 50 + 100 / 3) / 3)
    assert m["pixel_acc"] == pytest.approx(4 / 7 * 100)
    assert m["support"] == [2, 3, 2] and m["num_pixels"] == 7


def test_absent_class_is_left_out_and_missed_class_counts():
    cm = np.array([[5, 0, 0], [0, 0, 0], [2, 0, 0]])  # class 1 absent everywhere, class 2 never predicted
    m = metrics_from_confusion(cm)
    assert m["iou"][1] is None
    assert m["iou"][2] == 0.0
    assert m["miou"] == pytest.approx((5 / 7 * 100 + 0) / 2)


def test_accumulates_over_batches_like_one_big_batch():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 6, (6, 20, 20), generator=g)
    p = torch.randint(0, 5, (6, 20, 20), generator=g)
    a, b = ConfusionMatrix(5, 5), ConfusionMatrix(5, 5)
    a.update(p, t)
    for i in range(6):
        b.update(p[i], t[i])
    assert torch.equal(a.mat, b.mat)


def test_matches_torchmetrics_jaccard():
    tm = pytest.importorskip("torchmetrics")
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(1)
    k, ignore = 7, 255
    target = torch.randint(0, k, (4, 32, 32), generator=g)
    target[:, :4] = ignore
    # correlated predictions so the IoUs are not all tiny
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target.clamp(max=k - 1),
                       torch.randint(0, k, target.shape, generator=g))
    cm = ConfusionMatrix(k, ignore)
    cm.update(pred, target)
    ours = cm.compute()
    ref = MulticlassJaccardIndex(num_classes=k, ignore_index=ignore, average="none")(pred, target)
    assert np.allclose(np.array(ours["iou"]) / 100, ref.numpy(), atol=1e-6)
    ref_mean = MulticlassJaccardIndex(num_classes=k, ignore_index=ignore, average="macro")(pred, target)
    assert ours["miou"] / 100 == pytest.approx(float(ref_mean), abs=1e-6)
    assert tm is not None


def test_bad_inputs_and_table():
    cm = ConfusionMatrix(3, 255)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="class ids"):
        cm.update(torch.full((2, 2), 3), torch.zeros(2, 2))
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    txt = format_table(cm.compute(), ["a", "b", "c"])
    assert "mIoU" in txt and "n/a" in txt and math.isfinite(cm.compute()["miou"])


def test_auroc_known_values_and_ties():
    from segadapt.adapt.metrics import auroc

    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # the textbook example
    assert auroc([1, 1, 1], [1, 0, 1]) == 0.5  # all tied: chance
    assert auroc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert math.isnan(auroc([0.2, 0.3], [1, 1]))
    rng = np.random.default_rng(0)
    s, y = rng.random(2000), rng.random(2000) < 0.3
    # brute force over all positive/negative pairs
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auroc(s, y) == pytest.approx(brute)
