"""Inception-v3 pool features (2048-d) for standard FID/KID, loaded from a local weights file.

Nothing is downloaded: point `model.eval_inception_weights` at a file you already have, e.g.
  - pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`: TF's 2015 FID graph ported to
    PyTorch, the extractor behind published FIDs (its `fc` has 1008 outputs);
  - torchvision's `inception_v3_google-0cc3c7bd.pth`: ImageNet classification weights (fc 1000);
    FIDs from it are close to, but not the same numbers as, published ones.
Both use torchvision's parameter names, which this module reproduces, so either file loads as
it is. The architecture is written out here (≈ torchvision's Inception3 without the auxiliary
head) because PyPI's torchvision wheels are CUDA builds that do not import beside the CPU torch.

The FID graph differs from torchvision's in its pooling branches, and we follow it when the
file's fc has 1008 outputs (as pytorch-fid's FIDInception* blocks do): average pools exclude
the padding, and the last block (Mixed_7c) max-pools. Inputs are images in [-1, 1], resized
bilinearly to 299 x 299 — what pytorch-fid feeds after its [0, 1] -> [-1, 1] scaling.

Shape legend: B batch, C channels, H/W height/width.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config import MissingDataError

FID_CLASSES = 1008  # pytorch-fid's TF port has 1008 logits; torchvision's ImageNet weights 1000
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor, fid: bool) -> torch.Tensor:
    # TF's average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=not fid)


class InceptionA(nn.Module):
    def __init__(self, c_in: int, pool_features: int, fid: bool):
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x, self.fid))], 1)


class InceptionB(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, c_in: int, c7: int, fid: bool):
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x, self.fid))], 1)


class InceptionD(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = pool  # "avg" (torchvision), "avg_fid" (TF: padding excluded) or "max" (TF's Mixed_7c)
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool(x, self.pool == "avg_fid")
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class InceptionV3Features(nn.Module):
    """Inception-v3 up to the global average pool: x_BCHW in [-1, 1] (any size) -> 2048-d features.

    `fid=True` is the FID graph's pooling (see the module comment); `num_classes` only sizes
    the (unused) classifier so a file's `fc` loads and is checked like every other tensor.
    """

    def __init__(self, fid: bool = True, num_classes: int = FID_CLASSES):
        super().__init__()
        self.fid = fid
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, fid)
        self.Mixed_5c = InceptionA(256, 64, fid)
        self.Mixed_5d = InceptionA(288, 64, fid)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, fid)
        self.Mixed_6c = InceptionC(768, 160, fid)
        self.Mixed_6d = InceptionC(768, 160, fid)
        self.Mixed_6e = InceptionC(768, 192, fid)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg_fid" if fid else "avg")
        self.Mixed_7c = InceptionE(2048, "max" if fid else "avg")
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if x_BCHW.shape[1] == 1:  # greyscale data sets: the network expects RGB
            x_BCHW = x_BCHW.expand(-1, 3, -1, -1)
        x = F.interpolate(x_BCHW.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))  # 2048-d pool3 features


def _describe(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_weights_file(path: str | Path) -> Path:
    """Config-time check (no loading): the file exists."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(
            f"model.eval_inception_weights: {str(path)!r} does not exist; give a local Inception-v3 state dict "
            "(e.g. pytorch-fid's pt_inception-2015-12-05-6726825d.pth; nothing is downloaded)"
        )
    return path


def load_inception(path: str | Path) -> tuple[InceptionV3Features, str]:
    """(model in eval mode, label for outputs) from a state-dict file; errors name the file and tensors."""
    path = check_weights_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles with code, truncated files, non-torch files
        raise ValueError(
            f"model.eval_inception_weights: {str(path)!r} is not a weights-only state dict: {exc}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.eval_inception_weights: {str(path)!r} does not hold a dict of tensors")
    fc = state.get("fc.weight")
    # The classifier sizes tell the two graphs apart; a file without one (features only) is
    # taken to be the FID graph.
    num_classes = int(fc.shape[0]) if fc is not None and fc.dim() == 2 else FID_CLASSES
    fid = num_classes == FID_CLASSES
    model = InceptionV3Features(fid=fid, num_classes=num_classes)
    expected = model.state_dict()
    # Neither the auxiliary nor the main classifier is on the feature path, and BatchNorm's
    # step counter is bookkeeping that older files lack: none of them is required.
    ignored = [k for k in state if k.startswith("AuxLogits.")]
    optional = ("num_batches_tracked", "fc.weight", "fc.bias")
    missing = [k for k in expected if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in expected and k not in ignored]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]  # fmt: skip
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_describe(wrong)}")
    if problems:
        raise ValueError(
            f"model.eval_inception_weights: {str(path)!r} is not an Inception-v3 state dict with torchvision's "
            f"names: {'; '.join(problems)}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k not in ignored}, strict=False)
    variant = "FID graph pooling" if fid else f"torchvision pooling, fc {num_classes}"
    return model.eval(), f"Inception-v3 (file {path}, {variant})"


@torch.no_grad()
def inception_features(model: InceptionV3Features, images_BCHW: torch.Tensor, batch: int = 32) -> np.ndarray:
    """2048-d features (float64) of images in [-1, 1]; any size, resized to 299."""
    device = next(model.parameters()).device
    chunks = [model(images_BCHW[i : i + batch].to(device)).double().cpu() for i in range(0, len(images_BCHW), batch)]
    return torch.cat(chunks).numpy()
