"""The compressor's losses: GHM-C for the keep/drop decision, cosine separation for its features.

The keep labels are imbalanced (a third or fewer of the tokens are kept) and most tokens are
easy (background); GHM-C re-weights every token by the inverse density of its gradient norm so
that neither the easy majority nor a few outliers dominate. The cosine term pushes the mean
feature of the kept tokens away from that of the dropped ones (EvoComp paper, Sec. 4). Plain
BCE and the focal loss are the ablation's alternatives to GHM-C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GHMC(nn.Module):
    """Gradient Harmonizing Mechanism loss for binary (sigmoid) classification.

    From "Gradient Harmonized Single-stage Detector" (Li, Liu, Wang, AAAI 2019,
    https://arxiv.org/abs/1811.05181), with the semantics of mmdetection's ``GHMC``: the gradient
    norm of BCE-with-logits w.r.t. the logit is ``g = |sigmoid(x) - y|``; ``[0, 1]`` is cut into
    ``bins`` equal regions and every element is weighted by ``tot / (count of its region)``,
    divided by the number of non-empty regions, so each non-empty region contributes equally.
    With ``momentum > 0`` the region counts are an exponential moving average across calls
    (``acc_sum``), without bias correction, exactly as mmdetection does.

    Args:
        bins: number of equal regions of the gradient norm in ``[0, 1]``.
        momentum: EMA factor for the region counts; 0 uses the counts of the current batch only.
    """

    edges: Tensor
    acc_sum: Tensor

    def __init__(self, bins: int = 10, momentum: float = 0.0) -> None:
        super().__init__()
        if bins < 1:
            raise ValueError(f"GHMC needs bins >= 1, got {bins}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"GHMC needs momentum in [0, 1), got {momentum}")
        self.bins = bins
        self.momentum = momentum
        edges = torch.arange(bins + 1, dtype=torch.float32) / bins
        edges[-1] += 1e-6  # so that g == 1 falls in the last region
        self.register_buffer("edges", edges, persistent=False)
        self.register_buffer("acc_sum", torch.zeros(bins))

    def forward(self, logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> Tensor:
        """Return the scalar GHM-C loss (sum of weighted BCE / number of valid elements).

        Args:
            logits: (*) raw scores, any shape.
            targets: (*) same shape, in ``[0, 1]``; hard 0/1 or soft labels.
            weight: (*) same shape or None; elements with ``weight > 0`` count, the others are
                ignored. Like mmdetection it is a mask, not a per-element scale.
        """
        if targets.shape != logits.shape:
            raise ValueError(
                f"GHMC: targets {tuple(targets.shape)} != logits {tuple(logits.shape)}"
            )
        targets = targets.to(logits.dtype)
        if targets.numel() and (targets.min() < 0 or targets.max() > 1):
            raise ValueError("GHMC: targets must lie in [0, 1]")
        valid = torch.ones_like(logits, dtype=torch.bool) if weight is None else weight > 0

        with torch.no_grad():
            g = (logits.detach().float().sigmoid() - targets.float()).abs()  # (*)
            # edges[i] <= g < edges[i+1]  <=>  region i
            region = (torch.bucketize(g, self.edges, right=True) - 1).clamp_(0, self.bins - 1)
            counts = torch.bincount(region[valid], minlength=self.bins).float()  # (bins,)
            tot = valid.sum().float()
            nonempty = counts > 0
            if self.momentum > 0:
                ema = self.momentum * self.acc_sum + (1 - self.momentum) * counts
                self.acc_sum.copy_(torch.where(nonempty, ema, self.acc_sum))
                density = self.acc_sum
            else:
                density = counts
            per_region = torch.where(nonempty, tot / density.clamp(min=1e-12), 0.0)
            per_region = per_region / nonempty.sum().clamp(min=1)
            weights = (per_region[region] * valid).to(logits.dtype)  # (*)

        loss = F.binary_cross_entropy_with_logits(logits, targets, weights, reduction="sum")
        return loss / tot.clamp(min=1)  # an empty batch gives 0.0 that still backprops


class SigmoidFocalLoss(nn.Module):
    """Focal loss for binary (sigmoid) classification: BCE scaled by ``|y - sigmoid(x)| ** gamma``.

    From "Focal Loss for Dense Object Detection" (Lin, Goyal, Girshick, He, Dollar, ICCV 2017,
    https://arxiv.org/abs/1708.02002): ``FL = (1 - p_t) ** gamma x BCE``, ``p_t`` the predicted
    probability of the true class, so well-classified (easy) elements weigh little. For a hard
    label ``1 - p_t == |y - p|``; the factor is written ``|y - p|`` so that on soft labels
    (``train.soft_labels``) the loss is still smallest at ``p = y``, as in Quality Focal Loss
    (Li et al., "Generalized Focal Loss", NeurIPS 2020, https://arxiv.org/abs/2006.04388);
    torchvision's ``1 - p_t`` with ``p_t = p y + (1 - p)(1 - y)`` pulls a soft 0.3 to p = 0.12.
    Written out here also because torchvision is not a dependency. No alpha class weight: the
    BCE path has no positive weight either, so the ablation changes the focusing term alone.
    ``gamma = 0`` is plain BCE.

    Args:
        gamma: focusing exponent (the paper's 2); 0 gives BCE.
    """

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"SigmoidFocalLoss needs gamma >= 0, got {gamma}")
        self.gamma = gamma

    def forward(self, logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> Tensor:
        """Return the scalar focal loss (sum over valid elements / number of valid elements).

        Args:
            logits: (*) raw scores, any shape.
            targets: (*) same shape, in ``[0, 1]``; hard 0/1 or soft labels.
            weight: (*) same shape or None; a mask like GHMC's: elements with ``weight > 0``
                count, the others are ignored.
        """
        if targets.shape != logits.shape:
            raise ValueError(
                f"SigmoidFocalLoss: targets {tuple(targets.shape)} != logits {tuple(logits.shape)}"
            )
        targets = targets.to(logits.dtype)
        if targets.numel() and (targets.min() < 0 or targets.max() > 1):
            raise ValueError("SigmoidFocalLoss: targets must lie in [0, 1]")
        valid = torch.ones_like(logits) if weight is None else (weight > 0).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # (*)
        # the floor keeps the gradient finite where a saturated sigmoid makes p == y exactly
        # (gamma < 1 would give 0 x inf); it is below any difference that changes the loss
        modulator = (targets - logits.sigmoid()).abs().clamp(min=1e-12) ** self.gamma  # (*)
        return (modulator * bce * valid).sum() / valid.sum().clamp(min=1)


def cosine_separation(hidden: Tensor, keep: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean cosine similarity between the mean kept and the mean dropped hidden state.

    Minimising it pushes the two apart. ``keep`` may be a hard mask or keep probabilities; the
    means are weighted by ``keep`` and ``1 - keep``. Samples without both kept and dropped weight
    are left out; if none is left, the result is 0.0 (still attached to the graph).

    Args:
        hidden: (B, N, H) per-token features.
        keep: (B, N) keep weight in ``[0, 1]``.
        valid: (B, N) bool, False for padding; None means all valid.
    """
    keep = keep.to(hidden.dtype)
    if valid is not None:
        keep = keep * valid
        drop = (1 - keep) * valid
    else:
        drop = 1 - keep
    w_keep, w_drop = keep.sum(1), drop.sum(1)  # (B,)
    mean_keep = torch.einsum("bn,bnh->bh", keep, hidden) / w_keep.clamp(min=1e-6)[:, None]
    mean_drop = torch.einsum("bn,bnh->bh", drop, hidden) / w_drop.clamp(min=1e-6)[:, None]
    cos = F.cosine_similarity(mean_keep, mean_drop, dim=-1, eps=1e-8)  # (B,)
    both = (w_keep > 1e-6) & (w_drop > 1e-6)
    return (cos * both).sum() / both.sum().clamp(min=1)


def compressor_loss(
    logits: Tensor,
    targets: Tensor,
    hidden: Tensor,
    valid: Tensor,
    criterion: nn.Module | None,
    alpha: float,
) -> tuple[Tensor, dict[str, float]]:
    """Keep/drop classification loss (GHM-C, focal, or plain BCE) + alpha x cosine separation.

    The cosine term uses the predicted keep probabilities ``sigmoid(logits)``, not the labels:
    with the labels it would only shape the features, and the classifier would never learn from
    it; with the predictions, its gradient also reaches the classifier (through the weights of
    the two means), so the scorer itself is pushed to split tokens into two distinct groups.
    The classification term anchors that split to the labels.

    Args:
        logits: (B, N) keep-logits; padded positions must be finite (see ``compressor.PAD_LOGIT``).
        targets: (B, N) labels in ``[0, 1]`` (hard or soft).
        hidden: (B, N, H) the features the classifier reads.
        valid: (B, N) bool, False for padding.
        criterion: the classification loss called as ``criterion(logits, targets, mask)``
            (:class:`GHMC` or :class:`SigmoidFocalLoss`), or None for plain BCE.
        alpha: weight of the cosine term.

    Returns:
        ``(total, parts)`` with parts ``{"cls", "cos", "total"}`` as floats for logging.
    """
    valid_f = valid.to(logits.dtype)
    if criterion is not None:
        cls = criterion(logits, targets, valid_f)
    else:
        bce = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
        cls = (bce * valid_f).sum() / valid_f.sum().clamp(min=1)
    cos = cosine_separation(hidden, torch.sigmoid(logits), valid)
    total = cls + alpha * cos
    parts = {"cls": float(cls.detach()), "cos": float(cos.detach()), "total": float(total.detach())}
    return total, parts
