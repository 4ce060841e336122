"""The value a finished search hands to the store: one sample's label and its history."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LabelRecord:
    """One sample's label as written by :func:`evocomp.store.write_label`.

    Args:
        kept: sorted indices of the kept visual tokens.
        k: number of kept tokens (``len(kept)``).
        n_tokens: number of visual tokens of the sample.
        soft: (n_tokens,) how often each token is kept in the final elite, or None.
        groups: (n_tokens,) vocabulary group id of each token, or None.
        loss: answer cross-entropy with only ``kept`` tokens.
        full_loss: answer cross-entropy with all tokens.
        heuristic_losses: loss of each heuristic selector at the same k, by method name.
        margin: loss of the best *different* elite candidate minus ``loss`` (small = unsure).
        agreement: mean Jaccard overlap of the labels of independent searches (``label.seeds`` > 1), else None.
        n_groups: number of vocabulary groups.
        converged_gen: first generation that reached the final best loss.
        n_forwards: batched model forwards the search spent.
        seconds: wall time of the search.
        logbook: one dict per generation with keys gen, nevals, min, avg, max, std.
        elite: final elite as (kept indices, loss), best first.
        heuristic_kept: each heuristic's kept indices at the same k, by method name, or None.
        group_words: the vocabulary word of each group (index = group id), or None.
    """

    kept: list[int]
    k: int
    n_tokens: int
    soft: list[float] | None = None
    groups: list[int] | None = None
    loss: float | None = None
    full_loss: float | None = None
    heuristic_losses: dict[str, float] = field(default_factory=dict)
    margin: float | None = None
    agreement: float | None = None
    n_groups: int | None = None
    converged_gen: int | None = None
    n_forwards: int | None = None
    seconds: float | None = None
    logbook: list[dict[str, float]] = field(default_factory=list)
    elite: list[tuple[list[int], float]] = field(default_factory=list)
    heuristic_kept: dict[str, list[int]] | None = None
    group_words: list[str] | None = None
