"""Our U-Net and schedule in diffusers' terms: the config of a ``UNet2DModel`` with our
architecture, our weights under its parameter names, and the config of a ``DDPMScheduler``
with exactly our β. Plain dicts and tensors: this module never imports diffusers (the
``export`` command builds the diffusers objects from them).

``UNet2DModel`` matches ``ddpm.unet.UNet`` (as the benchmark peer does): the widths
``ch · ch_mult``, ``num_res_blocks`` residual blocks per level (+1 in the decoder), single-head
attention at the same resolutions and in the middle, GroupNorm, dropout, the sinusoidal
timestep embedding (cos first, no frequency shift) and its 4·ch MLP. The weights are mapped
tensor by tensor (q, k and v come from rows of the one 1×1 ``qkv`` convolution).

What diffusers cannot represent (``unsupported``): ``prediction: mean`` (its schedulers predict
epsilon, sample or v_prediction), ``variance: learned`` (DDIMScheduler has no learned variance:
the extra output channels would be read as the prediction), ``conditioning: class``
(``DDPMPipeline`` and ``DDIMPipeline`` sample unconditionally), and GroupNorm group counts that
differ within the network (``UNet2DModel`` has one ``norm_num_groups``; ours takes up to 32
groups of at least 2 channels, so every width, skip concatenations included, must be a multiple
of 32 and at least 64).
"""

import torch

from ddpm.model import ModelSpec
from ddpm.unet import AttnBlock, Block, ResBlock, UNet

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_large": "fixed_large"}


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
    groups = group_counts(net)
    if len(groups) > 1:
        problems.append(f"GroupNorm with {', '.join(map(str, groups))} groups in different layers (UNet2DModel has "
                        f"a single norm_num_groups: use model.ch a multiple of 32, at least 64)")
    return problems


def group_counts(net: UNet) -> list[int]:
    return sorted({m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)})


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


def scheduler_config(spec: ModelSpec) -> dict:
    """``DDPMScheduler``'s config: our β as ``trained_betas``, our prediction and variance, x̂_0 clipped to [-1, 1]."""
    return dict(num_train_timesteps=spec.timesteps, trained_betas=spec.build_diffusion().betas64.tolist(),
                prediction_type=PREDICTION_TYPES[spec.prediction], variance_type=VARIANCE_TYPES[spec.variance],
                clip_sample=True, clip_sample_range=1.0)


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
