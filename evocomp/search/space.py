"""The search space of one sample: which kept-token sets the genetic search ranges over.

Tokens are grouped by their nearest vocabulary word (:mod:`evocomp.features.grouping`).
In ``paper`` mode a candidate keeps exactly one token per group (EvoComp paper, Sec. 3);
in ``budget`` mode it keeps exactly k tokens, with per-group counts within [floor, cap]
(quotas proportional to group size when k >= G, at most one per group below that).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from evocomp.config import SearchParams
from evocomp.features.grouping import group_ids, groups_as_lists
from evocomp.tokens import keep_count


def group_quotas(sizes: Sequence[int], k: int) -> list[int]:
    """Tokens to keep per group: proportional to size, >= 1 each (needs k >= G).

    Largest-remainder rounding; never more than a group's size. Ties go to the
    lower group index.
    """
    n, g = sum(sizes), len(sizes)
    if not g <= k <= n:
        raise ValueError(f"quotas need G={g} <= k <= N={n}, got k={k}")
    target = [k * s / n for s in sizes]
    quota = [min(s, max(1, int(t))) for s, t in zip(sizes, target, strict=True)]
    while sum(quota) < k:  # most under-served first
        i = max((i for i in range(g) if quota[i] < sizes[i]), key=lambda i: target[i] - quota[i])
        quota[i] += 1
    while sum(quota) > k:  # most over-served first
        i = min((i for i in range(g) if quota[i] > 1), key=lambda i: target[i] - quota[i])
        quota[i] -= 1
    return quota


@dataclass(frozen=True)
class SearchSpace:
    """The candidates of one sample: groups, the label size k, per-group bounds.

    Build one with :meth:`build` (or :meth:`of_label`); ``size``, ``log10_size``, ``contains``
    and ``enumerate`` describe it, the operators (:mod:`evocomp.search.operators`) move
    within it.
    """

    members: list[list[int]]  # per group, ascending token indices
    group_of: list[int]  # per token
    k: int
    floor: list[int]  # budget mode: at least this many kept per group ...
    cap: list[int]  # ... and at most this many (floor == cap == quota when k >= G)

    @classmethod
    def build(cls, groups: torch.Tensor, k: int | None, params: SearchParams) -> SearchSpace:
        """The space of a sample from its tokens' group labels (validated).

        Args:
            groups: (N,) integer group label per token (any labels, e.g. nearest vocabulary ids).
            k: budget mode: tokens to keep (None: ``keep_count(params.keep_ratio, N)``);
                ignored in paper mode, where k is the number of groups.
            params: the search settings (``mode``, ``keep_ratio``).
        """
        if params.mode not in ("paper", "budget"):
            raise ValueError(f"unknown search mode {params.mode!r} (known: paper, budget)")
        groups = torch.as_tensor(groups)
        if groups.dim() != 1:
            raise ValueError(
                f"groups must be (N,), one id per token: got shape {tuple(groups.shape)}"
            )
        n = groups.numel()
        if n == 0:
            raise ValueError("the sample has no visual tokens (N=0): nothing to search")
        if groups.is_floating_point():
            raise ValueError("groups must be integer group ids")
        gids = group_ids(groups.cpu())
        members = groups_as_lists(gids)
        n_groups = len(members)
        if params.mode == "paper":
            k = n_groups
            floor = cap = [1] * n_groups
        else:
            k = keep_count(params.keep_ratio, n) if k is None else k
            if not 1 <= k <= n:
                raise ValueError(f"k must be in 1..N={n} in budget mode, got {k}")
            if k >= n_groups:
                floor = cap = group_quotas([len(m) for m in members], k)
            else:  # too few tokens to cover every group: at most one per group
                floor, cap = [0] * n_groups, [1] * n_groups
        return cls(members, gids.tolist(), k, floor, cap)

    @classmethod
    def of_label(cls, groups: Sequence[int], k: int) -> SearchSpace:
        """The space a label of k tokens over these groups was searched in, in either mode.

        A paper-mode label keeps k = G tokens, and budget mode at k = G has quotas of one
        per group: the same space. So (groups, k), both in every label record, fix it.
        """
        return cls.build(torch.tensor([int(g) for g in groups]), k, SearchParams(mode="budget"))

    @property
    def n_tokens(self) -> int:
        return len(self.group_of)

    @property
    def size(self) -> int:
        """How many distinct candidates the space holds (an exact, possibly huge, int).

        Sets of k tokens with a count in [floor, cap] per group: a product of binomials
        when floor == cap (paper mode: the product of group sizes), summed over the ways
        of spreading k over the groups otherwise.
        """
        ways = {0: 1}  # tokens kept so far -> number of partial sets
        for members, lo, hi in zip(self.members, self.floor, self.cap, strict=True):
            nxt: dict[int, int] = {}
            for kept, w in ways.items():
                for c in range(lo, min(hi, len(members)) + 1):
                    if kept + c <= self.k:
                        nxt[kept + c] = nxt.get(kept + c, 0) + w * math.comb(len(members), c)
            ways = nxt
        return ways.get(self.k, 0)

    @property
    def log10_size(self) -> float:
        """log10 of ``size``: how far beyond enumeration the space lies (exact: a big int's log)."""
        return math.log10(self.size)

    def contains(self, key: Sequence[int]) -> bool:
        """Whether a sorted index set is a candidate of this space (size k, counts in bounds)."""
        if len(key) != self.k or len(set(key)) != self.k:
            return False
        count = [0] * len(self.members)
        for t in key:
            count[self.group_of[t]] += 1
        return all(lo <= c <= hi for c, lo, hi in zip(count, self.floor, self.cap, strict=True))

    def enumerate(self) -> list[list[int]]:
        """Every candidate of the space (call it on small spaces only: see ``size``).

        Per group, every choice of a count in [floor, cap] members, the groups' choices
        concatenated in group order: in paper mode slot g holds a member of group g (the
        individual's layout there), in budget mode the list is sorted (a set of k tokens).
        """
        partial: list[tuple[int, tuple[int, ...]]] = [(0, ())]  # (tokens so far, chosen)
        for members, lo, hi in zip(self.members, self.floor, self.cap, strict=True):
            partial = [
                (kept + c, chosen + combo)
                for kept, chosen in partial
                for c in range(lo, min(hi, len(members)) + 1)
                if kept + c <= self.k
                for combo in itertools.combinations(members, c)
            ]
        full = [list(chosen) for kept, chosen in partial if kept == self.k]
        return (
            full if self.floor == self.cap == [1] * len(self.members) else [sorted(c) for c in full]
        )
