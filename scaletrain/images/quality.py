"""Sample-quality metrics: FID and KID on feature vectors, and the bundled-shapes classifier.

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to two feature sets:
  |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
tr((S1 S2)^(1/2)) is computed as the sum of sqrt of the eigenvalues of S1^(1/2) S2 S1^(1/2) (a
symmetric PSD matrix with the same eigenvalues), which avoids a non-symmetric matrix root.
KID (Binkowski et al. 2018) is the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets; it is ~0 for equal distributions.

Features, and how outputs name them:
  - *_shapes: by default `ShapesClassifier` — a small CNN the project trains on the bundled
    shapes (deterministic from a seed, shipped in assets/) — supplies 128-d features, scaled
    to unit root-mean-square on held-out real shapes (`feature_scale`). Its numbers are only
    comparable with each other, never with Inception FIDs.
  - *_inception: with `model.eval_inception_weights` pointing at a local Inception-v3 state
    dict, the standard 2048-d pool features (inception.py), images resized to 299.
`feature_labels(cfg)` says in words which extractor produced which keys; evaluation prints it.

Shape legend: B batch, C channels, H/W height/width, F feature dim.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if min(len(a), len(b)) < 2 or max(len(a), len(b)) >= a.shape[1]:
        return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    # Fewer samples than dimensions (an eval grid's 2048-d Inception features): with S1 = A^T A
    # and S2 = B^T B (A, B the centred features / sqrt(n - 1), as np.cov), the eigenvalues of
    # S1^(1/2) S2 S1^(1/2) are the squared singular values of A B^T, so tr((S1 S2)^(1/2)) is its
    # nuclear norm: one n_a x n_b SVD instead of two d x d eigendecompositions (~5 s at d = 2048
    # on one core), and exact where the d x d route clips round-off on a rank-deficient matrix.
    ca = (a - a.mean(axis=0)) / np.sqrt(len(a) - 1)
    cb = (b - b.mean(axis=0)) / np.sqrt(len(b) - 1)
    diff = a.mean(axis=0) - b.mean(axis=0)
    trace_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return float(diff @ diff + np.square(ca).sum() + np.square(cb).sum() - 2 * trace_sqrt)


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
        self.feature_scale = 1.0  # what `extract` multiplies features by; set by `shapes_classifier`

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
    from scaletrain.images.datasets import ShapesDataset

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
SCALE_SAMPLES, SCALE_SEED = 512, 20_000  # held-out shapes (training data uses seed 0, the classifier 10_000)


@torch.no_grad()
def feature_scale(model: ShapesClassifier, image_size: int = 32, num_classes: int = 6) -> float:
    """1 / RMS of the classifier's features on held-out real shapes.

    KID's kernel (x.y / d + 1)^3 and FID's squared distances assume features of a fixed scale: Inception's
    pool features, whose x.y / d is of order 1. The raw shapes features have an RMS of ~4.3 (x.y / d ~ 19,
    kernel entries ~7,600), which put KID at ~1e7 and FID in the thousands. Scaled to unit RMS, x.y / d of
    real features is ~1, KID of two real sets is ~0 and FID is in units of the real features' variance.
    """
    from scaletrain.images.datasets import ShapesDataset

    data = ShapesDataset(SCALE_SAMPLES, image_size, num_classes, seed=SCALE_SEED)
    images = torch.stack([data[i]["image"] for i in range(SCALE_SAMPLES)])
    return float(model.features(images).square().mean().rsqrt())


def shapes_classifier(
    image_size: int = 32, num_classes: int = 6, cache_dir: str | Path | None = None
) -> ShapesClassifier:
    """The project's shapes feature extractor: the shipped weights (32 px, 6 classes), else trained
    once (deterministically, ~2 CPU minutes) and cached on disk; loaded (and scaled) once per process."""
    return _shapes_classifier(image_size, num_classes, str(cache_dir or Path.home() / ".cache" / "scaletrain"))


@functools.cache
def _shapes_classifier(image_size: int, num_classes: int, cache_dir: str) -> ShapesClassifier:
    name = f"shapes_classifier_{image_size}px_{num_classes}c.pt"
    cache = Path(cache_dir)
    found = next((path for path in (ASSETS / name, cache / name) if path.is_file()), None)
    if found is not None:
        model = ShapesClassifier(num_classes)
        model.load_state_dict(torch.load(found, map_location="cpu", weights_only=True))
    else:
        model = train_shapes_classifier(image_size, num_classes)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / (name + ".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(cache / name)
    model.eval()
    model.feature_scale = feature_scale(model, image_size, num_classes)
    return model


@torch.no_grad()
def extract(model: ShapesClassifier, images_BCHW: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(features_BF times model.feature_scale, predicted labels_B) of images in [-1, 1]."""
    feats, preds = [], []
    for start in range(0, len(images_BCHW), batch):
        f = model.features(images_BCHW[start : start + batch].float())
        feats.append(f * model.feature_scale)
        preds.append(model.head(f).argmax(dim=-1))
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def to_classifier_size(x_BCHW: torch.Tensor, size: int = 32) -> torch.Tensor:
    if x_BCHW.shape[-1] == size:
        return x_BCHW
    return F.interpolate(x_BCHW.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# -- evaluation: generated vs real -----------------------------------------------------------------
SHAPES_LABEL = (
    "shapes classifier (trained by this project on its bundled shapes, "
    "scaletrain/images/assets/shapes_classifier_32px_6c.pt); comparable between runs on the bundled data "
    "only, "
    "never with Inception FIDs"
)


@functools.cache
def inception_extractor(path: str) -> tuple[Any, str]:
    """(Inception-v3 from the weights file at `path`, its label), loaded once per process."""
    from scaletrain.images.inception import load_inception

    return load_inception(path)


def real_data_section(cfg: Any) -> Any | None:
    """The data section of the real images to compare with: the job's own when it holds images; None if not
    (a recipe whose data are not images, such as a latent cache, passes the images' section itself)."""
    return cfg.data if getattr(cfg.data, "source", None) in ("shapes", "folder") else None


def real_images(data: Any, n: int, size: int, channels: int) -> torch.Tensor:
    """n real images at the generated size: held-out shapes (seed + 1), or n evenly spaced folder images."""
    from scaletrain.images.datasets import SHAPES, ImageFolderDataset, ShapesDataset

    if data.source == "shapes":
        dataset = ShapesDataset(n, size, len(SHAPES), seed=data.shapes_seed + 1)
        return torch.stack([dataset[i]["image"] for i in range(n)])
    dataset = ImageFolderDataset(data.path, size, channels)
    return torch.stack([dataset[i * len(dataset) // n]["image"] for i in range(n)])


def feature_labels(cfg: Any, data: Any | None = None) -> list[str]:
    """One line per extractor the evaluation of `cfg` uses, naming the metric keys it produces; `data`: the
    real images' data section (default: the job's, see real_data_section)."""
    data = data if data is not None else real_data_section(cfg)
    lines = []
    if data is not None and data.source == "shapes":
        lines.append(f"fid_shapes/kid_shapes/class_accuracy_shapes/diversity_shapes: {SHAPES_LABEL}")
    path = getattr(cfg.model, "eval_inception_weights", "")
    if path and data is not None:
        lines.append(f"fid_inception/kid_inception: {inception_extractor(path)[1]}")
    return lines


@functools.cache
def _real_features(
    extractor: str, weights: str, source: str, path: str, shapes_seed: int, n: int, size: int, channels: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(features, the shapes classifier's labels or None) of the n real images the samples are compared with
    (`extractor` "shapes", or "inception" from `weights`): the real set is fixed for a run, so it is drawn
    and extracted once per process."""
    images = real_images(SimpleNamespace(source=source, path=path, shapes_seed=shapes_seed), n, size, channels)
    if extractor == "shapes":
        return extract(shapes_classifier(32, 6), to_classifier_size(images))
    from scaletrain.images.inception import inception_features

    return inception_features(inception_extractor(weights)[0], images), None


def diversity(real_BF: np.ndarray, real_labels_B: np.ndarray, fake_BF: np.ndarray, fake_labels_B: np.ndarray) -> float:
    """How varied the samples of a class are next to real images of that class: the mean over classes of
    tr(cov(fake features of c)) / tr(cov(real features of c)), i.e. of their mean squared pairwise distances.
    About 1 when a class's samples vary as much as the data; near 0 when every sample of a class is the same
    image (mode collapse within the class, which FID and class accuracy can miss). Classes with fewer than
    2 images on either side are left out; nan when none is left."""
    ratios = []
    for c in np.unique(fake_labels_B):
        fake, real = fake_BF[fake_labels_B == c], real_BF[real_labels_B == c]
        if len(fake) >= 2 and len(real) >= 2:
            ratios.append(fake.var(axis=0, ddof=1).sum() / max(real.var(axis=0, ddof=1).sum(), 1e-12))
    return float(np.mean(ratios)) if ratios else float("nan")


def sample_metrics(
    cfg: Any, images_BCHW: torch.Tensor, labels_B: torch.Tensor, data: Any | None = None
) -> dict[str, float]:
    """FID/KID of generated images against as many real ones, with every extractor that applies:
    the shapes classifier on shapes data (plus the share of samples it labels as the requested
    class; other sizes are resized to its 32 px — real 16 px shapes resized so are still
    labelled 99.7% right) and the within-class diversity of its features (`diversity`), and Inception-v3
    when model.eval_inception_weights is set."""
    data = data if data is not None else real_data_section(cfg)
    if data is None:
        return {}
    images = images_BCHW.float().cpu()
    n, channels, size = len(images), images.shape[1], images.shape[-1]
    data_key = (data.source, getattr(data, "path", ""), getattr(data, "shapes_seed", 0), n, size, channels)
    out: dict[str, float] = {}
    if data.source == "shapes" and channels == 3:
        fake, predicted = extract(shapes_classifier(32, 6), to_classifier_size(images))
        real, real_predicted = _real_features("shapes", "", *data_key)
        out.update(_distances("shapes", real, fake))
        requested = labels_B.cpu().numpy()
        if getattr(cfg.model, "num_classes", 0) > 0:
            out["class_accuracy_shapes"] = float((predicted == requested).mean())
            # Real images grouped by the classifier's label (99.7 % right on held-out shapes).
            out["diversity_shapes"] = diversity(real, real_predicted, fake, requested)
        else:
            out["diversity_shapes"] = diversity(real, np.zeros(n), fake, np.zeros(n))
    path = getattr(cfg.model, "eval_inception_weights", "")
    if path:
        from scaletrain.images.inception import inception_features

        model, _ = inception_extractor(path)
        real, _ = _real_features("inception", path, *data_key)
        out.update(_distances("inception", real, inception_features(model, images)))
    return out


def _distances(suffix: str, real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    out = {f"fid_{suffix}": fid(real, fake)}
    if len(fake) >= 4:
        out[f"kid_{suffix}"] = kid(real, fake, subsets=10, subset_size=min(len(fake), 100))[0]
    return out


if __name__ == "__main__":
    # Regenerate the shipped weights: python -m scaletrain.images.quality [image_size] [num_classes]
    import sys

    args = [int(a) for a in sys.argv[1:3]]
    size, classes = (args + [32, 6][len(args) :])[:2]
    out = ASSETS / f"shapes_classifier_{size}px_{classes}c.pt"
    torch.save(train_shapes_classifier(size, classes).state_dict(), out)
    print(f"wrote {out}")
