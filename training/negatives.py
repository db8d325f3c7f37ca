"""Cluster-guided negatives for the contrastive losses (CM-CGNS, arXiv 2506.11674).

Plain InfoNCE treats every other row of the batch as a negative, including rows of the same
kind (two polyps), which pushes apart what should stay close. Here an online k-means over the
(detached, normalised) embeddings groups the batch:

- same-cluster pairs are likely false negatives: weight ``false_negative_weight`` (0 drops them);
- pairs whose cluster is the anchor's nearest *other* cluster are hard negatives:
  weight ``hard_negative_weight``;
- all other pairs keep weight 1, and the positive (the diagonal) is never a negative.

The weighted loss for anchor i is ``-log(e^{s_ii} / (e^{s_ii} + sum_{j!=i} w_ij e^{s_ij}))``.
Centroids follow an exponential moving average of their members (momentum ``m``):
``c_k <- normalise(m c_k + (1 - m) mean(z_i : a_i = k))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class OnlineKMeans:
    """Spherical k-means whose centroids move with every batch instead of every epoch."""

    def __init__(self, clusters: int, momentum: float, seed: int = 0) -> None:
        self.k = clusters
        self.momentum = momentum
        self.generator = torch.Generator().manual_seed(seed)
        self.centroids: torch.Tensor | None = None

    def _init(self, z: torch.Tensor) -> None:
        pick = torch.randperm(len(z), generator=self.generator)[: self.k].to(z.device)
        self.centroids = z[pick].clone()

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """Cluster index of each row of ``z`` (rows are normalised here)."""
        z = F.normalize(z.detach().float(), dim=-1)
        if self.centroids is None:
            self._init(z)
        return (z @ self.centroids.t()).argmax(dim=1)

    def update(self, z: torch.Tensor, assign: torch.Tensor) -> None:
        z = F.normalize(z.detach().float(), dim=-1)
        for k in assign.unique().tolist():
            mean = z[assign == k].mean(dim=0)
            moved = self.momentum * self.centroids[k] + (1 - self.momentum) * mean
            self.centroids[k] = F.normalize(moved, dim=0)

    def nearest_other(self) -> torch.Tensor:
        """For each centroid, the index of the most similar other centroid."""
        sim = self.centroids @ self.centroids.t()
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(dim=1)


def negative_weights(
    assign: torch.Tensor,
    nearest: torch.Tensor,
    false_negative_weight: float,
    hard_negative_weight: float,
) -> torch.Tensor:
    """``w[i, j]``: how much row j counts as a negative for anchor i; the diagonal is 0."""
    same = assign[:, None] == assign[None, :]
    hard = assign[None, :] == nearest[assign][:, None]
    w = torch.ones(len(assign), len(assign), device=assign.device)
    w[hard] = hard_negative_weight
    w[same] = false_negative_weight
    w.fill_diagonal_(0.0)
    return w


def weighted_infonce(
    anchor: torch.Tensor, positive: torch.Tensor, temperature: float, weights: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with per-pair negative weights (see the module docstring)."""
    a = F.normalize(anchor, dim=-1)
    p = F.normalize(positive, dim=-1)
    logits = a @ p.t() / temperature
    w = weights.clone()
    w.fill_diagonal_(1.0)
    log_w = torch.log(w.clamp_min(1e-30)).masked_fill(w == 0, -float("inf"))
    target = torch.arange(len(a), device=a.device)
    forward = F.cross_entropy(logits + log_w, target)
    backward = F.cross_entropy(logits.t() + log_w.t(), target)
    return 0.5 * (forward + backward)


class ClusterGuide:
    """Clusters one embedding stream and turns it into negative weights for a batch."""

    def __init__(
        self,
        clusters: int,
        momentum: float,
        false_negative_weight: float,
        hard_negative_weight: float,
        seed: int = 0,
    ) -> None:
        self.kmeans = OnlineKMeans(clusters, momentum, seed)
        self.false_w = false_negative_weight
        self.hard_w = hard_negative_weight

    def weights(self, z: torch.Tensor) -> torch.Tensor:
        assign = self.kmeans.assign(z)
        w = negative_weights(assign, self.kmeans.nearest_other(), self.false_w, self.hard_w)
        self.kmeans.update(z, assign)
        return w
