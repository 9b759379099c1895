"""Sample-quality metrics: FID and KID on feature vectors, and the bundled-shapes classifier.

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to two feature sets:
  |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
tr((S1 S2)^(1/2)) is computed as the sum of sqrt of the eigenvalues of S1^(1/2) S2 S1^(1/2) (a
symmetric PSD matrix with the same eigenvalues), which avoids a non-symmetric matrix root.
KID (Binkowski et al. 2018) is the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets; it is ~0 for equal distributions.

Features: with a local Inception-v3 weights file a caller can pass any feature function;
by default `ShapesClassifier` — a small CNN trained on the bundled shapes (deterministic from a
seed, cached on disk) — supplies 128-d features. Numbers from it are only comparable with each
other ("FID-shapes"), never with Inception FIDs; outputs label them so.

Shape legend: B batch, C channels, H/W height/width, F feature dim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def gaussian_stats(features_BF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features_BF, dtype=np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance squared between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise ValueError(f"frechet_distance: shapes differ: {mu1.shape}/{cov1.shape} vs {mu2.shape}/{cov2.shape}")
    root1 = _sqrt_psd(cov1)
    eig = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def kid(
    features_a: np.ndarray, features_b: np.ndarray, subsets: int = 10, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Unbiased KID: (mean, std) of MMD^2 over `subsets` random subsets of `subset_size` each."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("kid: needs at least 2 samples in each set")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        # Unbiased: the diagonals k(x_i, x_i) are left out of the within-set means.
        mmd = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


class ShapesClassifier(nn.Module):
    """A small CNN for the bundled shapes: logits over classes and 128-d features (penultimate layer)."""

    def __init__(self, num_classes: int = 6, channels: int = 3, width: int = 16):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.Conv2d(width, width * 2, 3, padding=1, stride=2),
                nn.Conv2d(width * 2, width * 4, 3, padding=1, stride=2),
                nn.Conv2d(width * 4, width * 4, 3, padding=1, stride=2),
            ]
        )
        self.fc = nn.Linear(width * 4, 128)  # 128-d features for FID/KID
        self.head = nn.Linear(128, num_classes)

    def features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = x_BCHW
        for conv in self.convs:
            h = F.relu(conv(h))
        return F.relu(self.fc(h.mean(dim=(2, 3))))  # global average pool: any image size works

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_BCHW))


def train_shapes_classifier(
    image_size: int = 32, num_classes: int = 6, steps: int = 1000, batch: int = 64, seed: int = 0
) -> ShapesClassifier:
    """Train the classifier on shapes data (seed 10_000 + seed, disjoint from the training set's seed 0)."""
    from recipes.diffusion.data import ShapesDataset

    torch.manual_seed(seed)
    data = ShapesDataset(steps * batch, image_size, num_classes, seed=10_000 + seed)
    model = ShapesClassifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        items = [data[int(i)] for i in order[step * batch : (step + 1) * batch]]
        x = torch.stack([it["image"] for it in items])
        y = torch.stack([it["label"] for it in items])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


ASSETS = Path(__file__).parent / "assets"


def shapes_classifier(
    image_size: int = 32, num_classes: int = 6, cache_dir: str | Path | None = None
) -> ShapesClassifier:
    """The project's shapes feature extractor: the shipped weights (32 px, 6 classes), else trained
    once (deterministically, ~2 CPU minutes) and cached on disk."""
    name = f"shapes_classifier_{image_size}px_{num_classes}c.pt"
    cache = Path(cache_dir or Path.home() / ".cache" / "scaletrain")
    for path in (ASSETS / name, cache / name):
        if path.is_file():
            model = ShapesClassifier(num_classes)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
    model = train_shapes_classifier(image_size, num_classes)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / (name + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(cache / name)
    return model


@torch.no_grad()
def extract(model: ShapesClassifier, images_BCHW: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(features_BF, predicted labels_B) of images in [-1, 1]."""
    feats, preds = [], []
    for start in range(0, len(images_BCHW), batch):
        f = model.features(images_BCHW[start : start + batch].float())
        feats.append(f)
        preds.append(model.head(f).argmax(dim=-1))
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


if __name__ == "__main__":
    # Regenerate the shipped weights: python -m recipes.diffusion.metrics [image_size] [num_classes]
    import sys

    args = [int(a) for a in sys.argv[1:3]]
    size, classes = (args + [32, 6][len(args) :])[:2]
    out = ASSETS / f"shapes_classifier_{size}px_{classes}c.pt"
    torch.save(train_shapes_classifier(size, classes).state_dict(), out)
    print(f"wrote {out}")
