"""FID/KID with Inception-v3 features from a local weights file (model.eval_inception_weights).

No real Inception weights ship with the repo (nor are any downloaded), so the file here is a
randomly initialised state dict with torchvision's names — what matters is the path from a
config field to a loaded extractor, 2048-d features, the output label, and the errors. That
the architecture equals torchvision's Inception3 / pytorch-fid's FID graph was checked once
against their sources (max abs feature difference 0.0 on random weights; see inception.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scaletrain.config import load_config
from scaletrain.images.inception import FID_CLASSES, InceptionV3Features, inception_features
from scaletrain.images.quality import feature_labels, inception_extractor, real_images, sample_metrics
from scaletrain.validate import validate_config

N = 8  # images per set: Inception at 299 px costs ~0.1 s per image on 2 CPU cores


@pytest.fixture(autouse=True)
def one_thread():
    # On the shared, oversubscribed 2-core machine two intra-op threads ran many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_state(num_classes: int = FID_CLASSES, seed: int = 0) -> dict[str, torch.Tensor]:
    """He-initialised convs (so activations keep their scale through ~40 layers) and random BN statistics."""
    torch.manual_seed(seed)
    model = InceptionV3Features(fid=num_classes == FID_CLASSES, num_classes=num_classes)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.8, 1.2)
    return model.state_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "pt_inception_random.pth"
    torch.save(_random_state(), path)
    return path


def _cfg(weights: Path | str, *extra: str):
    return load_config(None, ["--recipe", "dit", "--model.image_size", "16", "--model.patch_size", "4",
                              "--model.eval_inception_weights", str(weights), *extra])  # fmt: skip


def test_features_from_the_config_path_are_2048d_deterministic_and_labelled(weights):
    cfg = _cfg(weights)
    validate_config(cfg, 1)
    model, label = inception_extractor(cfg.model.eval_inception_weights)
    assert label == f"Inception-v3 (file {weights}, FID graph pooling)"
    images = real_images(cfg.data, N, 16, 3)
    a = inception_features(model, images)
    b = inception_features(model, images, batch=3)  # other batch boundaries
    assert a.shape == (N, 2048) and np.isfinite(a).all()
    assert a.std() > 1e-3  # features carry signal, not a collapsed constant
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a, inception_features(model, images))
    # Every extractor the evaluation uses is named, the project's own one as such.
    lines = feature_labels(cfg)
    assert any(line.startswith("fid_inception/kid_inception: Inception-v3 (file ") for line in lines)
    assert any("shapes classifier (trained by this project" in line for line in lines)


def test_fid_of_a_set_against_itself_is_zero_and_against_a_shifted_set_positive(weights):
    cfg = _cfg(weights)
    real = real_images(cfg.data, N, 16, 3)  # exactly the reference set sample_metrics compares with
    labels = torch.arange(N) % 6
    same = sample_metrics(cfg, real, labels)
    shifted = sample_metrics(cfg, (real + 0.5).clamp(-1, 1), labels)
    assert set(same) >= {"fid_inception", "kid_inception", "fid_shapes", "kid_shapes"}
    # ~0 up to round-off (measured 0.0 vs 10.7; other real shapes: 2.5).
    assert abs(same["fid_inception"]) < 1e-4 * shifted["fid_inception"]
    assert shifted["fid_inception"] > 1.0
    assert shifted["kid_inception"] > same["kid_inception"] + 1e-3
    # Not only a brightness shift registers: other real shapes are at a positive distance too.
    other = real_images(load_config(None, ["--recipe", "dit", "--data.shapes_seed", "5"]).data, N, 16, 3)
    assert sample_metrics(cfg, other, labels)["fid_inception"] > 0.01


def test_torchvision_weights_are_recognised_by_their_1000_class_head(tmp_path):
    path = tmp_path / "inception_v3_google.pth"
    torch.save(_random_state(1000), path)
    model, label = inception_extractor(str(path))
    assert label.endswith("torchvision pooling, fc 1000)") and not model.fid


def test_missing_file_fails_before_training():
    with pytest.raises(ValueError, match=r"model.eval_inception_weights: '/nonexistent/pt_inception.pth' does not"):
        validate_config(_cfg("/nonexistent/pt_inception.pth"), 1)


def test_wrong_keys_and_shapes_are_named(tmp_path):
    from scaletrain.images.inception import load_inception

    state = _random_state()
    del state["Mixed_6b.branch7x7_1.conv.weight"]
    state["Mixed_6b.extra.weight"] = torch.zeros(3)
    state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(192, 2048, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_inception(path)
    message = str(info.value)
    assert "missing keys: Mixed_6b.branch7x7_1.conv.weight" in message
    assert "unexpected keys: Mixed_6b.extra.weight" in message
    assert "wrong shapes: Mixed_7c.branch_pool.conv.weight (192, 2048, 3, 3) (expected (192, 2048, 1, 1))" in message
    # Not a state dict at all / a pickle that is not weights-only.
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is not a weights-only state dict"):
        load_inception(tmp_path / "junk.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a dict of tensors"):
        load_inception(tmp_path / "list.pth")
