"""The genetic search that labels one sample (EvoComp paper, Sec. 3).

- :mod:`evocomp.search.space`: :class:`SearchSpace`, the candidates of one sample;
- :mod:`evocomp.search.operators`: repair, crossover and mutation within a space;
- :mod:`evocomp.search.ga`: the DEAP loop, :func:`search` over a space and
  :func:`search_sample` from tokens and group labels.
"""

from evocomp.search.ga import ALGORITHM_VERSION, SearchResult, run_spec, search, search_sample
from evocomp.search.space import SearchSpace, group_quotas

__all__ = [
    "ALGORITHM_VERSION",
    "SearchResult",
    "SearchSpace",
    "group_quotas",
    "run_spec",
    "search",
    "search_sample",
]
