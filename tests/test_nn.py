import json

import pytest
import torch

from sbi_gen.nn import (
    CNN,
    EMBEDDINGS,
    MLP,
    Flatten,
    HyperparameterError,
    ResidualMLP,
    TimeEmbedding,
    build_embedding,
    default_embedding,
)


def _all_grads_nonzero(module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_mlp_and_residual_mlp_shapes(batch):
    torch.manual_seed(0)
    for net in (MLP(5, 3, hidden=(16, 16)), ResidualMLP(5, 3, hidden=16, blocks=2), MLP(5, 3, hidden=())):
        assert net(torch.randn(*batch, 5)).shape == (*batch, 3)
    assert len([m for m in MLP(5, 3, hidden=()).modules() if isinstance(m, torch.nn.Linear)]) == 1


@pytest.mark.parametrize("activation", ["relu", "silu", "elu", "gelu", "tanh", torch.nn.Softplus])
def test_activations_by_name_or_constructor(activation):
    assert MLP(2, 1, hidden=(4,), activation=activation)(torch.randn(3, 2)).shape == (3, 1)


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(2, 1, activation="swishy")


def test_flatten():
    x = torch.randn(2, 3, 4, 5)
    assert Flatten(1)(x) is x
    assert Flatten(2)(x).shape == (2, 3, 20)
    assert Flatten(3)(x).shape == (2, 60)


@pytest.mark.parametrize("in_shape", [(12, 12), (2, 12, 10), (8, 8)])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_cnn_shapes(in_shape, batch):
    net = CNN(in_shape, out_features=7, channels=(4, 8, 8), hidden=(16,))
    assert net(torch.randn(*batch, *in_shape)).shape == (*batch, 7)


def test_cnn_pools_down_to_a_few_pixels_by_default():
    net = CNN((64, 64))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in net.modules() if isinstance(m, torch.nn.AvgPool2d)]
    assert [c.dilation[0] for c in convs] == [1] * 5 and len(pools) == 4  # 64 → 32 → 16 → 8 → 4 pixels
    assert net.convs(torch.randn(2, 1, 64, 64)).shape == (2, 64, 4, 4)
    # Pooling stops while the map is at least 4 pixels across, or when a side is odd.
    assert len([m for m in CNN((8, 8)).modules() if isinstance(m, torch.nn.AvgPool2d)]) == 2
    assert len([m for m in CNN((12, 10)).modules() if isinstance(m, torch.nn.AvgPool2d)]) == 1
    assert CNN((12, 10))(torch.randn(3, 12, 10)).shape == (3, 64)
    # A wider kernel stops pooling earlier: its circular padding must fit the map.
    wide = CNN((16, 16), channels=(2, 2, 2, 2), kernel_size=7)
    assert len([m for m in wide.modules() if isinstance(m, torch.nn.AvgPool2d)]) == 1  # 16 → 8, not 4
    assert wide(torch.randn(2, 16, 16)).shape == (2, 64)


def test_cnn_dilations_cover_the_map_and_stay_valid():
    net = CNN((64, 64), pool=False)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.dilation[0] for c in convs] == [1, 2, 4, 8, 16]
    assert 1 + sum(2 * c.dilation[0] for c in convs) >= 63  # receptive field spans the map
    small = CNN((6, 6), channels=(2, 2, 2, 2), kernel_size=5, pool=False)  # dilation capped, circular padding valid
    assert small(torch.randn(2, 6, 6)).shape == (2, 64)


@pytest.mark.parametrize(
    ("shift", "pool"),
    # Pooled, 16 × 24 → 8 × 12 → 4 × 6 → 2 × 3: exact for shifts by multiples of 8 pixels.
    [((1, 0), False), ((0, 3), False), ((5, -7), False), ((11, 13), False), ((8, 0), True), ((-8, 16), True)],
)
def test_cnn_is_invariant_to_circular_shifts(shift, pool):
    torch.manual_seed(0)
    net = CNN((16, 24), out_features=5, channels=(4, 8, 8, 8), hidden=(16,), pool=pool)
    x = torch.randn(6, 16, 24)
    shifted = torch.roll(x, shifts=shift, dims=(-2, -1))
    out, out_shifted = net(x), net(shifted)
    torch.testing.assert_close(out_shifted, out, atol=1e-5, rtol=1e-5)
    # ...while it does see the statistics of the map: another amplitude gives another output
    # (white-noise maps with equal variance share their statistics, hence their outputs).
    assert not torch.allclose(net(3 * x), out, atol=1e-3)


@pytest.mark.parametrize(("shift", "pool"), [((2, 7), False), ((2, 8), True)])  # pooled once: 10 → 5 pixels
def test_cnn_multichannel_is_shift_invariant(shift, pool):
    torch.manual_seed(1)
    net = CNN((3, 10, 10), out_features=4, channels=(4, 4), pool=pool)
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(net(torch.roll(x, shift, (-2, -1))), net(x), atol=1e-5, rtol=1e-5)


def test_cnn_convolves_large_batches_in_passes_with_the_same_result():
    # 64 channels × 16 × 16 float32 = 64 KiB a map: 64 maps a pass within 4 MiB.
    from sbi_gen.nn import CPU_ACTIVATION_BYTES

    net = CNN((16, 16), out_features=4, channels=(8, 64), hidden=(8,), pool=False)
    assert net.rows_per_pass() == CPU_ACTIVATION_BYTES // (64 * 16 * 16 * 4) == 64
    # Pooled, the 64 channels are 8 × 8 pixels and the widest activation is theirs.
    assert CNN((16, 16), channels=(8, 64)).rows_per_pass() == CPU_ACTIVATION_BYTES // (64 * 8 * 8 * 4)
    assert net.rows_per_pass(torch.float64) == 32
    x = torch.randn(600, 16, 16, generator=torch.Generator().manual_seed(0))  # 10 passes, the last of 24
    together = net(x)
    one_by_one = torch.cat([net(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)
    together.square().sum().backward()
    _all_grads_nonzero(net)
    assert net(torch.zeros(0, 16, 16)).shape == (0, 4)


def test_cnn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="odd"):
        CNN((8, 8), kernel_size=4)
    with pytest.raises(ValueError, match="maps of shape"):
        CNN((8,))


@pytest.mark.parametrize(
    "net, x",
    [
        (MLP(4, 2, hidden=(8, 8)), torch.randn(5, 4)),
        (ResidualMLP(4, 2, hidden=8, blocks=2), torch.randn(5, 4)),
        (CNN((8, 8), out_features=3, channels=(4, 4), hidden=(8,)), torch.randn(5, 8, 8)),
    ],
    ids=["mlp", "resmlp", "cnn"],
)
def test_gradients_reach_every_parameter(net, x):
    torch.manual_seed(0)
    x = x.requires_grad_()
    net(x).square().sum().backward()
    _all_grads_nonzero(net)
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dim", [2, 16, 17])
def test_time_embedding(dim):
    emb = TimeEmbedding(dim)
    t = torch.rand(4, 3)
    e = emb(t)
    assert e.shape == (4, 3, dim)
    assert e.abs().max() <= 1.0
    if dim % 2:
        assert torch.all(e[..., -1] == 0)
    half = dim // 2
    torch.testing.assert_close(e[..., :half] ** 2 + e[..., half : 2 * half] ** 2, torch.ones(4, 3, half))
    # Distinct times, even close ones, get distinct embeddings; the first frequency has period 2π/scale.
    close = emb(torch.tensor([0.5, 0.501]))
    assert (close[0] - close[1]).abs().max() > 1e-2
    assert emb(torch.tensor(0.3)).shape == (dim,)
    assert "freqs" not in emb.state_dict()  # derived from dim: rebuilt, not saved
    assert emb.to(torch.float64)(torch.rand(2, dtype=torch.float64)).dtype == torch.float64


def test_time_embedding_rejects_tiny_dim():
    with pytest.raises(ValueError):
        TimeEmbedding(1)


@pytest.mark.parametrize("name", sorted(EMBEDDINGS))
@pytest.mark.parametrize("c_shape", [(5,), (8, 8)])
def test_build_embedding(name, c_shape):
    if name == "cnn" and len(c_shape) == 1:
        with pytest.raises(ValueError):
            build_embedding(name, c_shape)
        return
    kwargs = {} if name == "identity" else json.loads(json.dumps({"out_features": 6}))
    net, features = build_embedding(name, c_shape, **kwargs)
    expected = (5 if c_shape == (5,) else 64) if name == "identity" else 6
    assert features == expected
    assert net(torch.randn(3, 2, *c_shape)).shape == (3, 2, features)
    assert net(torch.randn(*c_shape)).shape == (features,)


def test_build_embedding_errors_and_defaults():
    assert default_embedding((3,)) == "identity"
    assert default_embedding((16, 16)) == "cnn"
    assert default_embedding((2, 16, 16)) == "cnn"
    with pytest.raises(ValueError, match="unknown embedding"):
        build_embedding("transformer", (3,))
    with pytest.raises(TypeError, match=r"embedding 'mlp' got unknown arguments \['widths'\]; it accepts \["):
        build_embedding("mlp", (3,), widths=[3])
    with pytest.raises(ValueError):
        build_embedding("mlp", ())
    net, _ = build_embedding("mlp", (3,), hidden=[8, 8], activation="relu")  # JSON lists are fine
    assert net(torch.randn(2, 3)).shape == (2, 64)


def test_unknown_embedding_arguments_are_also_a_value_error():
    with pytest.raises(ValueError) as caught:
        build_embedding("cnn", (8, 8), width=3)
    assert isinstance(caught.value, HyperparameterError) and isinstance(caught.value, TypeError)


@pytest.mark.parametrize(
    ("name", "c_shape", "kwargs", "message"),
    [
        ("mlp", (3,), {"out_features": 0}, "mlp embedding: out_features must be positive, got 0"),
        ("mlp", (3,), {"hidden": "abc"}, "mlp embedding: hidden must be a list of positive integers, got 'abc'"),
        ("resmlp", (3,), {"hidden": [16]}, "resmlp embedding: hidden must be an integer, got [16]"),
        ("resmlp", (3,), {"blocks": -1}, "resmlp embedding: blocks must be non-negative, got -1"),
        ("cnn", (8, 8), {"out_features": -4}, "cnn embedding: out_features must be positive, got -4"),
        ("cnn", (8, 8), {"channels": [4, 0]}, "cnn embedding: channels must be a list of positive integers, got [4, 0]"),
        ("cnn", (8, 8), {"hidden": [8.5]}, "cnn embedding: hidden must be a list of positive integers, got [8.5]"),
        ("cnn", (8, 8), {"kernel_size": -3}, "cnn embedding: kernel_size must be positive, got -3"),
    ],
)
def test_bad_embedding_sizes_are_one_line_errors(name, c_shape, kwargs, message):
    with pytest.raises(ValueError) as caught:
        build_embedding(name, c_shape, **kwargs)
    assert str(caught.value) == message


def test_activation_given_as_a_list_is_an_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation \['relu'\]; known: elu"):
        build_embedding("mlp", (3,), activation=["relu"])
