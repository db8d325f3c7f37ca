"""Distribution shift on fused features (MICS fine-tuning stage, arXiv 2509.17492).

With few labels the head learns the exact statistics of the fused features it saw and becomes
over-confident. With probability ``p`` a row's fused vector is re-styled with statistics
mixed with those of another row of the batch (MixStyle applied to a feature vector):

    mu_i, sigma_i = mean and std of x_i over its channels
    lam ~ Beta(alpha, alpha);  j = a random permutation of the batch
    x_i' = (x_i - mu_i) / sigma_i * (lam sigma_i + (1 - lam) sigma_j) + lam mu_i + (1 - lam) mu_j

The normalised pattern of x_i (what carries the class) is kept; only its first and second
moments move. Training only: the exported graph never sees it.
"""

from __future__ import annotations

import torch


def shift_statistics(
    x: torch.Tensor, p: float, alpha: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    if p <= 0 or len(x) < 2:
        return x
    n = len(x)
    mu = x.mean(dim=-1, keepdim=True)
    sigma = (x.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    perm = torch.randperm(n, generator=generator).to(x.device)
    beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
    lam = beta.sample((n, 1)).to(x.device, x.dtype)
    mixed_mu = lam * mu + (1 - lam) * mu[perm]
    mixed_sigma = lam * sigma + (1 - lam) * sigma[perm]
    shifted = (x - mu) / sigma * mixed_sigma + mixed_mu
    apply = (torch.rand(n, 1, generator=generator) < p).to(x.device)
    return torch.where(apply, shifted, x)
