"""Do the searched masks follow the clients' data? Pure functions on boolean flat masks.

A mask that personalizes keeps different positions for clients with different data. Three readings:
how much two clients' kept positions overlap (`kept_overlap`; two random masks of a half budget
overlap about 50 %), how much each overlaps the mask any client would get without data (the top-k of
|theta_0|, the seeded adapter every client starts from: `data_free_mask`), and whether mask
similarity goes with data similarity across client pairs (`pair_correlation`, and whether that
correlation is more than chance: `pair_correlation_p`).

Under Eq. 6 (`shared`) a client's value at a kept position is the mean over every client keeping
it, so masks that overlap leave each client few values of its own (`position_sharing`).

A mask can differ from client to client and still not personalize the model's function. The test of
that is cross-evaluation: every client's model on every client's held-out rows
(`own_model_advantage`)."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import torch

from perfit.core.search import top_k_mask


def kept_overlap(first: torch.Tensor, second: torch.Tensor) -> float:
    """|first AND second| / |first|: the share of `first`'s kept positions that `second` keeps too."""
    if first.shape != second.shape:
        raise ValueError(f"masks differ in shape: {tuple(first.shape)} vs {tuple(second.shape)}")
    kept = int(first.sum())
    return float((first & second).sum()) / kept if kept else float("nan")


def mean_pairwise_overlap(masks: list[torch.Tensor]) -> float:
    """Mean `kept_overlap` over every ordered pair of distinct clients."""
    pairs = [kept_overlap(a, b) for a, b in itertools.permutations(masks, 2)]
    return statistics.fmean(pairs) if pairs else float("nan")


def position_sharing(masks: list[torch.Tensor]) -> tuple[float, float]:
    """(sharers, kept alone): per client, the mean number of clients (itself included) that keep
    each of its kept positions, and the share of its kept positions no other client keeps; each
    averaged over clients. Eq. 6 averages a kept value over its sharers: N sharers of N clients
    leave every client the global values, and only the positions a client keeps alone are its own.
    The sharers are 1 + (N - 1) x `mean_pairwise_overlap` (each other client adds its overlap); the
    share kept alone is what that mean does not tell."""
    if not masks:
        raise ValueError("position sharing of no masks")
    holders = torch.stack([mask.bool() for mask in masks]).sum(0)
    sharers = [float(holders[mask.bool()].double().mean()) for mask in masks]
    alone = [float((holders[mask.bool()] == 1).double().mean()) for mask in masks]
    return statistics.fmean(sharers), statistics.fmean(alone)


def data_free_mask(theta: torch.Tensor, groups: list[tuple[int, int, int]]) -> torch.Tensor:
    """The mask a client would keep without seeing data: in each (start, end, budget) group, the
    `budget` positions of largest |theta| (the magnitude of the shared initial adapter)."""
    mask = torch.zeros(theta.numel(), dtype=torch.bool)
    for start, end, budget in groups:
        alive = torch.ones(end - start, dtype=torch.bool)
        mask[start:end] = top_k_mask(theta[start:end].abs(), alive, budget)
    return mask


def pair_correlation(mask_similarity: list[list[float]], data_similarity: list[list[float]]) -> float:
    """Pearson correlation, over the pairs of distinct clients, between two similarity matrices;
    NaN when either side is constant or there are fewer than two pairs. A pair reads the mean of
    its two directions: `kept_overlap` at unequal budgets (ranks 8/12/16) is not symmetric, and
    one triangle alone would measure each pair against the budget of whichever client comes first."""
    size = len(mask_similarity)

    def pairs(matrix: list[list[float]]) -> list[float]:
        return [(matrix[i][j] + matrix[j][i]) / 2 for i in range(size) for j in range(i + 1, size)]

    xs, ys = pairs(mask_similarity), pairs(data_similarity)
    if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return float("nan")
    return statistics.correlation(xs, ys)


def pair_correlation_p(
    mask_similarity: list[list[float]], data_similarity: list[list[float]], permutations: int = 9999, seed: int = 0
) -> float:
    """One-sided p-value of `pair_correlation` (the Mantel test): the share of relabellings of the
    clients in `data_similarity` (its rows and columns permuted together) whose correlation is at
    least the observed one, counting the observed labelling, so never 0. The pairs share clients and
    are not independent, so a t-test on r over-counts them; relabelling keeps that dependence. Every
    relabelling where there are at most `permutations + 1` of them (then exact), else `permutations`
    seeded random ones. NaN where the correlation is. Vectorised: 9,999 relabellings of 100 clients
    (4,950 pairs) are seconds, not minutes."""
    if math.isnan(pair_correlation(mask_similarity, data_similarity)):
        return float("nan")
    masks, data = np.asarray(mask_similarity, dtype=np.float64), np.asarray(data_similarity, dtype=np.float64)
    size = len(data)
    rows, cols = np.triu_indices(size, 1)
    xs = ((masks + masks.T) / 2)[rows, cols]  # each pair's two directions, as `pair_correlation` reads them
    xs = xs - xs.mean()
    data = (data + data.T) / 2
    if math.factorial(size) <= permutations + 1:
        orders = np.array(list(itertools.permutations(range(size))))  # the observed (identity) order first
    else:
        rng = np.random.default_rng(seed)
        shuffled = rng.permuted(np.tile(np.arange(size), (permutations, 1)), axis=1)
        orders = np.vstack([np.arange(size), shuffled])
    correlations = []
    for chunk in np.array_split(orders, max(1, len(orders) // 256)):
        ys = data[chunk[:, rows], chunk[:, cols]]  # (relabellings, pairs): pair (i, j) reads (order[i], order[j])
        ys = ys - ys.mean(axis=1, keepdims=True)
        norms = np.sqrt((xs**2).sum() * (ys**2).sum(axis=1))
        correlations.append(np.where(norms > 0, ys @ xs / np.where(norms > 0, norms, 1.0), -np.inf))
    found = np.concatenate(correlations)
    return float(np.mean(found >= found[0] - 1e-9))  # found[0]: the observed labelling, tied with itself


def category_cosines(categories: list[list[str]]) -> list[list[float]]:
    """Pairwise cosine similarity of clients' category histograms, from each client's list of its
    rows' categories: 1 for the same mix, 0 for no category in common."""
    names = sorted({name for rows in categories for name in rows})
    histograms = []
    for rows in categories:
        counts = [float(rows.count(name)) for name in names]
        norm = math.sqrt(sum(c * c for c in counts)) or 1.0
        histograms.append([c / norm for c in counts])
    return [[sum(x * y for x, y in zip(a, b, strict=True)) for b in histograms] for a in histograms]


def own_model_advantage(ppl: list[list[float]]) -> list[float]:
    """Per client j: its own model's perplexity on its held-out rows over the geometric mean of the
    other clients' models' perplexities on the same rows (`ppl[i][j]`: client i's model on client j's
    rows). Below 1: its own model fits its data better than the others' do, so personalization
    reaches the function, not only the mask; exactly 1 where every client has the same model (FIT).
    A per-column ratio, so clients whose data is harder or easier weigh alike."""
    size = len(ppl)
    if size < 2 or any(len(row) != size for row in ppl):
        raise ValueError(f"need a square matrix of at least 2 clients, got {size} rows")
    return [ppl[j][j] / statistics.geometric_mean(ppl[i][j] for i in range(size) if i != j) for j in range(size)]
