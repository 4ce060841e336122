"""How ``evocomp evaluate`` shows its result: ``plots/retention.csv`` and the printed table.

evocomp evaluate        # writes metrics/eval.json, plots/retention.csv, prints the table
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from evocomp.config import EvaluateParams
from evocomp.files import write_text_atomic


def write_plot(path: Path, result: dict) -> None:
    rows = [
        {"method": m, "ratio": float(r), "accuracy": acc, "retention": result["retention"][r][m]}
        for r, accs in result["ratios"].items()
        for m, acc in accs.items()
    ]
    table = pd.DataFrame(rows).sort_values(["method", "ratio"])
    write_text_atomic(path, table.to_csv(index=False))


def max_stderr(result: dict) -> float:
    """The largest standard error of any cell (eval.json's ``stderr``, ``stderr_l<l>``)."""
    cells = [
        se for k, v in result.items() if k.startswith("stderr") for row in v.values()
        for se in row.values()
    ]  # fmt: skip
    return max(cells, default=0.0)


def print_table(result: dict) -> str:
    # eval.json is written with sorted keys: restore the reading order (largest budget
    # first, the methods as params.yaml lists them)
    ratios = sorted(result["ratios"], key=float, reverse=True)
    present = list(next(iter(result["ratios"].values())))
    order = EvaluateParams.model_fields["methods"].default
    methods = [m for m in order if m in present] + [m for m in present if m not in order]
    width = max(len(m) for m in methods) + 4  # room for the "_l2" suffix
    lines = [
        f"full-token accuracy {result['full']:.3f} on {result['samples']} test samples "
        f"(prune layer {result['prune_layer']}); cells: accuracy (retention %); standard "
        f"errors up to {max_stderr(result):.3f}",
        f"{'method':<{width}}" + "".join(f"{'keep ' + r:>18}" for r in ratios),
    ]
    for m in methods:
        lines.append(
            f"{m:<{width}}"
            + "".join(
                f"{result['ratios'][r][m]:>10.3f} ({result['retention'][r][m]:5.1f})"
                for r in ratios
            )
        )
    if "paired" in result:  # the closest other method at each ratio, on the same samples
        cells = []
        for r in ratios:
            rival = max(
                (m for m in result["paired"][r] if m != "evocomp_fill"),
                key=lambda m, r=r: (result["ratios"][r][m], m),
            )
            d = result["paired"][r][rival]
            cells.append(f"{r}: {d['diff']:+.3f} ± {d['stderr']:.3f} vs {rival}")
        lines.append(
            "evocomp minus the best other method (paired standard error): " + "; ".join(cells)
        )
    for key in [k for k in result if k.startswith("ratios_l")]:
        layer, accs = key.removeprefix("ratios_l"), result[key]
        lines.append(
            f"the same, tokens dropped after LLM layer {layer} (the merging methods: l=0 only)"
        )
        for m in [m for m in methods if m in next(iter(accs.values()))]:
            ret = result[f"retention_l{layer}"]
            lines.append(
                f"{m + '_l' + layer:<{width}}"
                + "".join(f"{accs[r][m]:>10.3f} ({ret[r][m]:5.1f})" for r in ratios)
            )
    return "\n".join(lines)
