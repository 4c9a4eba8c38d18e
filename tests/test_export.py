"""`python -m pipeline export`: a checkpoint as a diffusers pipeline folder. The exported
UNet2DModel computes our network's function (random weights everywhere, so no layer can hide
behind a zero initialisation), DDPMPipeline / DDIMPipeline load the folder and sample, and what
diffusers cannot represent fails before anything is written, naming it."""

import json

import pytest
import torch
from tiny import cli, errors

from ddpm.checkpoint import save_checkpoint
from ddpm.model import ModelSpec
from ddpm.unet import UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def checkpoint(path, ch: int = 64, **spec) -> ModelSpec:
    """A checkpoint of an 8×8 U-Net with random weights (EMA and raw alike)."""
    s = ModelSpec(unet=UNetConfig(ch=ch, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0),
                  image_size=8, channels=1, timesteps=50, **spec)
    torch.manual_seed(0)
    net = s.build_unet()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    sd = net.state_dict()
    ema = {**{f"module.{k}": v for k, v in sd.items()}, "n_averaged": torch.tensor(1)}
    save_checkpoint(path, step=7, config={"model": s.to_dict()}, model=sd, ema=ema)
    return s


def test_export_loads_in_diffusers_computes_our_network_and_samples(tmp_path):
    from diffusers import DDIMPipeline, DDPMPipeline, UNet2DModel

    from ddpm.model import load_model

    spec = checkpoint(tmp_path / "model.pt", schedule="cosine", prediction="v")
    result = cli(tmp_path, "export", "--checkpoint", "model.pt", "--out", "exported")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exported/unet/diffusion_pytorch_model.safetensors").is_file()
    scheduler = json.loads((tmp_path / "exported/scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["num_train_timesteps"] == 50
    betas = spec.build_diffusion().betas64
    assert torch.allclose(torch.tensor(scheduler["trained_betas"], dtype=torch.float64), betas, rtol=0, atol=1e-12)

    ours, _, _ = load_model(tmp_path / "model.pt")
    theirs = UNet2DModel.from_pretrained(tmp_path / "exported", subfolder="unet").eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 13, 31, 49])
    with torch.no_grad():
        a, b = ours(x, t), theirs(x, t).sample
    assert a.abs().max() > 0.1  # a network that computes something
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)

    for Pipeline, steps in ((DDPMPipeline, 3), (DDIMPipeline, 2)):
        pipe = Pipeline.from_pretrained(tmp_path / "exported")
        images = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
        assert images.shape == (2, 8, 8, 1) and ((images >= 0) & (images <= 1)).all()


@pytest.mark.parametrize("spec, naming", [
    (dict(prediction="mean"), "prediction: mean"),
    (dict(variance="learned"), "variance: learned"),
    (dict(conditioning="class", num_classes=2, classes=["a", "b"]), "conditioning: class"),
    (dict(ch=16), "GroupNorm"),
])
def test_unsupported_configs_fail_naming_what(tmp_path, spec, naming):
    checkpoint(tmp_path / "model.pt", **spec)
    result = cli(tmp_path, "export", "--checkpoint", "model.pt", "--out", "exported")
    assert result.exit_code == 1
    (line,) = errors(result)
    assert line.startswith("error: model.pt: diffusers cannot represent this model:") and naming in line, line
    assert not (tmp_path / "exported").exists()
