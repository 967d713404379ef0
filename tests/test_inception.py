"""FID Inception: parity with a PyTorch reference of pytorch-fid's graph, loading, resize.

pytorch-fid and torchvision cannot be installed here, so the reference below is
the FID Inception written in plain torch.nn with pytorch-fid's state-dict keys
(torchvision's Inception3 blocks as patched by FIDInceptionA/C/E_1/E_2). Its
random weights are saved the way pytorch-fid's release file is (a pickled
state dict), BN statistics included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from unlearn_jax.metrics import fid, inception, inception_net
from unlearn_jax.models.convert import WeightMismatchError
from unlearn_jax.models.weights import MissingWeightsError

# ----------------------------------------------------------------------------
# PyTorch reference (pytorch-fid's fid_inception_v3 graph)
# ----------------------------------------------------------------------------


class TorchBasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_excl_pad(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class TorchA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = TorchBasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = TorchBasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = TorchBasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = TorchBasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(_avg_excl_pad(x))
        return torch.cat([self.branch1x1(x), b5, b3, pool], 1)


class TorchB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TorchBasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class TorchC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = TorchBasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = TorchBasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = TorchBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = TorchBasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = TorchBasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = TorchBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = TorchBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = TorchBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = TorchBasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = TorchBasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        d = self.branch7x7dbl_3(self.branch7x7dbl_2(d))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(d))
        pool = self.branch_pool(_avg_excl_pad(x))
        return torch.cat([self.branch1x1(x), b7, d, pool], 1)


class TorchD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = TorchBasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = TorchBasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = TorchBasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = TorchBasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TorchBasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TorchBasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class TorchE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # FIDInceptionE_2 (Mixed_7c) max-pools
        self.branch1x1 = TorchBasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = TorchBasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = TorchBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = TorchBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TorchBasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = TorchBasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = TorchBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TorchBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = TorchBasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_excl_pad(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TorchBasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = TorchBasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = TorchBasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = TorchBasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = TorchBasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = TorchA(192, 32)
        self.Mixed_5c = TorchA(256, 64)
        self.Mixed_5d = TorchA(288, 64)
        self.Mixed_6a = TorchB(288)
        self.Mixed_6b = TorchC(768, 128)
        self.Mixed_6c = TorchC(768, 160)
        self.Mixed_6d = TorchC(768, 160)
        self.Mixed_6e = TorchC(768, 192)
        self.Mixed_7a = TorchD(768)
        self.Mixed_7b = TorchE(1280, max_pool=False)
        self.Mixed_7c = TorchE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x, resize_to=299):
        """pytorch-fid's InceptionV3 forward, pool3 block: NCHW [0, 1] -> [B, 2048]."""
        x = F.interpolate(x, size=(resize_to, resize_to), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _random_reference(seed: int, calibration: torch.Tensor) -> TorchFIDInception:
    """Random weights whose activations stay O(1) through all 94 conv layers.

    Default conv init shrinks activations layer by layer, so BN statistics are
    first measured on one calibration batch (a cumulative average over one
    batch = that batch's statistics), then perturbed randomly so that the
    scale/shift/mean/var of every BN are all exercised.
    """
    torch.manual_seed(seed)
    model = TorchFIDInception()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(calibration, resize_to=calibration.shape[-1])
        for bn in bns:
            c = bn.num_features
            bn.running_var.mul_(torch.empty(c).uniform_(0.7, 1.4)).add_(1e-2)
            bn.running_mean.add_(0.1 * torch.randn(c) * bn.running_var.sqrt())
            bn.weight.uniform_(0.6, 1.4)
            bn.bias.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch model, path of its pickled state dict, path of the safetensors copy)."""
    folder = tmp_path_factory.mktemp("fid_inception")
    calibration = torch.rand(4, 3, 299, 299, generator=torch.Generator().manual_seed(1))
    model = _random_reference(0, calibration)
    pth = folder / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(model.state_dict(), pth)
    st = inception.convert_fid_inception(pth, folder / "fid_inception.safetensors")
    return model, pth, st


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_features_match_pytorch_reference_at_299(reference):
    model_t, pth, _ = reference
    model = inception.load_fid_inception(pth, allow_pickle=True)
    # 64x80 inputs: upsampled to 299 (non-square source exercises both axes).
    images = np.random.default_rng(0).uniform(0, 1, (2, 64, 80, 3)).astype(np.float32)
    with torch.no_grad():
        want = model_t(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    got = np.asarray(inception.make_inception_features(model)(images))
    assert got.shape == (2, inception_net.FEATURE_DIM)
    assert np.std(want) > 0.05  # activations did not collapse: the comparison means something
    print(f"max |diff| / max |feature|: {_rel_err(got, want):.2e}")
    assert _rel_err(got, want) < 1e-5, _rel_err(got, want)


def test_safetensors_copy_loads_identically(reference):
    _, pth, st = reference
    from_pth = nnx.to_flat_state(nnx.state(inception.load_fid_inception(pth, allow_pickle=True)))
    from_st = dict(nnx.to_flat_state(nnx.state(inception.load_fid_inception(st))))
    assert len(from_pth) == len(from_st)
    for path, var in from_pth:
        np.testing.assert_array_equal(var.get_value(), from_st[path].get_value())


def test_pickle_needs_opt_in(reference):
    _, pth, _ = reference
    with pytest.raises(MissingWeightsError, match="allow_pickle=True"):
        inception.load_fid_inception(pth)


def test_missing_file_says_where_to_get_weights(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="pytorch-fid/releases") as info:
        inception.load_fid_inception(path, allow_pickle=True)
    assert str(path) in str(info.value)


def test_wrong_state_dict_is_refused(reference, tmp_path):
    model_t, _, _ = reference
    state = {k: v.numpy() for k, v in model_t.state_dict().items()}
    del state["Mixed_6b.branch7x7_2.bn.running_var"]
    state["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    model = inception_net.FIDInceptionV3()
    with pytest.raises(WeightMismatchError, match="Mixed_6b.branch7x7_2.bn.running_var"):
        inception.load_fid_inception_state(model, state)
    del state["AuxLogits.fc.weight"]
    state["Mixed_6b.branch7x7_2.bn.running_var"] = np.ones(128, np.float32)
    state["fc.weight"] = np.zeros((1000, 2048), np.float32)  # torchvision's 1000 classes
    with pytest.raises(WeightMismatchError, match="fc.weight"):
        inception.load_fid_inception_state(model, state)


def test_convert_refuses_other_state_dicts(tmp_path):
    pth, out = tmp_path / "other.pth", tmp_path / "other.safetensors"
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, pth)
    with pytest.raises(WeightMismatchError, match="not the FID Inception"):
        inception.convert_fid_inception(pth, out)
    assert not out.exists()


@pytest.mark.parametrize(
    "in_hw,out_hw", [((7, 9), (299, 299)), ((37, 50), (16, 23)), ((512, 384), (299, 299))]
)
def test_resize_matches_torch_interpolate(in_hw, out_hw):
    x = np.random.default_rng(2).standard_normal((2, *in_hw, 3)).astype(np.float32)
    want = F.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="bilinear", align_corners=False
    )
    got = np.asarray(inception_net.resize_bilinear_torch(x, out_hw))
    # The blend weights are bit-identical to PyTorch's; what remains is the
    # rounding of the blend itself (a few ulp of N(0, 1) values).
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)


def test_fid_between_image_sets_equals_fid_from_features():
    rng = np.random.default_rng(3)
    images_a = rng.uniform(0, 1, (23, 4, 4, 3)).astype(np.float32)
    images_b = rng.uniform(0, 1, (17, 4, 4, 3)).astype(np.float32) ** 2
    mixing = rng.standard_normal((48, 6))
    calls = []

    def toy_features(images):  # [B, 4, 4, 3] -> [B, 6]
        calls.append(len(images))
        return np.tanh(images.reshape(len(images), -1) @ mixing)

    got = fid.fid_between_image_sets(images_a, images_b, toy_features, batch_size=8)
    want = fid.fid_from_features(toy_features(images_a), toy_features(images_b))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert set(calls[:-2]) == {8}  # fixed-size batches: a jitted extractor compiles once
