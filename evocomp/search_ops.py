"""The genetic operators of the search: group quotas, repair, crossover, mutation.

DEAP naming (``cx*``, ``mut*``); individuals are lists of token indices. In
``paper`` mode slot g holds a member of group g; in ``budget`` mode an
individual is a set of k indices whose per-group counts respect the quotas
(:func:`group_quotas`), restored after every variation by :func:`repair`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


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
class _Space:
    """The search space of one sample: groups, and per-group bounds in budget mode."""

    members: list[list[int]]  # per group, ascending token indices
    group_of: list[int]  # per token
    k: int
    floor: list[int]  # budget mode: at least this many kept per group ...
    cap: list[int]  # ... and at most this many (floor == cap == quota when k >= G)

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


# ---- operators --------------------------------------------------------------------------


def repair(tokens, space: _Space, rng: random.Random, prefer: Sequence[int] = ()) -> list[int]:
    """Exactly k distinct tokens within every group's [floor, cap], changing few.

    Tokens are dropped from over-full groups and added to short ones at random,
    taking additions from ``prefer`` (e.g. the parents' union) before others.
    """
    kept = set(tokens)
    count = [0] * len(space.members)
    for t in kept:
        count[space.group_of[t]] += 1
    for g, members in enumerate(space.members):
        if count[g] > space.cap[g]:
            drop = rng.sample(sorted(t for t in members if t in kept), count[g] - space.cap[g])
            kept.difference_update(drop)
            count[g] = space.cap[g]
    pref_set = set(prefer) - kept
    pref = sorted(pref_set)
    rng.shuffle(pref)
    rest = [t for t in range(len(space.group_of)) if t not in kept and t not in pref_set]
    rng.shuffle(rest)
    pool = pref + rest  # additions, preferred first
    for t in pool:  # groups below their floor
        g = space.group_of[t]
        if count[g] < space.floor[g]:
            kept.add(t)
            count[g] += 1
    if len(kept) > space.k:  # only when floor < cap (k < G): drop any beyond the budget
        extra = sorted(kept)
        rng.shuffle(extra)
        for t in extra[: len(kept) - space.k]:
            kept.discard(t)
            count[space.group_of[t]] -= 1
    for t in pool:  # fill up to k where groups have room
        if len(kept) == space.k:
            break
        g = space.group_of[t]
        if t not in kept and count[g] < space.cap[g]:
            kept.add(t)
            count[g] += 1
    return sorted(kept)


def cxHalf(ind1: list[int], ind2: list[int]) -> tuple[list[int], list[int]]:
    """Paper crossover: swap the second half of the group slots between two parents."""
    half = len(ind1) // 2
    ind1[half:], ind2[half:] = ind2[half:], ind1[half:]
    return ind1, ind2


def mutWithinGroup(ind: list[int], space: _Space, indpb: float, rng: random.Random):
    """Paper mutation: per group, with prob. indpb, move to another member of the group.

    The new member is drawn uniformly from the group. Moving only to the
    index-adjacent member (a stricter reading of "neighbour") recovered a planted
    optimum far less often within 10 generations (N=64, 8 groups: 5/30 vs 17/30).
    """
    for g, members in enumerate(space.members):
        if len(members) > 1 and rng.random() < indpb:
            j = rng.randrange(len(members) - 1)  # uniform over the other members
            ind[g] = members[j + (j >= members.index(ind[g]))]
    return (ind,)


def cxSet(ind1: list[int], ind2: list[int], space: _Space, rng: random.Random):
    """Budget crossover: each child = both parents' common tokens + a fill from the union."""
    common = set(ind1) & set(ind2)
    union = sorted(set(ind1) | set(ind2))
    ind1[:] = repair(common, space, rng, prefer=union)
    ind2[:] = repair(common, space, rng, prefer=union)
    return ind1, ind2


def mutSwap(ind: list[int], space: _Space, indpb: float, rng: random.Random):
    """Budget mutation: per represented group, with prob. indpb, swap a kept token out."""
    kept = set(ind)
    count = [0] * len(space.members)
    for t in kept:
        count[space.group_of[t]] += 1
    for g, members in enumerate(space.members):
        if count[g] == 0 or rng.random() >= indpb:
            continue
        out = rng.choice(sorted(t for t in members if t in kept))
        may_leave = count[g] - 1 >= space.floor[g]  # quotas allow moving to another group
        pool = [
            t
            for t in range(len(space.group_of))
            if t not in kept
            and (
                space.group_of[t] == g
                or (may_leave and count[space.group_of[t]] < space.cap[space.group_of[t]])
            )
        ]
        if pool:
            new = rng.choice(pool)
            kept.discard(out)
            kept.add(new)
            count[g] -= 1
            count[space.group_of[new]] += 1
    ind[:] = sorted(kept)
    return (ind,)


# ---- scoring ----------------------------------------------------------------------------
