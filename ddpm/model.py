"""What a trained diffusion model is: the U-Net's architecture plus the diffusion it
was trained for. ``ModelSpec`` is stored in every checkpoint (as a plain dict) so that
the sampler can rebuild network and diffusion from the file alone; a class-conditional
model (``conditioning = class``) records its class names and their count there too.
"""

from dataclasses import asdict, dataclass, field

from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.diffusion import Diffusion
from ddpm.guidance import check_conditioning
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
    # none | class, and the class names (their count is num_classes); absent from older checkpoints
    conditioning: str = "none"
    num_classes: int = 0
    classes: list[str] = field(default_factory=list)

    def __post_init__(self):
        check_conditioning(self.conditioning)
        if self.conditioning == "class" and not (self.num_classes >= 1 and len(self.classes) == self.num_classes):
            raise ValueError(f"conditioning=class needs num_classes >= 1 and as many class names, got "
                             f"num_classes={self.num_classes} and {len(self.classes)} names")
        if self.conditioning == "none" and (self.num_classes or self.classes):
            raise ValueError("conditioning=none takes no classes")

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
        return cls(unet=unet, **{**d, "classes": list(d.get("classes", []))})

    def build_unet(self) -> UNet:
        return UNet(self.unet, image_size=self.image_size, in_channels=self.channels, out_channels=self.out_channels,
                    num_classes=self.num_classes)

    def build_diffusion(self, device="cpu") -> Diffusion:
        return Diffusion.from_schedule(self.schedule, self.timesteps, device=device)


def load_model(path, device="cpu", weights: str = "ema") -> tuple[UNet, ModelSpec, dict]:
    """Rebuild the U-Net from a checkpoint; ``weights`` is ``ema`` or ``model``. Returns (net, spec, ckpt)."""
    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        spec = ModelSpec.from_dict(ckpt["config"]["model"])
        net = spec.build_unet()
        state = ckpt[weights]
        if weights == "ema":  # AveragedModel's state: "module.*" weights plus "n_averaged"
            state = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
        net.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not describe a diffusion model: {e}") from e
    return net.to(device).eval(), spec, ckpt
