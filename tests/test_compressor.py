"""The token compressor: shapes, masking, top-k, save/load, training and a behaviour threshold."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F

from evocomp.compress.fit import Item, best_epoch, collate, fit_compressor
from evocomp.compress.model import (
    PAD_LOGIT,
    CompressorConfig,
    TokenCompressor,
    load_compressor,
    save_compressor,
    select_topk,
)
from evocomp.config import TrainParams

D = 16


def _model(**kw) -> TokenCompressor:
    torch.manual_seed(0)
    return TokenCompressor(CompressorConfig(dim=D, max_grid=8, **kw)).eval()


def _inputs(B: int = 2, N: int = 10, T: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    visual = torch.randn(B, N, D, generator=gen)
    grid_pos = torch.randint(0, 8, (B, N, 2), generator=gen)
    text = torch.randn(B, T, D, generator=gen)
    return visual, grid_pos, text


# --- model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [None, 24])
@pytest.mark.parametrize("layers", [1, 2])
def test_output_shapes(width, layers):
    model = _model(width=width, layers=layers)
    visual, grid_pos, text = _inputs()
    out = model(visual, grid_pos, None, text)
    assert out.logits.shape == (2, 10)
    assert out.hidden.shape == (2, 10, width or D)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.hidden).all()


@pytest.mark.parametrize("training", [False, True])
def test_padding_does_not_change_valid_logits(training):
    model = _model()
    model.train(training)  # dropout is 0, so train mode is deterministic too
    visual, grid_pos, text = _inputs(B=1, N=6, T=3)
    alone = model(visual, grid_pos, None, text).logits
    # the same item padded to N=10, T=5 with noise in the padding, next to another item
    v2, g2, t2 = _inputs(B=2, N=10, T=5, seed=1)
    v2[0, :6], g2[0, :6], t2[0, :3] = visual[0], grid_pos[0], text[0]
    vmask = torch.ones(2, 10, dtype=torch.bool)
    vmask[0, 6:] = False
    tmask = torch.ones(2, 5, dtype=torch.bool)
    tmask[0, 3:] = False
    padded = model(v2, g2, vmask, t2, tmask).logits
    torch.testing.assert_close(padded[0, :6], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.all(padded[0, 6:] == PAD_LOGIT)


def test_item_without_any_valid_token_gives_no_nan():
    model = _model()
    visual, grid_pos, _ = _inputs(B=2, N=5)
    vmask = torch.ones(2, 5, dtype=torch.bool)
    vmask[1] = False
    out = model(visual, grid_pos, vmask, torch.zeros(2, 0, D))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.hidden).all()
    assert torch.all(out.logits[1] == PAD_LOGIT)


def test_text_is_used_unless_ablated():
    visual, grid_pos, text = _inputs()
    other_text = torch.randn_like(text)
    with_text = _model()
    assert not torch.allclose(
        with_text(visual, grid_pos, None, text).logits,
        with_text(visual, grid_pos, None, other_text).logits,
    )
    no_text = _model(use_text=False)
    torch.testing.assert_close(
        no_text(visual, grid_pos, None, text).logits,
        no_text(visual, grid_pos, None, other_text).logits,
    )
    torch.testing.assert_close(
        no_text(visual, grid_pos).logits, no_text(visual, grid_pos, None, text).logits
    )


def test_the_answer_is_not_an_input():
    params = inspect.signature(TokenCompressor.forward).parameters
    assert list(params) == ["self", "visual", "grid_pos", "visual_mask", "text", "text_mask"]
    assert {f.name for f in dataclasses.fields(Item)} == {
        "visual",
        "grid_pos",
        "text",
        "target",
        "soft",
    }


def test_grid_position_out_of_range_is_refused():
    visual, grid_pos, text = _inputs()
    grid_pos[0, 0, 1] = 8
    with pytest.raises(ValueError, match="grid positions must lie in"):
        _model()(visual, grid_pos, None, text)


def test_config_round_trip_and_defaults():
    cfg = CompressorConfig(dim=12)
    assert (cfg.width, cfg.heads, cfg.ffn) == (12, 4, 48)
    assert CompressorConfig.from_dict(cfg.to_dict()) == cfg
    assert CompressorConfig(dim=10).heads == 5  # largest divisor <= 8
    with pytest.raises(ValueError, match="not divisible by heads"):
        CompressorConfig(dim=12, heads=5)
    with pytest.raises(ValueError, match="unknown compressor config keys"):
        CompressorConfig.from_dict({"dim": 4, "colour": "red"})


# --- select_topk ---------------------------------------------------------------------------

LOGITS = torch.tensor([0.5, -1.0, 3.0, 2.0, 0.0, 1.0])  # ranking: 2, 3, 5, 0, 4, 1


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"k": 1}, [2]),
        ({"k": 6}, [0, 1, 2, 3, 4, 5]),
        ({"ratio": 1.0}, [0, 1, 2, 3, 4, 5]),
        ({"ratio": 0.5}, [2, 3, 5]),
        ({"ratio": 1 / 3}, [2, 3]),
        ({"ratio": 0.01}, [2]),  # never fewer than one token
    ],
)
def test_select_topk(kw, expected):
    idx = select_topk(LOGITS, **kw)
    assert idx.dtype == torch.long
    assert idx.tolist() == expected


def test_select_topk_batched_rows_are_sorted():
    logits = torch.stack([LOGITS, -LOGITS])
    assert select_topk(logits, k=2).tolist() == [[2, 3], [1, 4]]


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_select_topk_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        select_topk(LOGITS, ratio=ratio)


@pytest.mark.parametrize("kw", [{"k": 0}, {"k": 7}, {}, {"k": 2, "ratio": 0.5}])
def test_select_topk_bad_k(kw):
    with pytest.raises(ValueError, match="select_topk"):
        select_topk(LOGITS, **kw)


# --- save / load ---------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = _model(width=24, layers=2)
    extra = {"labels_hash": "abc123", "model_id": "tiny-llava"}
    save_compressor(model, tmp_path / "c", extra)
    loaded, got_extra = load_compressor(tmp_path / "c")
    assert got_extra == extra and not loaded.training
    assert loaded.cfg == model.cfg
    visual, grid_pos, text = _inputs()
    assert torch.equal(
        loaded(visual, grid_pos, None, text).logits, model(visual, grid_pos, None, text).logits
    )
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_load_missing_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_compressor(tmp_path / "nowhere")
    save_compressor(_model(), tmp_path / "c", {})
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_compressor(tmp_path / "c")


def test_save_refuses_unserialisable_extra(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_compressor(_model(), tmp_path / "c", {"bad": object()})
    assert not (tmp_path / "c" / "config.json").exists()


# --- training ------------------------------------------------------------------------------


def make_items(n: int, seed: int, N: int = 24, T: int = 2, k: int = 6, noise: float = 0.1):
    """A token is kept iff it is a noisy copy of one of the question's text vectors.

    Every vector is uniform on the sphere, so nothing but the comparison with the text tells
    kept from dropped tokens; the grid positions are random.
    """
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        text = F.normalize(torch.randn(T, D, generator=gen), dim=-1)
        visual = F.normalize(torch.randn(N, D, generator=gen), dim=-1)
        kept = torch.randperm(N, generator=gen)[:k]
        near = text[torch.randint(0, T, (k,), generator=gen)]
        visual[kept] = F.normalize(near + noise * torch.randn(k, D, generator=gen), dim=-1)
        target = torch.zeros(N)
        target[kept] = 1.0
        cells = torch.randperm(25, generator=gen)[:N]
        grid_pos = torch.stack([cells // 5, cells % 5], -1)
        items.append(Item(visual, grid_pos, text, target, soft=target * 0.8 + 0.1))
    return items


def _precision(model: TokenCompressor, items: list[Item]) -> float:
    b = collate(items)
    with torch.no_grad():
        logits = model(b.visual, b.grid_pos, b.visual_mask, b.text, b.text_mask).logits
    hits = [
        float(it.target[select_topk(row, k=int(it.target.sum()))].mean())
        for row, it in zip(logits, items, strict=True)
    ]
    return sum(hits) / len(hits)


def test_collate_pads_variable_sizes():
    items = make_items(2, 0)
    items[1] = Item(
        items[1].visual[:20], items[1].grid_pos[:20], items[1].text[:1], items[1].target[:20]
    )
    b = collate(items, soft=True)
    assert b.visual.shape == (2, 24, D) and b.text.shape == (2, 2, D)
    assert b.visual_mask.sum(1).tolist() == [24, 20] and b.text_mask.sum(1).tolist() == [2, 1]
    torch.testing.assert_close(b.target[0], items[0].soft)
    torch.testing.assert_close(b.target[1, :20], items[1].target)  # no soft label: the hard one


@pytest.mark.parametrize("monitor", ["precision", "loss"])
def test_fit_is_deterministic_and_restores_the_best_epoch(monitor):
    torch.set_num_threads(1)
    train, val = make_items(48, 0), make_items(16, 1)
    params = TrainParams(epochs=8, patience=3, batch_size=16, lr=3e-3, heads=1, monitor=monitor)
    rng_before = torch.get_rng_state()
    model, history = fit_compressor(train, val, params)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    model2, history2 = fit_compressor(train, val, params)
    assert history == history2
    assert set(history[0]) >= {"epoch", "train_loss", "val_loss", "val_precision"}
    assert [row["epoch"] for row in history] == list(range(1, len(history) + 1))
    best = best_epoch(history, monitor)  # the one rule, also behind metrics/train.json
    if monitor == "loss":
        assert best["val_loss"] == min(r["val_loss"] for r in history)
    else:  # highest validation precision, then lowest BCE
        assert best == min(history, key=lambda r: (-r["val_precision"], r["val_loss"]))
    # the returned weights are that epoch's
    b = collate(val)
    with torch.no_grad():
        logits = model(b.visual, b.grid_pos, b.visual_mask, b.text, b.text_mask).logits
    bce = F.binary_cross_entropy_with_logits(logits[b.visual_mask], b.target[b.visual_mask])
    assert bce.item() == pytest.approx(best["val_loss"], rel=1e-5)
    assert not model.training


def test_the_two_monitors_can_pick_different_epochs():
    """The bug this rule fixes: a report by precision while the weights came by loss."""
    history = [
        {"epoch": 1, "train_loss": 0.5, "val_loss": 0.30, "val_precision": 0.50},
        {"epoch": 2, "train_loss": 0.4, "val_loss": 0.21, "val_precision": 0.55},
        {"epoch": 3, "train_loss": 0.3, "val_loss": 0.22, "val_precision": 0.61},
    ]
    assert best_epoch(history, "loss")["epoch"] == 2
    assert best_epoch(history, "precision")["epoch"] == 3
    no_val = [r | {"val_loss": None, "val_precision": None} for r in history]
    assert best_epoch(no_val, "loss")["epoch"] == best_epoch(no_val, "precision")["epoch"] == 3


def test_the_answer_loss_monitor_keeps_the_epoch_the_mllm_scores_best():
    """train.monitor answer_loss: the callback (the MLLM's loss from the top k) decides the
    kept epoch, whatever the validation BCE says; the weights restored are that epoch's."""
    torch.set_num_threads(1)
    train, val = make_items(48, 0), make_items(16, 1)
    calls, scores = [], [0.9, 0.4, 0.7, 0.5, 0.8, 0.6]

    def answer_loss(model):  # called once per epoch, on the model in eval mode
        assert not model.training
        calls.append(copy.deepcopy(model.state_dict()))
        return scores[len(calls) - 1]

    params = TrainParams(epochs=6, patience=6, batch_size=16, lr=3e-3, heads=1)
    model, history = fit_compressor(
        train, val, params.model_copy(update={"monitor": "answer_loss"}), answer_loss=answer_loss
    )
    assert [r["val_answer_loss"] for r in history] == scores
    assert best_epoch(history, "answer_loss")["epoch"] == 2
    assert best_epoch(history, "loss")["epoch"] != 2  # the BCE would have kept another one
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, calls[1][name])
    # early stopping counts the callback's epochs: no better score for 2 epochs -> stop at 4
    calls.clear()
    _, short = fit_compressor(
        train,
        val,
        params.model_copy(update={"monitor": "answer_loss", "patience": 2}),
        answer_loss=answer_loss,
    )
    assert len(short) == 4
    with pytest.raises(ValueError, match="answer-loss callback"):
        fit_compressor(train, val, params.model_copy(update={"monitor": "answer_loss"}))
    _, plain = fit_compressor(train, val, params)  # without the monitor: no such column
    assert "val_answer_loss" not in plain[0]


@pytest.mark.parametrize("loss", ["ghm", "bce", "focal"])
def test_fit_options_run(loss):
    torch.set_num_threads(1)
    train = make_items(16, 0)
    params = TrainParams(epochs=2, batch_size=8, loss=loss, soft_labels=True, ghm_momentum=0.75)
    model, history = fit_compressor(train, [], params)
    assert len(history) == 2 and history[-1]["val_loss"] is None
    assert model.cfg.use_text


def test_fit_refuses_bad_items():
    train = make_items(4, 0)
    with pytest.raises(ValueError, match="no training items"):
        fit_compressor([], train, TrainParams())
    bad = [
        *train,
        Item(
            torch.zeros(3, D + 1),
            torch.zeros(3, 2, dtype=torch.long),
            torch.zeros(1, D + 1),
            torch.zeros(3),
        ),
    ]
    with pytest.raises(ValueError, match="train item 4"):
        fit_compressor(bad, [], TrainParams(epochs=1))
    no_soft = [dataclasses.replace(it, soft=None) for it in train]
    with pytest.raises(ValueError, match="no soft label"):
        fit_compressor(no_soft, [], TrainParams(epochs=1, soft_labels=True))


def test_trained_compressor_beats_random_on_held_out_items():
    """Behaviour: the label depends on the question, and the compressor learns to read it."""
    torch.set_num_threads(1)
    train, val, test = make_items(256, 0), make_items(64, 1), make_items(128, 2)
    # heads=1: the similarity is a 16-dim dot product; four 4-dim heads only see slices of it
    params = TrainParams(epochs=80, patience=15, lr=3e-3, heads=1, seed=0)
    model, history = fit_compressor(train, val, params)
    random_precision = 6 / 24
    assert _precision(model, test) >= 0.8 > random_precision + 0.5
    assert max(row["val_precision"] for row in history) >= 0.8
    # without the text the task is unlearnable: the ablation stays near random
    blind, _ = fit_compressor(
        train, val, params.model_copy(update={"use_text": False, "epochs": 30})
    )
    assert _precision(blind, test) < 0.45


def test_near_chance_warns_only_near_a_random_ranking():
    from evocomp.cli.train import near_chance

    msg = near_chance({"val_precision": 0.132, "val_precision_chance": 0.111})
    assert msg and "0.132" in msg and "0.111" in msg and "\n" not in msg
    assert near_chance({"val_precision": 0.331, "val_precision_chance": 0.111}) is None
    assert near_chance({"val_precision": 0.15, "val_precision_chance": 0.1})  # 1.5x: warns
    # no validation split: nothing to compare
    assert near_chance({"val_precision": None, "val_precision_chance": None}) is None


def test_chance_precision_counts_the_items_val_precision_counts():
    from evocomp.compress.training import chance_precision

    a, b, empty = make_items(3, 0, N=24, k=6)
    b.target[:] = 0.0
    b.target[:3] = 1.0  # keeps 3 of 24
    empty.target[:] = 0.0  # keeps nothing: val precision skips it, so does chance
    assert chance_precision([a, b, empty]) == pytest.approx((6 / 24 + 3 / 24) / 2)
    assert chance_precision([empty]) is None and chance_precision([]) is None
