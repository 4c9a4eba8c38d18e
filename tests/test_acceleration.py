"""The fast-path options: their defaults change nothing on CPU; CUDA-only choices fail early."""

import pytest
import torch

from ddpm.acceleration import check_choices, compile_model, make_adamw, make_denoiser, prepare_model
from ddpm.diffusion import Diffusion
from ddpm.training import TrainConfig, init_state, train
from ddpm.unet import UNet, UNetConfig


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)), image_size=8,
                in_channels=1, out_channels=1)


def test_defaults_are_no_ops_on_cpu():
    net = tiny_unet()
    assert prepare_model(net, "cpu") is net and compile_model(net) is net
    assert make_adamw(net.parameters(), "cpu", lr=1e-3).defaults["fused"] is None
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    net.eval()
    assert torch.equal(make_denoiser(net, "cpu")(x, t), net(x, t))


def test_channels_last_is_the_same_function():
    net = tiny_unet().eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    ref = net(x, t)
    out = make_denoiser(net, "cpu", memory_format="channels_last")(x, t)
    assert torch.allclose(out, ref, atol=1e-5)


def test_training_defaults_match_the_plain_algorithm():
    """With the default options, train() is bit for bit the plain loop: plain AdamW, eager
    model, float32, same random draws."""
    from ddpm.objectives import training_losses
    from ddpm.training import to_model_range

    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    d = Diffusion.from_schedule("linear", 100)
    cfg = TrainConfig(steps=3, batch_size=4, log_every=1, warmup_steps=1, grad_clip=0.0)
    state = train(init_state(tiny_unet(), cfg, 0, "cpu"), d, images, cfg)

    net = tiny_unet().train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(0)
    for step in range(cfg.steps):
        x0 = to_model_range(images[torch.randint(16, (4,), generator=g)])
        t = torch.randint(100, (4,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = training_losses(net, d, x0, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert state.losses[step][1] == loss.item()
    for a, b in zip(state.model.parameters(), net.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(precision="bf16"), "needs a CUDA device"),
    (dict(precision="tf32"), "needs a CUDA device"),
    (dict(precision="fp16"), "fp32, tf32, bf16"),
    (dict(compile="fast"), "none, default, max-autotune"),
    (dict(memory_format="nhwc"), "contiguous, channels_last"),
])
def test_bad_choices_fail_before_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_choices("cpu", **kwargs)
    with pytest.raises(ValueError, match=match):
        init_state(tiny_unet(), TrainConfig(**kwargs), 0, "cpu")
