"""The DCGAN generator and discriminator are the seed's models, for every supported shape."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipeline.models.dcgan import (
    Discriminator,
    Generator,
    GeneratorSpec,
    build_discriminator,
    build_generator,
    load_generator,
)

SIZES = [16, 32, 64, 128]
POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", SIZES)
def test_shapes_for_every_size_and_channel_count(image_size, channels):
    spec = GeneratorSpec(nz=10, ngf=4, image_size=image_size, channels=channels)
    generator = build_generator(spec)
    discriminator = build_discriminator(ndf=4, image_size=image_size, channels=channels)
    images = generator(torch.randn(3, 10))
    assert images.shape == (3, channels, image_size, image_size)
    assert images.abs().max() <= 1.0  # tanh: the range of the real images
    logits = discriminator(images)
    assert logits.shape == (3,)


def test_discriminator_gives_one_logit_per_image():
    discriminator = build_discriminator(ndf=8, image_size=32, channels=3).eval()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        together = discriminator(images)
        one_by_one = torch.cat([discriminator(image[None]) for image in images])
    torch.testing.assert_close(together, one_by_one)
    # A logit: BCEWithLogitsLoss takes it directly.
    loss = nn.BCEWithLogitsLoss()(together, torch.ones(5))
    assert torch.isfinite(loss)


def test_dcgan_initialisation_statistics():
    generator = build_generator(GeneratorSpec(nz=100, ngf=32, image_size=64, channels=3))
    discriminator = build_discriminator(ndf=32, image_size=64, channels=3)
    for model in (generator, discriminator):
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
                weight = module.weight.detach()
                if weight.numel() >= 1000:  # enough draws for tight statistics
                    assert abs(weight.mean().item()) < 0.002, module
                    assert 0.018 < weight.std().item() < 0.022, module
            if isinstance(module, nn.BatchNorm2d):
                assert abs(module.weight.mean().item() - 1.0) < 0.01
                assert 0.01 < module.weight.std().item() < 0.03
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                assert torch.count_nonzero(bias) == 0, module


def test_same_seed_same_weights():
    spec = GeneratorSpec(nz=10, ngf=4, image_size=16, channels=1)
    torch.manual_seed(5)
    first = build_generator(spec).state_dict()
    torch.manual_seed(5)
    second = build_generator(spec).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def output_shapes(model: nn.Module, kinds: tuple[type, ...], x: torch.Tensor) -> list:
    """Output shapes of the modules of `kinds`, in forward order."""
    shapes = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
        for m in model.modules()
        if isinstance(m, kinds)
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    return shapes


@pytest.mark.parametrize("image_size", SIZES)
def test_generator_layers_follow_the_seed(image_size):
    ngf, layers = 4, {16: 2, 32: 3, 64: 4, 128: 5}[image_size]
    generator = Generator(nz=10, ngf=ngf, image_size=image_size, channels=3)
    modules = list(generator.modules())
    # One fully connected layer, the first; then only transposed convolutions.
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    assert linears == [generator.project]
    assert not any(isinstance(m, (*POOLING, nn.Conv2d)) for m in modules)
    body = list(generator.body)
    assert isinstance(body[-1], nn.Tanh) and isinstance(body[-2], nn.ConvTranspose2d)
    # Every hidden layer (the reshaped projection, every transposed conv but the last): BN, ReLU.
    hidden = [body[:2]] + [
        body[i + 1 : i + 3] for i, m in enumerate(body[:-2]) if isinstance(m, nn.ConvTranspose2d)
    ]
    assert len(hidden) == layers
    for bn, relu in hidden:
        assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    # Deep and narrow 4x4 start; each stride-2 layer doubles the side and halves the depth.
    shapes = output_shapes(generator, (nn.BatchNorm2d, nn.ConvTranspose2d), torch.randn(2, 10))
    bn_shapes = [s for i, s in enumerate(shapes[:-1]) if i % 2 == 0]
    expected = [(2, ngf * 2 ** (layers - 1 - i), 4 * 2**i, 4 * 2**i) for i in range(layers)]
    assert bn_shapes == expected
    assert shapes[-1] == (2, 3, image_size, image_size)
    convs = [m for m in modules if isinstance(m, nn.ConvTranspose2d)]
    assert all(conv.stride == (2, 2) for conv in convs)


@pytest.mark.parametrize("image_size", SIZES)
def test_discriminator_layers_follow_the_seed(image_size):
    ndf, layers = 4, {16: 2, 32: 3, 64: 4, 128: 5}[image_size]
    discriminator = Discriminator(ndf=ndf, image_size=image_size, channels=1)
    modules = list(discriminator.modules())
    assert not any(isinstance(m, (*POOLING, nn.ConvTranspose2d)) for m in modules)
    body = list(discriminator.body)
    convs = [m for m in body if isinstance(m, nn.Conv2d)]
    assert len(convs) == layers and all(conv.stride == (2, 2) for conv in convs)
    # No batch norm on the first layer; on every other one. LeakyReLU(0.2) everywhere.
    assert isinstance(body[0], nn.Conv2d) and isinstance(body[1], nn.LeakyReLU)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in body) == layers - 1
    for i, module in enumerate(body[1:], start=1):
        if isinstance(module, nn.Conv2d):
            assert isinstance(body[i + 1], nn.BatchNorm2d)
    assert all(m.negative_slope == 0.2 for m in body if isinstance(m, nn.LeakyReLU))
    assert not any(isinstance(m, nn.ReLU | nn.Sigmoid) for m in modules)
    # The last conv's 4x4 map is flattened into ONE output unit.
    x = torch.randn(2, 1, image_size, image_size)
    conv_shapes = output_shapes(discriminator, (nn.Conv2d,), x)
    assert conv_shapes[-1] == (2, ndf * 2 ** (layers - 1), 4, 4)
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].out_features == 1
    assert linears[0].in_features == ndf * 2 ** (layers - 1) * 16


@pytest.mark.parametrize(
    ("image_size", "channels"), [(8, 1), (24, 1), (256, 3), (0, 1), (100, 3), (32, 2), (32, 4)]
)
def test_invalid_shapes_are_rejected(image_size, channels):
    with pytest.raises(ValueError, match=r"image_size|channels"):
        GeneratorSpec(nz=10, ngf=4, image_size=image_size, channels=channels)
    with pytest.raises(ValueError, match=r"image_size|channels"):
        Generator(nz=10, ngf=4, image_size=image_size, channels=channels)
    with pytest.raises(ValueError, match=r"image_size|channels"):
        build_discriminator(ndf=4, image_size=image_size, channels=channels)


@pytest.mark.parametrize(
    "bad",
    [{"nz": 0}, {"ngf": 0}, {"nz": "100"}, {"image_size": 32.0}, {"channels": True}],
)
def test_invalid_spec_values_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GeneratorSpec(**{"nz": 10, "ngf": 4, "image_size": 32, "channels": 1, **bad})


def test_spec_from_dict_names_missing_and_unknown_keys():
    with pytest.raises(ValueError, match=r"missing keys \['ngf'\], unknown keys \['ngf_'\]"):
        GeneratorSpec.from_dict({"nz": 10, "ngf_": 4, "image_size": 32, "channels": 1})


def test_spec_round_trip_rebuilds_a_generator_that_loads_the_saved_weights(tmp_path):
    spec = GeneratorSpec(nz=12, ngf=8, image_size=32, channels=3)
    generator = build_generator(spec)
    generator(torch.randn(8, 12))  # train mode: moves the BN running statistics
    torch.save(generator.state_dict(), tmp_path / "generator.pt")
    (tmp_path / "generator.json").write_text(json.dumps({"spec": spec.to_dict()}))

    saved = json.loads((tmp_path / "generator.json").read_text())
    rebuilt_spec = GeneratorSpec.from_dict(saved["spec"])
    assert rebuilt_spec == spec
    rebuilt = load_generator(tmp_path / "generator.pt", rebuilt_spec)
    assert not rebuilt.training
    z = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(z), generator.eval()(z), rtol=0, atol=0)

    # The raw file loads with weights_only=True into a generator built from the spec alone.
    plain = build_generator(rebuilt_spec)
    plain.load_state_dict(torch.load(tmp_path / "generator.pt", weights_only=True))
    # Weights of another spec do not load silently.
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_generator(tmp_path / "generator.pt", GeneratorSpec(12, 4, 32, 3))


def test_channels_last_gives_the_same_outputs():
    generator = build_generator(GeneratorSpec(nz=10, ngf=8, image_size=32, channels=3)).eval()
    discriminator = build_discriminator(ndf=8, image_size=32, channels=3).eval()
    z = torch.randn(4, 10)
    with torch.no_grad():
        images, logits = generator(z), discriminator(generator(z))
        generator.to(memory_format=torch.channels_last)
        discriminator.to(memory_format=torch.channels_last)
        images_cl = generator(z)
        logits_cl = discriminator(images_cl.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(images_cl, images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_cl, logits, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_runs_and_backpropagates():
    generator = build_generator(GeneratorSpec(nz=10, ngf=8, image_size=32, channels=1))
    discriminator = build_discriminator(ndf=8, image_size=32, channels=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = discriminator(generator(torch.randn(4, 10)))
        loss = nn.BCEWithLogitsLoss()(logits.float(), torch.ones(4))
    loss.backward()
    assert logits.shape == (4,) and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in generator.parameters())
