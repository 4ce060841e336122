"""SparseVLM's rater scores and PruMerge's importance + merge (evocomp.evaluation.guided)."""

from __future__ import annotations

import pytest
import torch

from evocomp.evaluation.guided import neighbours_for, prumerge, rater_scores


def test_raters_are_the_rows_that_look_at_the_image():
    # rows 0 and 2 put most attention on the image (the raters); row 1 barely looks at it
    att = torch.tensor([[0.6, 0.2, 0.0], [0.0, 0.0, 0.05], [0.4, 0.4, 0.1]])
    torch.testing.assert_close(rater_scores(att), torch.tensor([0.5, 0.3, 0.05]))
    # one row: its own attention (FastV's score when only the last token follows the image)
    torch.testing.assert_close(rater_scores(att[2:]), att[2])


def test_rater_scores_ignore_float_noise_in_the_rater_choice():
    att = torch.tensor([[0.5, 0.5], [0.5, 0.5 + 1e-9]])  # equal masses up to noise: both rate
    torch.testing.assert_close(rater_scores(att), att.mean(0))


@pytest.mark.parametrize("bad", [torch.zeros(0, 3), torch.zeros(3), torch.tensor([[float("nan")]])])
def test_rater_scores_refuse_bad_attention(bad):
    with pytest.raises(ValueError, match="attention"):
        rater_scores(bad)


def _tokens(n: int = 36, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(n, generator=g)
    return torch.randn(n, d, generator=g), attn / attn.sum()


@pytest.mark.parametrize("k", [1, 2, 4, 12, 35, 36])
def test_prumerge_gives_k_tokens_at_distinct_sorted_positions(k):
    tok, attn = _tokens()
    emb, pos = prumerge(tok, attn, k)
    assert emb.shape == (k, 8) and pos.shape == (k,)
    assert torch.equal(pos, pos.sort().values) and pos.unique().numel() == k
    assert torch.isfinite(emb).all()


def test_prumerge_keeps_the_top_attention_tokens_merged_with_their_neighbours():
    tok, attn = _tokens()
    k, m = 5, neighbours_for(36)
    emb, pos = prumerge(tok, attn, k)
    top = torch.argsort(attn, descending=True)
    assert set(pos.tolist()) == set(top[: k - 1].tolist()) | {int(top[k - 1])}
    i = int(top[0])  # the most attended token, merged with its m most similar others
    unit = torch.nn.functional.normalize(tok, dim=-1)
    sim = unit @ unit[i]
    sim[i] = -2
    near = torch.argsort(sim, descending=True)[:m]
    members = torch.cat([torch.tensor([i]), near])
    want = (attn[members, None] * tok[members]).sum(0) / attn[members].sum()
    torch.testing.assert_close(emb[pos.tolist().index(i)], want)
    # the last slot: every pruned token's attention-weighted mean, at the best pruned position
    pruned = top[k - 1 :]
    want = (attn[pruned, None] * tok[pruned]).sum(0) / attn[pruned].sum()
    torch.testing.assert_close(emb[pos.tolist().index(int(top[k - 1]))], want)


def test_prumerge_keep_all_and_zero_neighbours_return_the_tokens():
    tok, attn = _tokens()
    emb, pos = prumerge(tok, attn, 36, neighbours=0)
    assert torch.equal(pos, torch.arange(36))
    torch.testing.assert_close(emb, tok)


def test_prumerge_refuses_bad_arguments():
    tok, attn = _tokens()
    with pytest.raises(ValueError, match="k must be"):
        prumerge(tok, attn, 0)
    with pytest.raises(ValueError, match="must agree"):
        prumerge(tok, attn[:5], 3)
    with pytest.raises(ValueError, match="NaN"):
        prumerge(tok, attn.clone().fill_(float("nan")), 3)


def test_neighbours_scale_with_the_token_count():
    assert neighbours_for(576) == 32 and neighbours_for(144) == 8 and neighbours_for(36) == 2
    assert neighbours_for(4) == 1
