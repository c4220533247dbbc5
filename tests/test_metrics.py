"""Within-class diversity: mean pairwise cosine similarity."""

import torch

from lpld_ray.method.metrics import mean_pairwise_cosine


def test_identical_rows_have_cosine_one_and_orthogonal_rows_zero():
    assert abs(mean_pairwise_cosine(torch.ones(4, 3)) - 1.0) < 1e-9
    assert abs(mean_pairwise_cosine(torch.eye(3))) < 1e-9


def test_pairs_exclude_the_diagonal():
    rows = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # pairs: (0,1)=1, (0,2)=0, (1,2)=0 -> mean 1/3
    assert abs(mean_pairwise_cosine(rows) - 1 / 3) < 1e-9
