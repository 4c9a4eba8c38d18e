import pytest
import torch

from ddpm.unet import UNet, UNetConfig, timestep_embedding


@pytest.mark.parametrize("cfg,size,cin,cout", [
    (UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(14,)), 28, 1, 1),
    (UNetConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16, 8)), 32, 3, 6),
    (UNetConfig(ch=12, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()), 9, 1, 2),
])
def test_output_shape(cfg, size, cin, cout):
    net = UNet(cfg, image_size=size, in_channels=cin, out_channels=cout)
    x = torch.randn(3, cin, size, size)
    out = net(x, torch.tensor([0, 5, 999]))
    assert out.shape == (3, cout, size, size)


def test_ddpm_cifar10_parameter_count():
    """Ho et al.'s CIFAR-10 model has 35.7M parameters."""
    cfg = UNetConfig(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
    net = UNet(cfg, image_size=32, in_channels=3, out_channels=3)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 35.7


@pytest.mark.parametrize("ch", [8, 16, 64])
def test_timestep_conditioning_matters(ch):
    """Also at widths of 32 channels or fewer, where one channel per GroupNorm group would erase the
    embedding (the difference was float noise, 1e-7 of the output, before norm() kept 2 per group)."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(ch=ch, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0),
               image_size=8, in_channels=1, out_channels=1)
    for p in net.parameters():  # zero-initialised output layers would hide the dependence
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        a, b = net(x, torch.tensor([1])), net(x, torch.tensor([900]))
    assert (a - b).norm() > 1e-3 * a.norm()  # float noise is ~1e-7


def test_timestep_embedding_is_sinusoidal():
    e = timestep_embedding(torch.tensor([0, 10]), 6)
    assert e.shape == (2, 6)
    assert torch.allclose(e[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))


def test_bad_image_size_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        UNet(UNetConfig(ch_mult=(1, 2, 2, 2)), image_size=28, in_channels=1, out_channels=1)


def test_upsample_is_nearest_neighbour():
    """The CPU path of Upsample (repeated pixels) is F.interpolate(mode="nearest"), forward and backward."""
    import torch.nn.functional as F

    from ddpm.unet import Upsample

    x = torch.randn(3, 5, 7, 6, requires_grad=True)
    g = torch.randn(3, 5, 14, 12)
    out = Upsample()(x)
    (grad,) = torch.autograd.grad(out, x, g)
    ref = F.interpolate(x, scale_factor=2, mode="nearest")
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(out, ref)
    assert torch.allclose(grad, ref_grad, atol=1e-6)
