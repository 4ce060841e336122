"""Typed parameters, read once from ``params.yaml`` at the entry point.

Each pipeline stage has one pydantic model; unknown keys and wrong types are
refused with a message naming the key (``extra="forbid"``). ``params.yaml`` may
hold a ``profiles:`` mapping of named overrides; ``profile: NAME`` picks one, so
``dvc exp run -S profile=full`` switches settings without editing code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evocomp.errors import ParamsError

PROFILE_ENV = "EVOCOMP_PROFILE"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrepareParams(_Strict):
    """Where the samples come from and how they are split."""

    source: str = "synth"  # "synth" (built-in shapes-vqa) or a LLaVA .json / .jsonl path
    images_dir: str | None = None  # image folder of a user dataset (default: next to the file)
    n_images: int = Field(1000, ge=1)  # synth only
    questions_per_image: int = Field(1, ge=1, le=8)  # synth only: turns per conversation
    seed: int = 1  # synth only; differs from mllm.seed so the demo data is held out
    # synth only, held-out variants (None: the benchmark's own; evocomp/data/variants.py):
    objects: tuple[int, int] | None = None  # [min, max] objects per image
    background: Literal["plain", "noise", "texture"] | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _fractions(self) -> PrepareParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("prepare.val_fraction + prepare.test_fraction must be < 1")
        return self


class MLLMParams(_Strict):
    """The reference model recipe (two stages; see evocomp/mllm/reference.py)."""

    checkpoint: str = "models/mllm"  # a local checkpoint folder (LLaVA, Qwen2-VL, Qwen2.5-VL)
    # The prompt around the image, e.g. "USER: <image>\n{question} ASSISTANT:"; None: the
    # checkpoint's own (config.json's evocomp.prompt_template, else its chat template).
    prompt_template: str | None = None
    seed: int = 0
    n_images: int = Field(6000, ge=64)  # fixed training images, fresh question per step
    align_steps: int = Field(500, ge=0)  # 150 left ~12% of object tokens nearest a wrong shape word
    align_lr: float = Field(2e-3, gt=0)
    lm_steps: int = Field(3000, ge=1)  # warmup, then linear decay to 5% at the last step
    eval_every: int = Field(250, ge=1)  # held-out check: log + question-type weights
    val_images: int = Field(512, ge=16)
    lm_lr: float = Field(1e-3, gt=0)  # 2e-3 learnt slower (and stalled at a constant rate)
    align_batch_size: int = Field(64, ge=1)  # images per alignment step
    batch_size: int = Field(64, ge=1)  # (image, question) rows per LM step
    # scenes-vqa: after the curriculum, each of the batch_size rows is one image and lm_pack
    # questions, the image's tokens computed once for all (scenes_recipe.packed_batch)
    lm_pack: int = Field(1, ge=1)
    # max prob. of dropping an irrelevant token (1: all of them, as a selector at 1/9 may)
    drop_max: float = Field(1.0, ge=0.0, le=1.0)
    curriculum_steps: int = Field(500, ge=0)  # first LM steps drop most distractors
    qk_tied_init: bool = True  # W_k = W_q at init: attention starts word-matching
    lm_heads: int = Field(8, ge=1)  # of the 128-wide LM; 4 heads learnt slower and less surely
    eval_images: int = Field(1000, ge=10)
    threads: int = Field(2, ge=1)
    # Which built-in benchmark the reference model is for; the rest are scenes-vqa's only
    # (shapes-vqa's model is always 96 px, 2 + 2 layers: evocomp/mllm/reference.py).
    benchmark: Literal["shapes", "scenes"] = "shapes"
    # Backgrounds the training images are drawn on, each image one uniformly (None: the
    # benchmark's own only: shapes plain, scenes texture); see evocomp/data/variants.py.
    backgrounds: list[Literal["plain", "noise", "texture"]] | None = Field(None, min_length=1)
    grid: int = Field(12, ge=6, le=64)  # scenes-vqa patches per side
    lm_layers: int = Field(2, ge=1)
    vision_layers: int = Field(2, ge=1)
    vision_heads: int = Field(2, ge=1)
    # scenes-vqa: weight of the *lookup* term (0: off): probes on LM layer lookup_layer's
    # output, at the last word of each description that names one object, read that
    # object's centre row / column, colour and shape (scenes_recipe.lookup_loss)
    lookup_supervision: float = Field(0.0, ge=0)
    lookup_layer: int = Field(1, ge=1)  # < lm_layers: a later layer must read the lookup
    # scenes-vqa: weight of the *readout* term (0: off): where a spatial question's answer is
    # predicted, a probe on layer lookup_layer + 1 reads both named objects' centres
    # (scenes_recipe.readout_loss)
    readout_supervision: float = Field(0.0, ge=0)
    # scenes-vqa: weight of the *count* term (0: off): where a count question's answer is
    # predicted, a probe on layer lookup_layer's output reads the count (scenes_recipe.count_loss)
    count_supervision: float = Field(0.0, ge=0)
    # scenes-vqa: share of the subset steps (after the curriculum) whose rows are *sparse*:
    # every patch the answer needs and each other token with probability U(0, 0.2), the rows
    # a compressor at 1/9 hands the model (0: none, the recipe as before)
    sparse_share: float = Field(0.0, ge=0, le=1)
    # scenes-vqa: torch.compile the LM's training steps (the same recipe, reordered float
    # sums: a draw of its own, like another thread count; BENCHMARKS.md, scenes Reference model)
    compile: bool = False

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None and (v.count("<image>") != 1 or v.count("{question}") != 1):
            raise ValueError("needs exactly one <image> and one {question}")
        return v

    @model_validator(mode="after")
    def _batches(self) -> MLLMParams:
        if self.align_batch_size > self.n_images:
            raise ValueError("mllm.align_batch_size must be <= mllm.n_images (images per step)")
        if (self.lookup_supervision or self.readout_supervision or self.count_supervision) and (
            self.lookup_layer >= self.lm_layers
        ):
            raise ValueError(
                "mllm.lookup_layer must be < mllm.lm_layers (a later layer reads the lookup)"
            )
        if self.compile and self.benchmark != "scenes":
            raise ValueError(
                "mllm.compile: only the scenes-vqa recipe (benchmark: scenes) compiles"
            )
        return self


class RuntimeParams(_Strict):
    """Where models run."""

    device: str = "cpu"  # overridden by EVOCOMP_DEVICE or --device
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(64, ge=1)


# The selectors the label stage seeds and compares with (evocomp.baselines implements them,
# under these names) and every method `evocomp evaluate` runs (those plus the evaluation-only SparseVLM and PruMerge
# of evocomp.evaluation.guided, the compressor and the GA labels of the test split). Named
# here so a typo in params.yaml is refused when it is read, not half-way through a stage.
LABEL_HEURISTICS = ("random", "pooling", "fastv", "visionzip", "divprune", "dart")
EVAL_METHODS = ("random", "pooling", "fastv", "sparsevlm", "visionzip", "prumerge", "divprune",
                "dart", "evocomp", "evocomp_fill", "oracle")  # fmt: skip


def _known(names: tuple[str, ...], known: tuple[str, ...], key: str) -> tuple[str, ...]:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {key} {unknown[0]!r} (known: {', '.join(known)})")
    if len(set(names)) != len(names):
        raise ValueError(f"{key} lists a method twice")
    return names


class SearchParams(_Strict):
    """The DEAP genetic search, per sample (EvoComp paper, Sec. 3)."""

    mode: Literal["paper", "budget"] = "paper"
    population: int = Field(48, ge=2)
    parents: int = Field(12, ge=2)
    generations: int = Field(10, ge=0)
    cx_prob: float = Field(0.9, ge=0.0, le=1.0)
    mut_prob: float = Field(0.2, ge=0.0, le=1.0)
    keep_ratio: float = Field(1 / 3, gt=0.0, le=1.0)  # budget mode: k = round(ratio * N)
    seed_with_heuristics: bool = True
    heuristics: tuple[str, ...] = LABEL_HEURISTICS
    early_stop_patience: int | None = Field(None, ge=1)  # generations without improvement
    seeds: int = Field(1, ge=1)  # independent searches per sample (agreement = confidence)
    seed: int = 0
    # The label's per-token soft target (the compressor fits it when train.soft_labels):
    # elite = how often the final population's best sets keep each token; elimination = the
    # token's rank when the label is shrunk one least-costly token at a time (k - 1 more
    # forwards per sample; evocomp.search.worth).
    soft_target: Literal["elite", "elimination"] = "elite"
    # What a candidate is scored on: answer = the mean cross-entropy of the sample's answer
    # (the paper); distill = the mean KL divergence of the next-token distribution at the
    # answer's positions from the all-token one (answer-blind on a one-token answer: a set
    # that makes the model *surer* of the gold answer than all tokens do scores worse, not
    # better; README, Configuration).
    objective: Literal["answer", "distill"] = "answer"
    # A trained compressor's folder: its top tokens for each sample join the initial
    # population (warm start, e.g. labelling new data with the deployed compressor). The
    # run key holds the compressor's content, not this path (evocomp.search.ga.run_spec).
    warm_start: str | None = None

    @field_validator("heuristics")
    @classmethod
    def _heuristics(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _known(v, LABEL_HEURISTICS, "label.heuristics")

    @model_validator(mode="after")
    def _parents(self) -> SearchParams:
        if self.parents >= self.population:
            raise ValueError("label.parents must be < label.population (offspring need room)")
        return self


class LabelParams(SearchParams):
    """Which samples to label, on top of the search settings."""

    splits: tuple[Literal["train", "val", "test"], ...] = ("train", "val", "test")
    max_samples: int | None = Field(None, ge=1)  # per split, first in id order
    task_runner: Literal["thread", "dask"] = "thread"
    workers: int = Field(2, ge=1)
    # A worker's claim on a sample lapses this long after its last heartbeat (every third of
    # it): a killed worker's samples are taken over by the run's other workers after that.
    lease_seconds: float = Field(30.0, gt=0)
    # Other keep ratios to label, each as its own label set (``evocomp label --keep-ratio R``;
    # dvc.yaml's scenes_label_budget@R): the evaluation's oracle at R is the label searched
    # at R (``evaluate --labels`` x N); ``train --labels`` x N can train on them all.
    budgets: tuple[Annotated[float, Field(gt=0.0, le=1.0)], ...] = ()

    def search(self) -> SearchParams:
        fields = SearchParams.model_fields.keys()
        return SearchParams(**{k: getattr(self, k) for k in fields})


class TrainParams(_Strict):
    """The compressor and its loss (GHM-C + cosine separation)."""

    layers: int = Field(1, ge=1)
    heads: int | None = None  # default: the LLM's
    use_text: bool = True
    ghm_bins: int = Field(10, ge=1)
    ghm_momentum: float = Field(0.0, ge=0.0, lt=1.0)
    loss: Literal["ghm", "bce", "focal"] = "ghm"
    cos_alpha: float = Field(0.1, ge=0.0)
    focal_gamma: float = Field(2.0, ge=0.0)  # loss=focal: Lin et al. 2017's focusing exponent
    soft_labels: bool = False
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    patience: int = Field(10, ge=1)
    # early stopping on val top-k precision (ties: lower BCE), on val BCE alone, or on the
    # MLLM's answer loss on val from the compressor's top k (k = each val label's own size)
    monitor: Literal["precision", "loss", "answer_loss"] = "precision"
    seed: int = 0
    # trainings from seeds seed, seed + 1, ...; the one whose kept epoch the monitor scores
    # best is saved (a collapsed run is caught by answer_loss, not by precision or BCE)
    restarts: int = Field(1, ge=1)
    # the share of the train split's images (by a hash of the image, data.samples.
    # held_for_selection) left out of fitting and early stopping: evaluate.choose
    # select_answer_loss compares compressors there, on samples none of them was tuned on
    select_share: float = Field(0.0, ge=0.0, lt=1.0)


class EvaluateParams(_Strict):
    ratios: tuple[float, ...] = (0.5, 1 / 3, 1 / 4.5, 1 / 9)
    methods: tuple[str, ...] = EVAL_METHODS
    prune_layer: Literal[0, 2] = 0
    max_samples: int | None = Field(None, ge=1)
    seed: int = 0
    # several compressors (one per label budget): which serves a ratio. nearest: the one whose
    # labels' keep ratio is nearest by factor; val_answer_loss: the one whose top k gives the
    # lowest mean answer loss on the val split (harness.route_by_answer_loss; with train.monitor
    # answer_loss that split also early-stopped each compressor at its own ratio, so it leans
    # to each ratio's own); select_answer_loss: the same on the train images every compressor
    # left out (train.select_share), which none of them was fitted or stopped on
    choose: Literal["nearest", "val_answer_loss", "select_answer_loss"] = "nearest"

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _known(v, EVAL_METHODS, "evaluate.methods")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        for r in v:
            if not 0.0 < r <= 1.0:
                raise ValueError(f"keep ratio {r} is outside (0, 1]")
        return v


class AuditParams(_Strict):
    """The label audit's suspect rules (``evocomp.audit.suspects``; the dashboard's Label
    quality page). Losses are measured in units of the sample's *loss scale*: the worst
    heuristic's answer loss minus the full-token loss (at least ``loss_floor``)."""

    loss_floor: float = Field(0.01, gt=0)  # nats (1% answer probability): smaller is no scale
    max_heuristic_gap: float = Field(0.02, ge=0)  # label above the best heuristic by this: suspect
    max_excess: float = Field(0.5, ge=0)  # label above the full-token loss by this (scales)
    min_margin: float = Field(0.01, ge=0)  # runner-up within this (scales): arbitrary choice
    min_agreement: float = Field(0.5, ge=0, le=1)  # Jaccard across seeds (label.seeds > 1)
    min_room: float = Field(0.1, ge=0)  # margin / agreement / convergence count above this excess
    flag_score: float = Field(0.5, gt=0)  # a label whose score reaches this is flagged
    health_tolerance: float = Field(0.25, gt=0, le=1)  # bad-label share at which health is 0


class Params(_Strict):
    """Everything in params.yaml."""

    profile: str = "demo"
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    prepare: PrepareParams = PrepareParams()
    mllm: MLLMParams = MLLMParams()
    runtime: RuntimeParams = RuntimeParams()
    label: LabelParams = LabelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    audit: AuditParams = AuditParams()


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping, applying the selected profile's overrides."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level")
    # EVOCOMP_PROFILE (``evocomp --profile NAME``) wins over the file's ``profile``: a second
    # stage set in dvc.yaml runs another profile from the same params.yaml, and worker
    # processes inherit it.
    profile = os.environ.get(PROFILE_ENV) or raw.get("profile", "demo")
    raw = {**raw, "profile": profile}
    profiles = raw.get("profiles") or {}
    if profile != "demo" or profile in profiles:
        if profile not in profiles:
            known = ", ".join(["demo", *sorted(profiles)]) or "demo"
            raise ParamsError(f"{source}: unknown profile {profile!r} (known: {known})")
        raw = _merge(raw, profiles[profile] or {})
    try:
        return Params(**raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
        raise ParamsError(f"{source}: invalid parameters\n" + "\n".join(lines)) from None


def load_params(path: str | Path | None = None) -> Params:
    """Read and validate a params file.

    ``None`` reads ``./params.yaml``, or gives the defaults where there is none (outside a
    project); a path that was named must exist, so a typo never runs on defaults.
    """
    if path is None:
        path = Path("params.yaml")
        if not path.exists():
            return Params()
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, str(path))
