"""What a trained diffusion model is: the U-Net's architecture plus the diffusion it
was trained for. ``ModelSpec`` is stored in every checkpoint (as a plain dict) so that
the sampler can rebuild network and diffusion from the file alone.

A diffusion checkpoint holds two sets of weights: ``model``, the raw weights of the last
training step, and ``ema``, their average (``ddpm.ema``; ``AveragedModel``'s state:
``module.*`` plus ``n_averaged``). ``load_model`` picks one: ``weights`` is ``ema`` or ``raw``.
"""

from dataclasses import asdict, dataclass, field

from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.diffusion import Diffusion
from ddpm.unet import UNet, UNetConfig


@dataclass
class ModelSpec:
    unet: UNetConfig = field(default_factory=UNetConfig)
    image_size: int = 28
    channels: int = 1
    schedule: str = "linear"
    timesteps: int = 1000
    prediction: str = "eps"
    # fixed_small | fixed_large | learned; absent from checkpoints written before it existed
    variance: str = "fixed_small"

    @property
    def out_channels(self) -> int:
        """The image channels, twice over when the network also predicts its variance."""
        return 2 * self.channels if self.variance == "learned" else self.channels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet"] = self.unet.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        u = dict(d.pop("unet"))
        unet = UNetConfig(**{**u, "ch_mult": tuple(u["ch_mult"]), "attn_resolutions": tuple(u["attn_resolutions"])})
        return cls(unet=unet, **d)

    def build_unet(self) -> UNet:
        return UNet(self.unet, image_size=self.image_size, in_channels=self.channels, out_channels=self.out_channels)

    def build_diffusion(self, device="cpu") -> Diffusion:
        return Diffusion.from_schedule(self.schedule, self.timesteps, device=device)


WEIGHTS = ("ema", "raw")  # which weights of a checkpoint: the average, or the last step's


def load_model(path, device="cpu", weights: str = "ema") -> tuple[UNet, ModelSpec, dict]:
    """Rebuild the U-Net from a checkpoint; ``weights`` is ``ema`` or ``raw``. Returns (net, spec, ckpt)."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        spec = ModelSpec.from_dict(ckpt["config"]["model"])
        net = spec.build_unet()
        state = ckpt["model" if weights == "raw" else "ema"]
        if weights == "ema":  # AveragedModel's state: "module.*" weights plus "n_averaged"
            state = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
        net.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not describe a diffusion model: {e}") from e
    return net.to(device).eval(), spec, ckpt
