from __future__ import annotations

import pytest
import yaml

from evocomp.config import Params, load_params, parse_params
from evocomp.errors import ParamsError


def test_repo_params_are_valid(repo_root):
    p = load_params(repo_root / "params.yaml")
    # the paper's search settings; the demo labels in budget mode (params.yaml says why)
    assert p.label.mode == "budget" and p.label.population == 48 and p.label.generations == 10
    assert p.label.keep_ratio == pytest.approx(1 / 9, abs=1e-3) and p.train.soft_labels


@pytest.mark.parametrize("profile", ["full", "tiny"])
def test_profiles_apply(repo_root, profile):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["profile"] = profile
    p = parse_params(raw)
    assert p.prepare.n_images == raw["profiles"][profile]["prepare"]["n_images"]
    assert p.label.population == raw["profiles"][profile].get("label", {}).get("population", 48)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"label": {"generatons": 5}}, r"label\.generatons: Extra inputs"),
        ({"label": {"generations": "many"}}, r"label\.generations"),
        ({"label": {"mode": "greedy"}}, r"label\.mode"),
        ({"label": {"population": 8, "parents": 8}}, "parents must be < label.population"),
        ({"evaluate": {"ratios": [0.5, 1.5]}}, r"outside \(0, 1\]"),
        ({"prepare": {"val_fraction": 0.6, "test_fraction": 0.5}}, "must be < 1"),
        ({"profile": "huge"}, "unknown profile 'huge'"),
        ({"trian": {}}, "trian"),
        ({"evaluate": {"methods": ["fastv", "sparsvlm"]}}, "unknown evaluate.methods 'sparsvlm'"),
        ({"evaluate": {"methods": ["dart", "dart"]}}, "evaluate.methods lists a method twice"),
        # SparseVLM is evaluation-only: the label stage cannot seed with it
        ({"label": {"heuristics": ["fastv", "sparsevlm"]}}, "unknown label.heuristics 'sparsevlm'"),
        ({"train": {"restarts": 0}}, r"train\.restarts"),
        ({"train": {"monitor": "accuracy"}}, r"train\.monitor"),
    ],
)
def test_bad_params_name_the_key(raw, match):
    with pytest.raises(ParamsError, match=match):
        parse_params(raw)


def test_bad_yaml(tmp_path):
    (tmp_path / "p.yaml").write_text("label: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "p.yaml")


def test_a_named_missing_file_is_an_error_none_gives_defaults(tmp_path, monkeypatch):
    with pytest.raises(ParamsError, match="none.yaml: params file not found"):
        load_params(tmp_path / "none.yaml")
    monkeypatch.chdir(tmp_path)  # no ./params.yaml: the defaults
    assert load_params() == Params()


def test_the_method_lists_agree_with_the_code():
    from evocomp.baselines import HEURISTICS, NEEDS
    from evocomp.config import EVAL_METHODS
    from evocomp.evaluation.guided import MERGERS

    assert set(NEEDS) == set(HEURISTICS)  # every named heuristic is implemented
    assert set(MERGERS) <= set(EVAL_METHODS)
    learned = {"evocomp", "evocomp_fill", "oracle"}
    assert set(EVAL_METHODS) == {*HEURISTICS, "sparsevlm", "prumerge", *learned}
