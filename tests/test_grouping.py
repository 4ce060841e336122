"""Vocabulary-based grouping: nearest word by cosine, chunked; dense group ids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evocomp.features.grouping import group_ids, groups_as_lists, nearest_vocab


def _dense_nearest(tokens: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    return (F.normalize(tokens, dim=-1) @ F.normalize(vocab, dim=-1).T).argmax(dim=1)


def test_known_nearest_words_by_cosine_not_dot_product():
    vocab = torch.eye(4) * torch.tensor([[1.0], [1.0], [1.0], [100.0]])  # word 3 has a huge norm
    tokens = torch.tensor(
        [
            [2.0, 0.1, 0.0, 0.5],  # word 0 (dot product would pick word 3)
            [0.0, 0.0, 3.0, 0.2],  # word 2
            [0.1, 5.0, 0.0, 0.0],  # word 1
            [0.0, 0.0, 0.0, 0.1],  # word 3
        ]
    )
    assert nearest_vocab(tokens, vocab).tolist() == [0, 2, 1, 3]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 4096])
def test_chunking_gives_the_dense_answer(chunk):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(20, 16, generator=g)
    vocab = torch.randn(90, 16, generator=g)
    out = nearest_vocab(tokens, vocab, chunk=chunk)
    assert out.dtype == torch.long
    assert torch.equal(out, _dense_nearest(tokens, vocab))


def test_low_precision_tokens_are_compared_in_float32():
    g = torch.Generator().manual_seed(1)
    vocab = torch.randn(100, 32, generator=g)
    tokens = vocab[[5, 17, 99]] * 0.5
    assert nearest_vocab(tokens.bfloat16(), vocab.bfloat16(), chunk=16).tolist() == [5, 17, 99]


def test_ties_across_chunks_go_to_the_lowest_id():
    vocab = torch.randn(12, 6, generator=torch.Generator().manual_seed(2))
    vocab[9] = vocab[2] * 3.0  # same direction: identical cosine
    assert nearest_vocab(vocab[2:3], vocab, chunk=4).tolist() == [2]


def test_empty_token_set_gives_empty_ids():
    out = nearest_vocab(torch.zeros(0, 8), torch.randn(5, 8))
    assert out.shape == (0,) and out.dtype == torch.long


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tokens_are_refused(bad):
    tokens = torch.randn(4, 8)
    tokens[2, 3] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        nearest_vocab(tokens, torch.randn(5, 8))


def test_dimension_mismatch_and_empty_vocab_are_refused():
    with pytest.raises(ValueError, match="dimension"):
        nearest_vocab(torch.randn(4, 8), torch.randn(5, 9))
    with pytest.raises(ValueError, match="empty"):
        nearest_vocab(torch.randn(4, 8), torch.zeros(0, 8))
    with pytest.raises(ValueError, match="NaN/Inf"):
        nearest_vocab(torch.randn(4, 8), torch.full((5, 8), float("nan")))


@pytest.mark.parametrize(
    ("nearest", "expected"),
    [
        ([7, 3, 7, 5, 3], [0, 1, 0, 2, 1]),  # order of first appearance, not of value
        ([4, 4, 4], [0, 0, 0]),  # single group
        ([9, 1, 5, 2], [0, 1, 2, 3]),  # every token its own group
        ([-3, 2, -3], [0, 1, 0]),
        ([], []),
    ],
)
def test_group_ids_are_dense_in_first_appearance_order(nearest, expected):
    out = group_ids(torch.tensor(nearest, dtype=torch.long))
    assert out.dtype == torch.long
    assert out.tolist() == expected


def test_groups_as_lists_round_trip():
    gids = group_ids(torch.tensor([7, 3, 7, 5, 3]))
    assert groups_as_lists(gids) == [[0, 2], [1, 4], [3]]
    assert groups_as_lists(torch.zeros(0, dtype=torch.long)) == []


def test_groups_as_lists_refuses_sparse_ids():
    with pytest.raises(ValueError, match="not dense"):
        groups_as_lists(torch.tensor([0, 2, 2]))
