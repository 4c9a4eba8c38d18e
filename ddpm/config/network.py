"""The U-Net's size (``ddpm.unet``): what params.yaml's ``model`` section holds."""

from dataclasses import asdict, dataclass
from typing import Annotated

from annotated_types import Ge, Lt, MinLen

from ddpm.errors import InputError


@dataclass
class UNetConfig:
    # The bounds are metadata (annotated_types) that the params schema enforces.
    ch: Annotated[int, Ge(1)] = 64
    ch_mult: Annotated[tuple[Annotated[int, Ge(1)], ...], MinLen(1)] = (1, 2, 2)
    num_res_blocks: Annotated[int, Ge(1)] = 2
    attn_resolutions: tuple[Annotated[int, Ge(1)], ...] = (14,)
    dropout: Annotated[float, Ge(0), Lt(1)] = 0.1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    def validate(self, image_size: int) -> None:
        levels = len(self.ch_mult)
        if self.ch < 1 or self.num_res_blocks < 1 or levels < 1 or min(self.ch_mult) < 1:
            raise InputError("model: ch, num_res_blocks and every ch_mult entry must be >= 1")
        if image_size % 2 ** (levels - 1):
            raise InputError(f"model: image size {image_size} is not divisible by 2^{levels - 1} "
                             f"(ch_mult has {levels} levels)")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        resolutions = [image_size // 2 ** level for level in range(levels)]
        unknown = [r for r in self.attn_resolutions if r not in resolutions]
        if unknown:  # attention at a resolution the network never has would silently be no attention
            raise InputError(f"model.attn_resolutions {unknown} names no resolution of the network: with image "
                             f"size {image_size} and {levels} levels (ch_mult) they are {resolutions}")
