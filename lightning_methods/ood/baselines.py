"""Post-hoc OOD baselines on cached features and logits, as OpenOOD implements them (``openood/postprocessors``).
Every function returns an ID-confidence (higher = more in-distribution).

- MSP (Hendrycks & Gimpel, arXiv 1610.02136): maximum softmax probability.
- Energy (Liu et al., arXiv 2010.03759): ``T logsumexp(logits / T)`` (the negative free energy).
- Mahalanobis (Lee et al., arXiv 1807.03888; OpenOOD ``mds``): class means and one shared covariance of the
  class-centred ID-train features, confidence ``max_c -(z - mu_c)^T Sigma^+ (z - mu_c)``.
- kNN (Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors", arXiv 2204.06507): L2-normalised
  features, confidence ``-||z - z_(k)||^2`` to the k-th nearest ID-train feature (OpenOOD's faiss ``IndexFlatL2``
  returns squared distances; k = 50 for CIFAR).

``*_parameters`` give the stored values of each detector, for the parameter column of the report.
"""

from __future__ import annotations

import torch


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability per sample."""
    return torch.softmax(logits.double(), dim=1).max(dim=1).values


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T logsumexp(logits / T)`` per sample."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return temperature * torch.logsumexp(logits.double() / temperature, dim=1)


class Mahalanobis:
    """Class-conditional Gaussians with a shared covariance, fitted on ID-train features.

    Args:
        features: ID-train features (N, d).
        labels: ID-train labels (N,) (classes 0..C-1; every class needs a sample).

    Raises:
        ValueError: shape mismatch or a class without samples.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        x, y = features.double(), labels.long()
        if len(x) != len(y) or x.ndim != 2:
            raise ValueError(f"Mahalanobis needs features (N, d) and N labels, got {tuple(x.shape)}, {len(y)}")
        classes = int(y.max()) + 1
        counts = torch.bincount(y, minlength=classes)
        if (counts == 0).any():
            raise ValueError(f"classes without ID-train samples: {torch.nonzero(counts == 0).flatten().tolist()}")
        self.means = torch.zeros(classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x) / counts[:, None]
        centred = x - self.means[y]
        centred = centred - centred.mean(dim=0)  # EmpiricalCovariance(assume_centered=False)
        self.precision = torch.linalg.pinv(centred.T @ centred / len(x), hermitian=True)

    def __call__(self, features: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        out = []
        for part in features.double().split(chunk):
            diff = part[:, None, :] - self.means[None]  # (B, C, d)
            out.append((-torch.einsum("bcd,de,bce->bc", diff, self.precision, diff)).max(dim=1).values)
        return torch.cat(out)

    @property
    def num_parameters(self) -> int:
        return self.means.numel() + self.precision.numel()


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (OpenOOD adds 1e-10 after the division; a constant shift of every entry)."""
    return x / x.norm(dim=1, keepdim=True) + 1e-10


class KNN:
    """Deep nearest neighbours on L2-normalised ID-train features.

    Args:
        features: ID-train features (N, d).
        k: which neighbour (50 for CIFAR in the paper and OpenOOD).

    Raises:
        ValueError: ``k`` outside ``1..N``.
    """

    def __init__(self, features: torch.Tensor, k: int = 50) -> None:
        if not 1 <= k <= len(features):
            raise ValueError(f"kNN needs 1 <= k <= {len(features)} (ID-train samples), got k={k}")
        self.bank, self.k = l2_normalize(features.double()), k

    def __call__(self, features: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        out = []
        bank_sq = (self.bank**2).sum(dim=1)
        for part in l2_normalize(features.double()).split(chunk):
            d2 = (part**2).sum(dim=1, keepdim=True) - 2 * part @ self.bank.T + bank_sq[None]
            out.append(-torch.topk(d2.clamp_min(0), self.k, dim=1, largest=False).values[:, -1])
        return torch.cat(out)

    @property
    def num_parameters(self) -> int:
        return self.bank.numel()
