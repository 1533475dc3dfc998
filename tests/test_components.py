"""The optional loss components of ``segadapt adapt`` (issue #13): RCCR and BiDA in their source-free form."""

from __future__ import annotations

import json

import pytest
import torch

from types import SimpleNamespace

from segadapt.adapt.augment import mix
from segadapt.adapt.config import AdaptConfig, RectifierConfig
from segadapt.adapt.methods.base import PseudoLabels, Step, StrongView, TeacherView
from segadapt.adapt.methods.bida import BiDA, class_means
from segadapt.adapt.methods.config import BiDAConfig, RCCRConfig
from segadapt.adapt.methods.heads import ProjectionHead
from segadapt.adapt.methods.rccr import RCCR, MemoryBank, info_nce, ramp_weight

K, D, B, H, W, h, w = 5, 16, 4, 32, 48, 8, 12
ALPHA = 0.99  # the EMA teacher's momentum the components' momentum heads follow


def _context(seed: int = 0, mixed: bool = True) -> Step:
    """A fixed tiny batch whose teacher logits follow the class structure of its features (features = class
    centre + noise, logits = 3 x centre similarity), pseudo-labels its argmax at the input size."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, D, generator=g)
    lab_small = torch.randint(0, K, (B, h, w), generator=g)
    feats = centres[lab_small].permute(0, 3, 1, 2) + 0.3 * torch.randn(B, D, h, w, generator=g)
    logits = 3.0 * torch.einsum("bdhw,kd->bkhw", feats, centres) / D ** 0.5
    probs = torch.softmax(torch.nn.functional.interpolate(logits, size=(H, W), mode="bilinear"), 1)
    labels = probs.argmax(1)
    masks = None
    if mixed:  # a pasted block aligned with the decoder grid (4x4 input pixels per cell)
        masks = torch.zeros(B, 1, H, W)
        masks[:, :, 8:24, 12:36] = 1
    img = torch.zeros(B, 3, H, W, dtype=torch.uint8)
    ones = torch.ones(B, H, W)
    view = TeacherView(image=img, x=img.float(), logits=logits, features=feats, probs=probs)
    pl = PseudoLabels(labels, ones.bool(), ones, 0.9)
    strong = StrongView(img.float(), mix(labels, masks) if mixed else labels, ones, mix_masks=masks)
    return Step(index=50, steps=100, num_classes=K, ignore_index=255, batch={}, image=img, view=view, labels=pl,
                strong=strong)


def _component(cls, fresh: bool = False, **sections):
    """A component of ``cls`` set up for the tiny batch (feature channels D, K classes, teacher momentum ALPHA)."""
    comp = cls(AdaptConfig(**sections))
    teacher = SimpleNamespace(alpha=ALPHA, model=SimpleNamespace(feature_channels=D))
    comp.setup(SimpleNamespace(teacher=teacher, device=torch.device("cpu"), num_classes=K, ignore_index=255,
                               fresh=fresh))
    return comp


def _params(comp):
    return [p for g in comp.param_groups() for p in g["params"]]


def _student(s: Step, seed: int = 1):
    """Trainable student features: the teacher's, mixed like the strong view, plus noise."""
    g = torch.Generator().manual_seed(seed)
    m = s.strong.mix_masks
    base = mix(s.view.features, torch.nn.functional.adaptive_avg_pool2d(m, (h, w)).round()) if m is not None \
        else s.view.features
    return torch.nn.Parameter(base + 0.5 * torch.randn(base.shape, generator=g))


def _loss(comp, s: Step):
    """(the component's single weighted loss term, the step's logs)."""
    s.logs = {}
    (loss,) = comp.loss(s).values()
    return loss, s.logs


def _train(comp, s, steps=25, lr=1e-2):
    """A few Adam steps on the component's loss over a fixed batch (student features and the component's head);
    returns the loss at each step."""
    fs = _student(s)
    opt = torch.optim.Adam([fs] + _params(comp), lr=lr)
    losses = []
    for _ in range(steps):
        s.student_features = fs
        loss, _ = _loss(comp, s)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        comp.after_update()
    return losses


def test_projection_head_shape_and_unit_norm():
    z = ProjectionHead(D, 32)(torch.randn(2, D, 5, 7))
    assert z.shape == (2, 32, 5, 7)
    assert torch.allclose(z.norm(dim=1), torch.ones(2, 5, 7), atol=1e-5)


def test_memory_bank_is_fifo():
    bank = MemoryBank(5, 2)
    assert bank.features.shape == (0, 2)
    bank.push(torch.arange(6.).view(3, 2), torch.tensor([0, 1, 2]))
    bank.push(torch.arange(6., 12.).view(3, 2), torch.tensor([3, 4, 5]))  # 6 entries pushed into 5 slots
    assert bank.count == 5 and sorted(bank.labels.tolist()) == [1, 2, 3, 4, 5]  # the oldest (label 0) is gone
    bank.push(torch.zeros(2, 2), torch.tensor([6, 7]))
    assert sorted(bank.labels.tolist()) == [3, 4, 5, 6, 7]
    st = bank.state_dict()
    other = MemoryBank(5, 2)
    other.load_state_dict(st)
    other.push(torch.ones(1, 2), torch.tensor([8]))
    bank.push(torch.ones(1, 2), torch.tensor([8]))
    assert torch.equal(other.labels, bank.labels) and sorted(bank.labels.tolist()) == [4, 5, 6, 7, 8]


def test_info_nce_negatives_exclude_the_anchors_class():
    a = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    pos = a.clone()
    bank = torch.cat([a, -a])  # bank entries identical to the anchors would dominate if they counted
    same = info_nce(a, pos, torch.tensor([0, 1, 2]), bank, torch.tensor([0, 1, 2, 0, 1, 2]), 0.1)
    # manual: negatives of anchor i are the bank rows whose label != label i
    for i in range(3):
        neg = [j for j in range(6) if j % 3 != i]
        logits = torch.cat([(a[i] @ pos[i])[None], a[i] @ bank[neg].t()]) / 0.1
        assert torch.allclose(same[i], torch.logsumexp(logits, 0) - logits[0], atol=1e-5)
    # every entry of the anchor's class: no negatives, loss 0
    none = info_nce(a, pos, torch.zeros(3, dtype=torch.long), bank, torch.zeros(6, dtype=torch.long), 0.1)
    assert torch.allclose(none, torch.zeros(3), atol=1e-6)


def test_rccr_ramp():
    assert ramp_weight(0.01, 0, 100) == pytest.approx(0.01 * 2.718281828 ** -5)
    assert ramp_weight(0.01, 100, 100) == pytest.approx(0.01)
    assert ramp_weight(0.01, 25, 100) < ramp_weight(0.01, 50, 100) < 0.01
    assert ramp_weight(0.01, 3, 100, ramp=False) == 0.01


def test_rccr_loss_decreases_on_a_fixed_batch_and_fills_the_bank():
    torch.manual_seed(0)
    ctx = _context()
    comp = _component(RCCR, rccr=RCCRConfig(enabled=True, weight=1.0, ramp=False, bank_size=256, bank_samples=64,
                                            proj_dim=16, confidence=0.0))
    head_t0 = [p.clone() for p in comp.head_t.parameters()]
    losses = _train(comp, ctx)
    assert comp.bank.count == 256
    assert losses[-1] < 0.7 * losses[1], losses  # step 0 has an empty bank (no negatives, loss 0)
    # the momentum head follows the student's head at the EMA teacher's momentum
    head_t, head = [p.clone() for p in comp.head_t.parameters()], list(comp.head.parameters())
    comp.after_update()
    for a, b, c in zip(head_t, head, comp.head_t.parameters()):
        assert torch.allclose(c, ALPHA * a + (1 - ALPHA) * b, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(head_t0, comp.head_t.parameters()))
    ctx.student_features = _student(ctx)
    loss, logs = _loss(comp, ctx)
    assert logs["rccr_anchors"] > 0 and logs["rccr_raw"] > 0


def test_rccr_anchors_respect_confidence_mask_edges_and_the_pasted_region():
    ctx = _context()
    ctx.student_features = _student(ctx)
    n = {}
    for anchors in ("all", "pasted"):
        comp = _component(RCCR, rccr=RCCRConfig(enabled=True, proj_dim=8, confidence=0.0, anchors=anchors))
        n[anchors] = _loss(comp, ctx)[1]["rccr_anchors"]
    assert n["all"] == B * h * w  # the block is aligned with the grid: no straddling cells
    assert n["pasted"] == B * 4 * 6  # rows 8:24 and columns 12:36 of the input = 4 x 6 cells
    ctx.view.valid = torch.ones(B, H, W, dtype=torch.bool)
    ctx.view.valid[:, :, 36:] = False  # crop padding over the 3 right cell columns: no anchors, no bank entries there
    comp = _component(RCCR, rccr=RCCRConfig(enabled=True, proj_dim=8, confidence=0.0, bank_size=4096,
                                            bank_samples=4096))
    assert _loss(comp, ctx)[1]["rccr_anchors"] == B * h * (w - 3) and comp.bank.count == 2 * B * h * (w - 3)
    ctx.view.valid = None
    ctx.strong.mix_masks[:, :, 8:24, 12:14] = 0.0  # half a cell column: those cells straddle the edge
    comp = _component(RCCR, rccr=RCCRConfig(enabled=True, proj_dim=8, confidence=0.0))
    assert _loss(comp, ctx)[1]["rccr_anchors"] == B * h * w - B * 4
    comp = _component(RCCR, rccr=RCCRConfig(enabled=True, proj_dim=8, confidence=1.0))
    assert _loss(comp, ctx)[1]["rccr_anchors"] == 0


class _Source:
    """A "source model" whose decoder features are a step's teacher features."""

    training = False

    def __init__(self, s: Step):
        self.s = s

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def forward_features(self, x):
        return self.s.view.logits, self.s.view.features


def _bida(ctx: Step, **fields):
    cfg = BiDAConfig(enabled=True, weight=1.0, proj_dim=16, source_confidence=0.0, source_per_class=20,
                     proto_momentum=0.5, **fields)
    comp = _component(BiDA, bida=cfg)
    comp.init_source(_Source(ctx), [torch.zeros(1)])
    return comp


def test_bida_prototypes_ema_calibration_vote_and_loss():
    torch.manual_seed(0)
    ctx = _context(mixed=False)
    comp = _bida(ctx)
    assert comp.src_feats.shape == (K * 20, D) and torch.equal(comp.src_labels.bincount(), torch.full((K,), 20))
    p_s, valid = comp.source_prototypes()
    assert p_s.shape == (K, 16) and valid.all()
    # label transfer on this batch: the nearest source prototype mostly agrees with the teacher
    voted = comp.refine(ctx, ctx.labels)
    assert voted.mask.shape == (B, H, W) and 0.5 < voted.mask.float().mean() < 1.0
    assert ctx.logs["bida_vetoed"] == pytest.approx(1 - float(voted.mask.float().mean()))
    # a vetoed pixel loses its label and its weight
    assert bool((voted.labels[~voted.mask] == 255).all()) and bool((voted.weights[~voted.mask] == 0).all())
    ctx.student_features = _student(ctx)
    loss, logs = _loss(comp, ctx)
    assert not comp.valid_t.any() and logs["bida_st"] == 0  # no target prototypes before the first update
    pending = comp._pending
    comp.after_update()
    assert comp.valid_t.all()
    expect = torch.nn.functional.normalize(pending[0], dim=1)
    assert torch.allclose(comp.proto_t, expect, atol=1e-5)  # first observation: the batch mean itself
    # the next update is an EMA with proto_momentum 0.5 (same batch, the momentum head moved slightly)
    _loss(comp, ctx)
    m2 = torch.nn.functional.normalize(comp._pending[0], dim=1)
    bias = comp.bias.clone()
    comp.after_update()
    assert torch.allclose(comp.proto_t, torch.nn.functional.normalize(0.5 * expect + 0.5 * m2, dim=1), atol=1e-5)
    assert not torch.equal(bias, comp.bias) and comp.bias.abs().sum() > 0  # calibration moves
    losses = _train(comp, ctx)
    assert losses[-1] < 0.7 * losses[0], losses
    # the momentum head follows the projection head at the EMA teacher's momentum
    head_t, head = [p.clone() for p in comp.head_t.parameters()], list(comp.head.parameters())
    comp.after_update()
    for a, b, c in zip(head_t, head, comp.head_t.parameters()):
        assert torch.allclose(c, ALPHA * a + (1 - ALPHA) * b, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(head_t, head))
    comp.cfg.vote = False
    assert comp.refine(ctx, ctx.labels) is ctx.labels


def test_bida_loss_pulls_toward_the_own_class_prototype_and_calibration_moves_toward_the_target():
    """Signs: a gradient step on BiDA's loss raises each student embedding's similarity to its own class's source
    prototype (the loss is not maximised), and the calibration bias moves by (1 - m) (target mean - source
    prototype), not the other way."""
    torch.manual_seed(0)
    ctx = _context(mixed=False)
    comp = _bida(ctx, reverse_weight=0.0)
    fs = _student(ctx)
    ctx.student_features = fs
    p_s, _ = comp.source_prototypes()

    def own_similarity():
        with torch.no_grad():
            z = comp.head(fs)
            lab = torch.nn.functional.interpolate(ctx.strong.labels[:, None].float(), size=(h, w))[:, 0].long()
            return float(torch.einsum("behw,behw->bhw", z, p_s[lab].permute(0, 3, 1, 2)).mean())

    before = own_similarity()
    loss, _ = _loss(comp, ctx)
    (g,) = torch.autograd.grad(loss, [fs])
    with torch.no_grad():
        fs -= 0.5 * g
    assert own_similarity() > before
    m_tr, seen_tr, p_s = comp._pending[2], comp._pending[3], comp._pending[4]
    bias = comp.bias.clone()
    comp.after_update()
    mb = comp.cfg.calibration_momentum
    expect = torch.where(seen_tr[:, None], mb * bias + (1 - mb) * (m_tr - p_s), bias)
    assert torch.allclose(comp.bias, expect, atol=1e-6)


def test_bida_calibration_reads_no_crop_padding():
    """Only the real cells' label-transfer means enter the calibration: teacher features changed only under the
    padding leave the bias as it was."""
    biases = []
    for junk in (False, True):
        torch.manual_seed(0)
        ctx = _context(mixed=False)
        comp = _bida(ctx)
        ctx.view.valid = torch.ones(B, H, W, dtype=torch.bool)
        ctx.view.valid[:, :, 24:] = False  # the right half (cells 6-11) is padding
        if junk:
            ctx.view.features[..., 6:] = 5 * torch.randn(B, D, h, w - 6, generator=torch.Generator().manual_seed(9))
        ctx.student_features = _student(ctx)
        _loss(comp, ctx)
        comp.after_update()
        biases.append(comp.bias.clone())
    assert torch.allclose(biases[0], biases[1], atol=1e-6)


def test_class_means():
    m, n = class_means(torch.tensor([[1., 0.], [3., 0.], [0., 2.]]), torch.tensor([0, 0, -1]), 3)
    assert torch.equal(n, torch.tensor([2., 0., 0.])) and torch.equal(m[0], torch.tensor([2., 0.]))


def _adapt_cfg(ckpt, tiny, out, steps, resume=False, **components):
    return AdaptConfig(checkpoint=str(ckpt), target=str(tiny / "target"), out=str(out), steps=steps, size=(48, 64),
                       select="last",
                       batch_size=4, num_workers=0, debug_every=0, log_every=1, save_every=1, resume=resume,
                       rectifier=RectifierConfig(enabled=False), **components)


def test_tiny_adapt_run_with_rccr_and_bida_resumes_exactly(tiny_checkpoint, tiny, tmp_path):
    from segadapt.adapt.models.checkpoint import load_training_state
    from segadapt.adapt.engine import adapt

    comps = dict(rccr=RCCRConfig(enabled=True, weight=1.0, ramp=False, confidence=0.0, bank_size=64, bank_samples=16),
                 bida=BiDAConfig(enabled=True, source_confidence=0.3))
    s = adapt(_adapt_cfg(tiny_checkpoint, tiny, tmp_path / "a", 3, **comps), log=lambda *_: None)
    assert s["steps"] == 3
    keys = {"loss_rccr", "rccr_anchors", "loss_bida", "bida_ts", "bida_st", "bida_vetoed"}
    assert keys <= set(s["last_losses"]) and s["last_losses"]["loss_rccr"] > 0
    recs = [json.loads(line) for line in (tmp_path / "a" / "coverage.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(keys <= set(r) for r in recs)
    st = load_training_state(tmp_path / "a" / "last")
    assert set(st["components"]) == {"rccr", "bida"}
    assert st["components"]["rccr"]["bank"]["count"] == 64  # 3 steps x 2 x 16 pushed, FIFO-capped at 64
    assert st["components"]["bida"]["valid_t"].any() and st["components"]["bida"]["src_feats"].shape[0] > 0
    # exact resume (issue #18): 2 steps, then 1 resumed step == 3 steps, components included
    adapt(_adapt_cfg(tiny_checkpoint, tiny, tmp_path / "b", 2, **comps), log=lambda *_: None)
    adapt(_adapt_cfg(tiny_checkpoint, tiny, tmp_path / "b", 3, resume=True, **comps), log=lambda *_: None)
    st_b = load_training_state(tmp_path / "b" / "last")
    for k, v in st["teacher"].items():
        assert torch.equal(v, st_b["teacher"][k]), k
    for name in ("rccr", "bida"):
        for k, v in st["components"][name]["head_t"].items():
            assert torch.equal(v, st_b["components"][name]["head_t"][k]), (name, k)
    assert torch.equal(st["components"]["rccr"]["bank"]["feats"], st_b["components"]["rccr"]["bank"]["feats"])
    assert torch.equal(st["components"]["bida"]["bias"], st_b["components"]["bida"]["bias"])


def test_tiny_adapt_run_with_bida_classifier_prototypes_and_the_vote(tiny_checkpoint, tiny, tmp_path):
    from segadapt.adapt.engine import adapt

    kept = {}
    for vote in (False, True):
        bida = BiDAConfig(enabled=True, source_prototypes="classifier", vote=vote)
        s = adapt(_adapt_cfg(tiny_checkpoint, tiny, tmp_path / str(vote), 1, bida=bida), log=lambda *_: None)
        assert s["steps"] == 1 and s["last_losses"]["bida_ts"] > 0
        kept[vote] = json.loads((tmp_path / str(vote) / "coverage.jsonl").read_text().splitlines()[0])["kept"]
    assert kept[True] < kept[False]  # the label-transfer vote dropped pseudo-label pixels
