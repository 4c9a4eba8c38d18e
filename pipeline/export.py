"""Command `export` (not a DVC stage): a trained model as a diffusers pipeline folder.

    python -m pipeline export --checkpoint models/model.pt --out exported/

writes what ``DDPMPipeline.from_pretrained("exported")`` and ``DDIMPipeline.from_pretrained``
load: ``unet/`` (a diffusers ``UNet2DModel`` holding the EMA weights, as safetensors),
``scheduler/`` (a ``DDPMScheduler`` with exactly the model's β as ``trained_betas``, its
prediction type and its variance) and ``model_index.json``.

``UNet2DModel`` is built with the architecture of ``ddpm.unet.UNet`` (the same as the
benchmark peer): the widths ``ch · ch_mult``, ``num_res_blocks`` residual blocks per level
(+1 in the decoder), single-head attention at the same resolutions and in the middle,
GroupNorm, dropout, the sinusoidal timestep embedding (cos first, no frequency shift) and
its 4·ch MLP. The weights are mapped tensor by tensor (q, k and v come from rows of the one
1×1 ``qkv`` convolution), loaded strictly, and before anything is written the diffusers
network is run against ours on a random batch (the largest difference is printed).

What diffusers cannot represent stops the command before any work, naming it:
``prediction: mean`` (its schedulers predict epsilon, sample or v_prediction),
``variance: learned`` (DDIMScheduler has no learned variance: the extra output channels
would be read as the prediction), ``conditioning: class`` (``DDPMPipeline`` and
``DDIMPipeline`` sample unconditionally, without class labels), and GroupNorm group counts
that differ within the network (``UNet2DModel`` has one ``norm_num_groups``; ours takes up to
32 groups of at least 2 channels, so every width, skip concatenations included, must be a
multiple of 32 and at least 64).

This module is the only one that imports diffusers (``ddpm`` never does).
"""

import math
import shutil
from pathlib import Path

import torch

from ddpm.checkpoint import CheckpointError
from ddpm.errors import InputError
from ddpm.model import WEIGHTS, ModelSpec, load_model
from ddpm.unet import AttnBlock, Block, ResBlock, UNet
from pipeline.common import check_writable

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_large": "fixed_large"}
TOLERANCE = 1e-4  # max |ours - theirs| / (1 + max |ours|) accepted by the check


class ExportError(InputError):
    """The model cannot be represented in diffusers."""


def unsupported(spec: ModelSpec, net: UNet) -> list[str]:
    """What of this model diffusers cannot represent (empty when it can be exported)."""
    problems = []
    if spec.prediction not in PREDICTION_TYPES:
        problems.append(f"prediction: {spec.prediction} (diffusers' schedulers predict "
                        f"{', '.join(PREDICTION_TYPES.values())}, i.e. prediction {', '.join(PREDICTION_TYPES)})")
    if spec.variance not in VARIANCE_TYPES:
        problems.append(f"variance: {spec.variance} (DDIMScheduler has no learned variance; "
                        f"exportable: {', '.join(VARIANCE_TYPES)})")
    if spec.conditioning != "none":
        problems.append(f"conditioning: {spec.conditioning} (DDPMPipeline and DDIMPipeline sample "
                        f"unconditionally; exportable: conditioning none)")
    groups = sorted({m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)})
    if len(groups) > 1:
        problems.append(f"GroupNorm with {', '.join(map(str, groups))} groups in different layers (UNet2DModel has "
                        f"a single norm_num_groups: use model.ch a multiple of 32, at least 64)")
    return problems


def unet_config(spec: ModelSpec, groups: int) -> dict:
    """``UNet2DModel``'s config for our architecture."""
    c = spec.unet
    res = [spec.image_size // 2**i for i in range(len(c.ch_mult))]
    return dict(sample_size=spec.image_size, in_channels=spec.channels, out_channels=spec.out_channels,
                block_out_channels=tuple(c.ch * k for k in c.ch_mult), layers_per_block=c.num_res_blocks,
                down_block_types=tuple("AttnDownBlock2D" if r in c.attn_resolutions else "DownBlock2D" for r in res),
                up_block_types=tuple("AttnUpBlock2D" if r in c.attn_resolutions else "UpBlock2D"
                                     for r in reversed(res)),
                attention_head_dim=None, norm_num_groups=groups, dropout=c.dropout, flip_sin_to_cos=True,
                freq_shift=0, downsample_padding=1, act_fn="silu", norm_eps=1e-5)


def diffusers_state_dict(net: UNet) -> dict[str, torch.Tensor]:
    """Our U-Net's weights under ``UNet2DModel``'s names."""
    c, sd = net.config, {}

    def copy(dst: str, module: torch.nn.Module) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = module.weight.detach(), module.bias.detach()

    def resnet(dst: str, r: ResBlock) -> None:
        for ours, theirs in (("norm1", "norm1"), ("conv1", "conv1"), ("temb", "time_emb_proj"), ("norm2", "norm2"),
                             ("conv2", "conv2")):
            copy(f"{dst}.{theirs}", getattr(r, ours))
        if isinstance(r.skip, torch.nn.Conv2d):
            copy(f"{dst}.conv_shortcut", r.skip)

    def attention(dst: str, a: AttnBlock) -> None:
        C = a.proj.weight.shape[0]
        copy(f"{dst}.group_norm", a.norm)
        w, b = a.qkv.weight.detach().view(3 * C, C), a.qkv.bias.detach()
        for k, name in enumerate(("to_q", "to_k", "to_v")):  # AttnBlock splits its 3C outputs as (q, k, v)
            sd[f"{dst}.{name}.weight"], sd[f"{dst}.{name}.bias"] = w[k * C:(k + 1) * C], b[k * C:(k + 1) * C]
        sd[f"{dst}.to_out.0.weight"] = a.proj.weight.detach().view(C, C)
        sd[f"{dst}.to_out.0.bias"] = a.proj.bias.detach()

    def block(dst: str, i: int, b: Block) -> None:
        resnet(f"{dst}.resnets.{i}", b.res)
        if isinstance(b.attn, AttnBlock):
            attention(f"{dst}.attentions.{i}", b.attn)

    copy("time_embedding.linear_1", net.temb[0])
    copy("time_embedding.linear_2", net.temb[2])
    copy("conv_in", net.conv_in)
    levels = len(c.ch_mult)
    down = iter(net.down)
    for level in range(levels):
        for i in range(c.num_res_blocks):
            block(f"down_blocks.{level}", i, next(down))
        if level != levels - 1:
            copy(f"down_blocks.{level}.downsamplers.0.conv", next(down))
    resnet("mid_block.resnets.0", net.mid[0].res)
    attention("mid_block.attentions.0", net.mid[0].attn)
    resnet("mid_block.resnets.1", net.mid[1].res)
    up = iter(net.up)
    for j, level in enumerate(reversed(range(levels))):
        for i in range(c.num_res_blocks + 1):
            block(f"up_blocks.{j}", i, next(up))
        if level != 0:
            copy(f"up_blocks.{j}.upsamplers.0.conv", next(up)[1])
    copy("conv_norm_out", net.norm_out)
    copy("conv_out", net.conv_out)
    return {k: v.contiguous().clone() for k, v in sd.items()}


def to_diffusers(net: UNet, spec: ModelSpec):
    """(``UNet2DModel`` with our weights, the matching ``DDPMScheduler``); ExportError if unsupported."""
    problems = unsupported(spec, net)
    if problems:
        raise ExportError("diffusers cannot represent this model: " + "; ".join(problems))
    from diffusers import DDPMScheduler, UNet2DModel

    groups = {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}.pop()
    unet = UNet2DModel(**unet_config(spec, groups))
    unet.load_state_dict(diffusers_state_dict(net), strict=True)
    betas = spec.build_diffusion().betas64
    scheduler = DDPMScheduler(num_train_timesteps=spec.timesteps, trained_betas=betas.tolist(),
                              prediction_type=PREDICTION_TYPES[spec.prediction],
                              variance_type=VARIANCE_TYPES[spec.variance], clip_sample=True, clip_sample_range=1.0)
    return unet.eval(), scheduler


def max_difference(net: UNet, unet, spec: ModelSpec, seed: int = 0) -> float:
    """max |ours(x, t) - theirs(x, t)| / (1 + max |ours|) on a random batch at a few timesteps."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0, spec.timesteps // 2, spec.timesteps - 1])
    x = torch.randn(len(t), spec.channels, spec.image_size, spec.image_size, generator=g)
    with torch.no_grad():
        ours, theirs = net(x, t), unet(x, t).sample
    return ((ours - theirs).abs().max() / (1 + ours.abs().max())).item()


def main(checkpoint: Path, out: Path, weights: str = "ema") -> None:
    if weights not in WEIGHTS:
        raise InputError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    net, spec, ckpt = load_model(checkpoint, "cpu", weights=weights)
    problems = unsupported(spec, net)
    if problems:
        raise ExportError(f"{checkpoint}: diffusers cannot represent this model: " + "; ".join(problems))
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot write {out}: it is a file, expected a folder")
    check_writable(folders=[out])
    from diffusers import DDPMPipeline

    unet, scheduler = to_diffusers(net, spec)
    diff = max_difference(net, unet, spec)
    if not math.isfinite(diff) or diff > TOLERANCE:
        raise RuntimeError(f"the diffusers network differs from ours by {diff:.3g} (> {TOLERANCE}): "
                           "a bug in the export")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"export: {checkpoint} ({weights} weights, step {ckpt['step']}) → {out} "
          f"(UNet2DModel + DDPMScheduler, safetensors; max relative difference {diff:.2g}); load with "
          f"diffusers.DDPMPipeline.from_pretrained({str(out)!r}) or DDIMPipeline")
