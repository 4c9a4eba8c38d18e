import pytest
import torch

from ddpm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ddpm.model import ModelSpec, load_model
from ddpm.unet import UNetConfig


def test_model_rebuilt_from_file_alone(tmp_path):
    spec = ModelSpec(unet=UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()), image_size=8,
                     channels=1, schedule="cosine", timesteps=50, prediction="v")
    net = spec.build_unet()
    ema = {f"module.{k}": v + 1 for k, v in net.state_dict().items()} | {"n_averaged": torch.tensor(3)}
    save_checkpoint(tmp_path / "m.pt", step=7, config={"model": spec.to_dict()}, model=net.state_dict(), ema=ema)
    rebuilt, spec2, ckpt = load_model(tmp_path / "m.pt")
    assert spec2 == spec and ckpt["step"] == 7
    for k, v in rebuilt.state_dict().items():  # the EMA weights are the ones loaded
        assert torch.equal(v, net.state_dict()[k] + 1)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_truncated_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "m.pt", step=1, config={}, model={"w": torch.zeros(1000)})
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.pt is corrupt"):
        load_checkpoint(tmp_path / "m.pt")


def test_foreign_and_missing_checkpoints(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a ddpm-checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    save_checkpoint(tmp_path / "cls.pt", step=1, config={"classifier": {}}, model={})
    with pytest.raises(CheckpointError, match="does not describe a diffusion model"):
        load_model(tmp_path / "cls.pt")
