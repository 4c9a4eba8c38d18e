"""What a trained diffusion model is: the U-Net's architecture plus the diffusion it
was trained for. ``ModelSpec`` is stored in every checkpoint (as a plain dict) so that
the sampler can rebuild network and diffusion from the file alone; a class-conditional
model (``conditioning = class``) records its class names and their count there too.

A diffusion checkpoint holds two sets of weights: ``model``, the raw weights of the last
training step, and ``ema``, their average (``ddpm.ema``; ``AveragedModel``'s state:
``module.*`` plus ``n_averaged``). ``load_model`` picks one: ``weights`` is ``ema`` or ``raw``.
Both check, as ``check_model_checkpoint`` does, that the weights fit the network the stored
config describes and are finite, so a checkpoint whose config and weights disagree, or whose
weights hold NaN or ∞, is refused on load (one line naming the file and the first bad tensor).
"""

from dataclasses import asdict, dataclass, field

from ddpm.config.sampling import WEIGHTS
from ddpm.checkpoint import CheckpointError, check_finite, load_checkpoint
from ddpm.errors import InputError
from ddpm.files import first_line
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
            raise InputError(f"conditioning=class needs num_classes >= 1 and as many class names, got "
                             f"num_classes={self.num_classes} and {len(self.classes)} names")
        if self.conditioning == "none" and (self.num_classes or self.classes):
            raise InputError("conditioning=none takes no classes")

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


def weights_mismatch(expected: dict, state: dict) -> str | None:
    """How the tensors of ``state`` differ from those a network expects (one line), or None."""
    shape = lambda v: list(v.shape) if hasattr(v, "shape") else type(v).__name__  # noqa: E731
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    other = [k for k in expected if k in state and shape(state[k]) != shape(expected[k])]
    parts = ([f"{len(other)} of another shape (e.g. {other[0]}: {shape(state[other[0]])} stored, "
              f"{shape(expected[other[0]])} for the config)"] if other else []) \
        + ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) \
        + ([f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else [])
    return ", ".join(parts) or None




def stored_weights(ckpt: dict, weights: str) -> dict:
    """The state dict of a checkpoint's ``ema`` (the average; ``AveragedModel``'s ``module.*`` entries
    without their prefix) or ``raw`` (``model``) weights."""
    if weights not in WEIGHTS:
        raise InputError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    state = ckpt["model" if weights == "raw" else "ema"]
    if weights == "ema":  # AveragedModel's state: "module.*" weights plus "n_averaged"
        state = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
    return state


def check_model_checkpoint(ckpt: dict, path, weights: tuple[str, ...] = WEIGHTS) -> tuple[UNet, ModelSpec]:
    """The U-Net (untrained) and ``ModelSpec`` that the checkpoint's stored config describes, after
    checking that each of its ``weights`` fits that network (``CheckpointError`` naming ``path`` if not)
    and is finite (``NonFiniteError`` naming ``path`` and the first bad tensor if not)."""
    try:
        spec = ModelSpec.from_dict(ckpt["config"]["model"])
        net = spec.build_unet()
        states = {w: stored_weights(ckpt, w) for w in weights}
    except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not describe a diffusion model: "
                              f"{type(e).__name__}: {first_line(e)}") from e
    expected = net.state_dict()
    for w, state in states.items():
        mismatch = weights_mismatch(expected, state)
        if mismatch:
            raise CheckpointError(f"checkpoint {path}: its {w} weights do not match its stored config ({mismatch})")
        check_finite(state, f"checkpoint {path}: its {w} weights")
    return net, spec


def load_model(path, device="cpu", weights: str = "ema") -> tuple[UNet, ModelSpec, dict]:
    """Rebuild the U-Net from a checkpoint; ``weights`` is ``ema`` or ``raw``. Returns (net, spec, ckpt)."""
    if weights not in WEIGHTS:
        raise InputError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    ckpt = load_checkpoint(path, map_location="cpu")
    net, spec = check_model_checkpoint(ckpt, path, (weights,))
    net.load_state_dict(stored_weights(ckpt, weights))
    return net.to(device).eval(), spec, ckpt
