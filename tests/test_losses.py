"""GHM-C and the focal loss against hand-computed values, the cosine term, the combined loss."""

from __future__ import annotations

import math

import pytest
import torch

from evocomp.compress.fit import classification_loss
from evocomp.config import TrainParams
from evocomp.losses import GHMC, SigmoidFocalLoss, compressor_loss, cosine_separation


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _reference_ghmc(ps: list[float], ys: list[float], bins: int, valid: list[bool]) -> float:
    """GHM-C written out in plain Python (g values must lie inside a region, not on an edge)."""
    regions = [min(int(abs(p - y) * bins), bins - 1) for p, y in zip(ps, ys, strict=True)]
    tot = sum(valid)
    counts = [0] * bins
    for r, v in zip(regions, valid, strict=True):
        counts[r] += v
    n = sum(c > 0 for c in counts)
    loss = 0.0
    for p, y, r, v in zip(ps, ys, regions, valid, strict=True):
        if v:
            loss += tot / counts[r] / n * _bce(p, y)
    return loss / max(tot, 1)


def _centred_batch(bins: int, gen: torch.Generator, size: int = 40, label: float | None = None):
    """Probabilities/targets whose g = |p - y| sits at region centres (no edge ambiguity)."""
    regions = torch.randint(0, bins, (size,), generator=gen).tolist()
    ys = torch.randint(0, 2, (size,), generator=gen).float().tolist()
    if label is not None:
        ys = [label] * size
    ps = []
    for r, y in zip(regions, ys, strict=True):
        g = (r + 0.5) / bins
        g = min(max(g, 0.02), 0.98)  # keep p away from 0 and 1 (bins=1: g = 0.5)
        ps.append(y - g if y == 1 else y + g)
    return ps, ys


def test_ghmc_hand_example_two_bins():
    # bins=2: edges 0, 0.5, 1. g = 0.2, 0.3, 0.1 (region 0) and 0.8 (region 1).
    ps, ys = [0.8, 0.3, 0.9, 0.2], [1.0, 0.0, 1.0, 1.0]
    logits = torch.tensor([_logit(p) for p in ps])
    loss = GHMC(bins=2)(logits, torch.tensor(ys))
    # tot = 4, counts = [3, 1], n = 2 -> weights 4/3/2 = 2/3 and 4/1/2 = 2.
    expected = (2 / 3 * (-math.log(0.8) - math.log(0.7) - math.log(0.9)) + 2 * -math.log(0.2)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("bins", [1, 10, 30])
def test_ghmc_matches_reference(bins):
    ps, ys = _centred_batch(bins, torch.Generator().manual_seed(bins))
    logits = torch.tensor([_logit(p) for p in ps], requires_grad=True)
    loss = GHMC(bins=bins)(logits, torch.tensor(ys))
    assert loss.item() == pytest.approx(_reference_ghmc(ps, ys, bins, [True] * len(ps)), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_ghmc_one_bin_is_plain_bce():
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(5, 7, generator=gen), torch.rand(5, 7, generator=gen).round()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert GHMC(bins=1)(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("bins", [1, 10, 30])
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0)])
def test_ghmc_empty_batch_is_zero_and_backprops(bins, shape):
    logits = torch.zeros(shape, requires_grad=True)
    loss = GHMC(bins=bins)(logits, torch.zeros(shape))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == shape


@pytest.mark.parametrize("bins", [1, 10, 30])
def test_ghmc_all_masked_is_zero_not_nan(bins):
    logits = torch.randn(4, 6, requires_grad=True)
    loss = GHMC(bins=bins)(logits, torch.ones(4, 6), torch.zeros(4, 6))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 6))


@pytest.mark.parametrize("bins", [1, 10, 30])
@pytest.mark.parametrize("label", [0.0, 1.0])
def test_ghmc_all_one_class(bins, label):
    ps, ys = _centred_batch(bins, torch.Generator().manual_seed(7), label=label)
    logits = torch.tensor([_logit(p) for p in ps])
    loss = GHMC(bins=bins)(logits, torch.tensor(ys))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(_reference_ghmc(ps, ys, bins, [True] * len(ps)), rel=1e-5)


@pytest.mark.parametrize("bins", [1, 10, 30])
def test_ghmc_weight_masks_elements(bins):
    ps, ys = _centred_batch(bins, torch.Generator().manual_seed(3))
    valid = [i % 3 != 0 for i in range(len(ps))]
    logits = torch.tensor([_logit(p) for p in ps], requires_grad=True)
    weight = torch.tensor(valid, dtype=torch.float32)
    loss = GHMC(bins=bins)(logits, torch.tensor(ys), weight)
    assert loss.item() == pytest.approx(_reference_ghmc(ps, ys, bins, valid), rel=1e-5)
    loss.backward()
    assert torch.all(logits.grad[~torch.tensor(valid)] == 0)
    # masked elements' values do not matter
    moved = logits.detach().clone()
    moved[~torch.tensor(valid)] = 9.0
    assert GHMC(bins=bins)(moved, torch.tensor(ys), weight).item() == pytest.approx(loss.item())


def test_ghmc_momentum_follows_the_ema_formula():
    m = 0.75
    ghm = GHMC(bins=2, momentum=m)
    # step 1: g = 0.2, 0.3, 0.1 -> region 0 (3), g = 0.8 -> region 1 (1)
    step1 = ([0.8, 0.3, 0.9, 0.2], [1.0, 0.0, 1.0, 1.0])
    # step 2: g = 0.1, 0.4 -> region 0 (2), region 1 empty (keeps its value)
    step2 = ([0.9, 0.4], [1.0, 0.0])
    # step 3: g = 0.7, 0.6, 0.9 -> region 1 (3), region 0 empty
    step3 = ([0.3, 0.6, 0.1], [1.0, 0.0, 1.0])
    acc = [0.0, 0.0]
    for ps, ys in (step1, step2, step3):
        regions = [int(abs(p - y) * 2) for p, y in zip(ps, ys, strict=True)]
        counts = [regions.count(0), regions.count(1)]
        acc = [m * a + (1 - m) * c if c else a for a, c in zip(acc, counts, strict=True)]
        n = sum(c > 0 for c in counts)
        tot = len(ps)
        expected = (
            sum(tot / acc[r] / n * _bce(p, y) for p, y, r in zip(ps, ys, regions, strict=True))
            / tot
        )
        loss = ghm(torch.tensor([_logit(p) for p in ps]), torch.tensor(ys))
        assert ghm.acc_sum.tolist() == pytest.approx(acc)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert acc == pytest.approx([0.75 * 0.75 + 0.25 * 2, 0.75 * 0.25 + 0.25 * 3])


def test_ghmc_soft_targets():
    # g = |p - y| for soft y: 0.25 (region 2), 0.55 (region 5), 0.05 (region 0), 0.25 (region 2)
    ps, ys = [0.55, 0.85, 0.35, 0.45], [0.3, 0.3, 0.4, 0.7]
    logits = torch.tensor([_logit(p) for p in ps], requires_grad=True)
    loss = GHMC(bins=10)(logits, torch.tensor(ys))
    # tot 4, counts {2: 2, 5: 1, 0: 1}, n = 3 -> weights 4/2/3, 4/3, 4/3, 4/2/3
    w = [2 / 3, 4 / 3, 4 / 3, 2 / 3]
    expected = sum(wi * _bce(p, y) for wi, p, y in zip(w, ps, ys, strict=True)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # d BCE / d logit = p - y, scaled by the (constant) weight / tot
    grad = [wi * (p - y) / 4 for wi, p, y in zip(w, ps, ys, strict=True)]
    assert logits.grad.tolist() == pytest.approx(grad, rel=1e-4)


def test_ghmc_rejects_bad_inputs():
    with pytest.raises(ValueError, match="targets must lie in"):
        GHMC()(torch.zeros(3), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="shape|!="):
        GHMC()(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="bins"):
        GHMC(bins=0)
    with pytest.raises(ValueError, match="momentum"):
        GHMC(momentum=1.0)


# --- focal loss ----------------------------------------------------------------------------


def _reference_focal(ps: list[float], ys: list[float], gamma: float) -> float:
    """Lin et al.'s (1 - p_t) ** gamma x BCE, p_t as torchvision writes it, averaged."""
    terms = []
    for p, y in zip(ps, ys, strict=True):
        p_t = p * y + (1 - p) * (1 - y)
        terms.append((1 - p_t) ** gamma * _bce(p, y))
    return sum(terms) / max(len(terms), 1)


def test_focal_gamma_zero_is_plain_bce():
    # by hand: (-ln 0.9 - ln 0.2 - ln 0.7) / 3 = (0.10536 + 1.60944 + 0.35667) / 3 = 0.69049
    ps, ys = [0.9, 0.2, 0.3], [1.0, 1.0, 0.0]
    logits = torch.tensor([_logit(p) for p in ps])
    assert SigmoidFocalLoss(gamma=0.0)(logits, torch.tensor(ys)).item() == pytest.approx(
        0.69049, abs=1e-5
    )
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(5, 7, generator=gen), torch.rand(5, 7, generator=gen)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert SigmoidFocalLoss(gamma=0.0)(logits, targets).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_focal_gamma_two_down_weights_easy_elements():
    # by hand, gamma 2: an easy positive (p 0.9) is scaled by 0.1^2 = 0.01, a hard positive
    # (p 0.2) by 0.8^2 = 0.64, a negative at p 0.3 by 0.3^2 = 0.09:
    # (0.01 x 0.10536 + 0.64 x 1.60944 + 0.09 x 0.35667) / 3 = (0.0010536 + 1.03004 + 0.0321007) / 3
    ps, ys = [0.9, 0.2, 0.3], [1.0, 1.0, 0.0]
    logits = torch.tensor([_logit(p) for p in ps])
    focal = SigmoidFocalLoss(gamma=2.0)
    assert focal(logits, torch.tensor(ys)).item() == pytest.approx(0.354398, abs=1e-5)
    # the easy element's loss next to the hard one's: 0.065 with BCE, 0.001 at gamma 2
    easy, hard = (focal(logits[[i]], torch.tensor([ys[i]])).item() for i in (0, 1))
    assert easy == pytest.approx(0.0010536, abs=1e-6) and hard == pytest.approx(1.03004, abs=1e-4)
    assert easy / hard < 0.002 < 0.06 < _bce(0.9, 1.0) / _bce(0.2, 1.0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_focal_matches_lin_et_al_on_hard_labels(gamma):
    gen = torch.Generator().manual_seed(int(gamma * 10))
    ps = (torch.rand(40, generator=gen) * 0.96 + 0.02).tolist()
    ys = torch.randint(0, 2, (40,), generator=gen).float().tolist()
    logits = torch.tensor([_logit(p) for p in ps], dtype=torch.float64, requires_grad=True)
    loss = SigmoidFocalLoss(gamma)(logits, torch.tensor(ys, dtype=torch.float64))
    assert loss.item() == pytest.approx(_reference_focal(ps, ys, gamma), rel=1e-9)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("y", [0.1, 0.3, 0.5, 0.8])
def test_focal_on_soft_labels_is_smallest_at_p_equal_y(y):
    """|y - p| ** gamma, not torchvision's 1 - p_t: that form pulls a soft 0.3 to p = 0.12."""
    ps = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    focal = SigmoidFocalLoss(gamma=2.0)
    losses = torch.stack(
        [focal(torch.logit(p)[None], torch.tensor([y], dtype=ps.dtype)) for p in ps]
    )
    assert ps[losses.argmin()].item() == pytest.approx(y, abs=0.006)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0)])
def test_focal_empty_batch_is_zero_and_backprops(gamma, shape):
    logits = torch.zeros(shape, requires_grad=True)
    loss = SigmoidFocalLoss(gamma)(logits, torch.zeros(shape))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == shape


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_weight_masks_elements(gamma):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, generator=gen, requires_grad=True)
    targets = torch.rand(4, 6, generator=gen).round()
    mask = (torch.arange(24).reshape(4, 6) % 3 != 0).float()
    loss = SigmoidFocalLoss(gamma)(logits, targets, mask)
    valid = mask.bool()
    alone = SigmoidFocalLoss(gamma)(logits.detach()[valid], targets[valid])
    assert loss.item() == pytest.approx(alone.item(), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[~valid] == 0)
    assert SigmoidFocalLoss(gamma)(logits, targets, torch.zeros(4, 6)).item() == 0.0


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_saturated_sigmoid_has_a_finite_gradient(gamma):
    # float32 sigmoid(40) == 1.0 exactly: p == y, where d/dp |y - p| ** 0.5 is infinite
    logits = torch.tensor([40.0, -40.0, 0.0], requires_grad=True)
    loss = SigmoidFocalLoss(gamma)(logits, torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()
    assert logits.grad[2] < 0  # the hard element still pulls its logit up


def test_focal_rejects_bad_inputs():
    with pytest.raises(ValueError, match="targets must lie in"):
        SigmoidFocalLoss()(torch.zeros(3), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="!="):
        SigmoidFocalLoss()(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="gamma"):
        SigmoidFocalLoss(gamma=-1.0)


@pytest.mark.parametrize(
    "loss, kind", [("ghm", GHMC), ("focal", SigmoidFocalLoss), ("bce", type(None))]
)
def test_train_loss_picks_the_classification_loss(loss, kind):
    params = TrainParams(loss=loss, ghm_bins=7, focal_gamma=3.0)
    criterion = classification_loss(params)
    assert type(criterion) is kind
    if loss == "ghm":
        assert criterion.bins == 7
    if loss == "focal":
        assert criterion.gamma == 3.0


# --- cosine separation ---------------------------------------------------------------------


def test_cosine_separation_hand_values():
    hidden = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]],  # kept mean (1, 0), dropped (0, 2): cos 0
            [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]],  # kept (1.5, 1.5), dropped (3, 3): cos 1
            [[1.0, 0.0], [-1.0, 0.0], [5.0, 5.0]],  # all kept: left out
        ]
    )
    keep = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert cosine_separation(hidden, keep).item() == pytest.approx(0.5, abs=1e-6)
    # padding does not count: only token 0 kept and token 1 dropped in sample 2 -> cos -1
    valid = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    keep2 = keep.clone()
    keep2[2, 1] = 0.0
    assert cosine_separation(hidden, keep2, valid).item() == pytest.approx(0.0, abs=1e-6)


def test_cosine_separation_soft_keep_weights_means():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    keep = torch.tensor([[0.75, 0.25]])  # kept mean (0.75, 0.25), dropped (0.25, 0.75)
    expected = (0.75 * 0.25 * 2) / (0.75**2 + 0.25**2)
    assert cosine_separation(hidden, keep).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "keep",
    [torch.ones(2, 4), torch.zeros(2, 4), torch.empty(0, 4)],
    ids=["all-kept", "all-dropped", "empty-batch"],
)
def test_cosine_separation_degenerate_is_zero_and_backprops(keep):
    hidden = torch.randn(keep.shape[0], 4, 3, requires_grad=True)
    out = cosine_separation(hidden, keep)
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(hidden.grad).all()


def test_cosine_separation_zero_norm_hidden_is_finite():
    hidden = torch.zeros(2, 4, 3, requires_grad=True)
    out = cosine_separation(hidden, torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]]))
    out.backward()
    assert math.isfinite(out.item()) and torch.isfinite(hidden.grad).all()


def test_cosine_separation_gradient_step_reduces_similarity():
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(4, 10, 8, generator=gen) + 2.0).requires_grad_()  # similar means
    keep = (torch.rand(4, 10, generator=gen) > 0.5).float()
    keep[:, 0], keep[:, 1] = 1.0, 0.0
    before = cosine_separation(hidden, keep)
    before.backward()
    with torch.no_grad():
        stepped = hidden - 20.0 * hidden.grad  # per-token grads are small: 1 / (B x tokens)
    after = cosine_separation(stepped, keep)
    assert after.item() < before.item() - 1e-3


# --- combined loss -------------------------------------------------------------------------


def _loss_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 8, generator=gen, requires_grad=True)
    targets = (torch.rand(3, 8, generator=gen) > 0.7).float()
    hidden = torch.randn(3, 8, 5, generator=gen, requires_grad=True)
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[2, 5:] = False
    return logits, targets, hidden, valid


def test_compressor_loss_bce_ablation_is_masked_bce_plus_cosine():
    logits, targets, hidden, valid = _loss_inputs()
    total, parts = compressor_loss(logits, targets, hidden, valid, None, alpha=0.5)
    p = torch.sigmoid(logits).detach()
    bce = -(targets * p.log() + (1 - targets) * (1 - p).log())
    expected_cls = bce[valid].mean().item()
    expected_cos = cosine_separation(hidden, p, valid).item()
    assert parts["cls"] == pytest.approx(expected_cls, rel=1e-5)
    assert parts["cos"] == pytest.approx(expected_cos, rel=1e-5)
    assert total.item() == pytest.approx(expected_cls + 0.5 * expected_cos, rel=1e-5)
    assert parts["total"] == pytest.approx(total.item())


def test_compressor_loss_padding_does_not_count():
    logits, targets, hidden, valid = _loss_inputs()
    total, _ = compressor_loss(logits, targets, hidden, valid, GHMC(10), alpha=0.1)
    moved = logits.detach().clone()
    moved[~valid] = -1e4  # what the compressor puts at padded positions
    hidden2 = hidden.detach().clone()
    hidden2[~valid] = 100.0
    total2, _ = compressor_loss(moved, targets, hidden2, valid, GHMC(10), alpha=0.1)
    assert total2.item() == pytest.approx(total.item(), rel=1e-6)


def test_compressor_loss_cosine_term_trains_the_scorer():
    """The cosine term reaches the logits (it uses sigmoid(logits), not the labels)."""
    grads = []
    for alpha in (0.0, 1.0):
        logits, targets, hidden, valid = _loss_inputs()
        total, _ = compressor_loss(logits, targets, hidden, valid, GHMC(10), alpha)
        total.backward()
        grads.append(logits.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_compressor_loss_with_focal_is_masked_focal_plus_cosine():
    logits, targets, hidden, valid = _loss_inputs(1)
    focal = SigmoidFocalLoss(2.0)
    total, parts = compressor_loss(logits, targets, hidden, valid, focal, alpha=0.5)
    expected_cls = focal(logits.detach()[valid], targets[valid]).item()
    expected_cos = cosine_separation(hidden, torch.sigmoid(logits).detach(), valid).item()
    assert parts["cls"] == pytest.approx(expected_cls, rel=1e-5)
    assert total.item() == pytest.approx(expected_cls + 0.5 * expected_cos, rel=1e-5)
    bce_total, _ = compressor_loss(logits, targets, hidden, valid, None, alpha=0.5)
    assert total.item() < bce_total.item()  # every element scaled by |y - p| ** 2 < 1
