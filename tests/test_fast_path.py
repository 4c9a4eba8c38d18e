"""The GPU fast path, tested where CI runs (the CPU): every average of the weights in one
multi-tensor update with no host sync, bit for bit AveragedModel's; inference on weights cast once;
graph modes without CUDA named as such; a failing fast path that falls back instead of stopping
the run, while a real error still raises; torch.compile on the CPU; the dispatch-count proxies."""

import warnings
from dataclasses import replace

import pytest
import torch

import ddpm.acceleration as acceleration
import ddpm.training
from benchmarks.bench import MODEL_CONFIGS
from benchmarks.proxies import count_sample, count_train
from ddpm.acceleration import FastPath, FastPathWarning, compile_pays, make_denoiser, resolve
from ddpm.diffusion import Diffusion
from ddpm.ema import Averages, FixedEMA, PowerEMA, WarmupEMA, averaged_model
from ddpm.samplers import sample
from ddpm.training import TrainConfig, init_state, train
from ddpm.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = [PowerEMA(sigma_rel=0.1), PowerEMA(sigma_rel=0.05), WarmupEMA(decay=0.9, inv_gamma=2.0), FixedEMA(decay=0.8)]


def micro_unet(ch=4, size=4) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(ch=ch, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0), image_size=size,
                in_channels=1, out_channels=1)


def randomized(net: UNet) -> UNet:
    """``net`` with every weight drawn at random (the zero-initialised output layers would make its
    output 0 whatever the path)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


# ---------------------------------------------------------------- Averages
def test_averages_are_averaged_model_bit_for_bit():
    """One multi-tensor update of four averages (power, warm-up, fixed) equals each
    AveragedModel.update_parameters, weights and update counts, over steps that change the weights."""
    net = micro_unet()
    old = [averaged_model(net, c) for c in CONFIGS]
    new = [averaged_model(net, c) for c in CONFIGS]
    averages = Averages(net, list(zip(new, CONFIGS)))
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        for a in old:
            a.update_parameters(net)
        averages.update()
    for a, b in zip(old, new):
        assert int(a.n_averaged) == int(b.n_averaged) == 6
        for x, y in zip(a.module.parameters(), b.module.parameters()):
            assert torch.equal(x, y)
    assert not torch.equal(next(new[0].module.parameters()), next(new[3].module.parameters()))


def test_averages_never_read_a_device_tensor():
    """Given the counts, an update reads nothing back from the device: on the meta device, where any
    read (.item(), a bool of a comparison) raises, it runs."""
    net = micro_unet().to("meta")
    pairs = [(averaged_model(net, c), c) for c in CONFIGS]
    averages = Averages(net, pairs, counts=[0] * len(pairs))
    for _ in range(3):
        averages.update()
    assert averages.counts == [3] * len(pairs)


def test_training_updates_the_averages_as_before():
    """train()'s EMA and post-hoc profiles are what AveragedModel.update_parameters makes of the
    same raw weights after every step."""
    images = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    d = Diffusion.from_schedule("linear", 20)
    cfg = TrainConfig(steps=1, batch_size=4, warmup_steps=1, log_every=1, ema_snapshot_every=1)
    state = init_state(micro_unet(), cfg, 0, "cpu")
    shadow = [averaged_model(state.model, cfg.ema)] + [averaged_model(state.model, PowerEMA(sigma_rel=s))
                                                       for s in cfg.ema_profiles]
    for k in range(1, 4):
        train(state, d, images, TrainConfig(steps=k, batch_size=4, warmup_steps=1, log_every=1, ema_snapshot_every=1))
        for a in shadow:
            a.update_parameters(state.model)
    for a, b in zip(shadow, [state.ema, *state.profiles]):
        assert all(torch.equal(x, y) for x, y in zip(a.module.parameters(), b.module.parameters()))


# ---------------------------------------------------------------- choices
def test_graph_modes_without_cuda_or_under_ddp_say_what_runs():
    for mode, instead in (("reduce-overhead", "default"), ("max-autotune", "default"), ("cudagraphs", "none")):
        path = resolve("cpu", compile=mode)
        assert path.compile == instead and "CUDA graphs need a CUDA device" in path.note, path
        assert f"compile {instead} (" in path.describe()
    assert resolve("cuda", compile="cudagraphs", distributed=True).compile == "default"
    assert "DDP" in resolve("cuda", compile="reduce-overhead", distributed=True).note
    assert resolve("cuda", compile="cudagraphs", distributed=True, role="inference").compile == "cudagraphs"
    assert resolve("cpu", role="inference") == FastPath("fp32", "contiguous", "none")
    assert "uncaptured and eager" in resolve("cpu", compile="step-graph").note
    assert resolve("cuda", compile="step-graph", role="inference").compile == "reduce-overhead"
    assert resolve("cuda", compile="step-graph", distributed=True).compile == "default"
    assert resolve("cuda", compile="step-graph") == FastPath("bf16", "channels_last", "step-graph")
    # the bound keeps float32 under auto, with CUDA graphs; never compiled by auto (no measured rates)
    assert resolve("cuda", role="likelihood", work=10**9) == FastPath("fp32", "channels_last", "cudagraphs")


def test_auto_compiles_only_where_it_pays():
    """auto replays CUDA graphs, and compiles too where the measured speed-up repays the measured compile
    time: a 5,000-sample 10-step cell does not compile, a 1,000-step one does; 20,000 training steps of
    batch 128 do, 1,000 do not."""
    assert not compile_pays(5000 * 10, "cuda") and compile_pays(5000 * 1000, "cuda")
    assert not compile_pays(10**9, "cpu") and not compile_pays(None, "cuda")
    assert resolve("cuda", role="inference", work=5000 * 1000).compile == "reduce-overhead"
    assert resolve("cuda", role="inference", work=5000 * 10).compile == "cudagraphs"
    assert resolve("cuda", role="inference", compile="none", work=10**9).compile == "none"
    assert resolve("cuda", work=20000 * 128).compile == "reduce-overhead"
    assert resolve("cuda", work=1000 * 128).compile == "cudagraphs"
    assert resolve("cuda", work=20000 * 128, distributed=True).compile == "default"  # no graphs under DDP


# ---------------------------------------------------------------- inference weights
def test_bf16_inference_casts_the_weights_once():
    """bf16 inference runs a bf16 copy of the weights (the model itself keeps float32), with a few casts
    per sampling step at the network's boundary, and agrees with float32 to bf16 accuracy."""
    m = MODEL_CONFIGS["tiny"]
    counts = count_sample(m.unet, m.image_size, m.channels, precision="bf16")
    assert counts["casts_per_step"] <= 20, counts
    net = randomized(UNet(UNetConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)), image_size=8,
                          in_channels=1, out_channels=1))
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 10, 500, 999])
    denoiser = make_denoiser(net, "cpu", precision="bf16")
    assert all(p.dtype == torch.float32 for p in net.parameters())
    out, ref = denoiser(x, t), net.eval()(x, t)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    assert ((out - ref).norm() / ref.norm()).item() < 3e-2


# ---------------------------------------------------------------- never stopped by a fast path
def failing_compile(*args, **kwargs):
    def fail(*a, **k):
        raise RuntimeError("CUDA graph capture failed: operation not permitted when stream is capturing")

    return fail


def test_a_failing_fast_path_falls_back_and_says_so(monkeypatch):
    """A compile/capture failure continues the run on the eager path after one warning, with the same
    result as an eager run; the path that ran is recorded."""
    images = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    d = Diffusion.from_schedule("linear", 20)
    cfg = TrainConfig(steps=3, batch_size=4, warmup_steps=1, log_every=1, ema_snapshot_every=0)
    plain = train(init_state(micro_unet(), cfg, 0, "cpu"), d, images, cfg)
    monkeypatch.setattr(ddpm.training, "compile_model", failing_compile)
    with pytest.warns(FastPathWarning, match="fell back from fp32, contiguous, compile default") as caught:
        state = train(init_state(micro_unet(), TrainConfig(**{**vars(cfg), "compile": "default"}), 0, "cpu"), d,
                      images, TrainConfig(**{**vars(cfg), "compile": "default"}))
    assert len(caught) == 1
    assert state.path.startswith("fp32, contiguous, compile none (fell back from") and "capture failed" in state.path
    assert state.losses == plain.losses
    assert plain.path == "fp32, contiguous, compile none"

    monkeypatch.setattr(acceleration, "compile_model", failing_compile)
    net = randomized(micro_unet())
    denoiser = make_denoiser(net, "cpu", compile="default")
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 7])
    with pytest.warns(FastPathWarning):
        out = denoiser(x, t)
    assert torch.equal(out, net(x, t)) and out.abs().sum() > 0 and "fell back" in denoiser.path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        denoiser(x, t)  # one warning per run, not per call


def test_a_real_error_is_not_hidden_by_the_fall_back(monkeypatch):
    """When the plain path fails too (here: images with 3 channels for a 1-channel U-Net), that error
    is raised, not swallowed."""
    monkeypatch.setattr(ddpm.training, "compile_model", failing_compile)
    images = torch.randint(0, 256, (16, 3, 4, 4), dtype=torch.uint8)
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, compile="default", ema_snapshot_every=0)
    with pytest.raises(RuntimeError, match="channels"):
        train(init_state(micro_unet(), cfg, 0, "cpu"), Diffusion.from_schedule("linear", 20), images, cfg)


# ---------------------------------------------------------------- torch.compile on the CPU
@pytest.mark.slow
def test_compiled_training_and_sampling_on_cpu_match_eager():
    """reduce-overhead on the CPU compiles without graphs (and says so); its losses and samples agree
    with the eager path's to float32 rounding of a differently fused computation."""
    images = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    d = Diffusion.from_schedule("linear", 20)
    runs = {}
    for mode in ("none", "reduce-overhead"):
        cfg = TrainConfig(steps=3, batch_size=4, warmup_steps=1, log_every=1, compile=mode, ema_snapshot_every=0)
        runs[mode] = train(init_state(micro_unet(), cfg, 0, "cpu"), d, images, cfg)
    fast = runs["reduce-overhead"]
    assert fast.path == "fp32, contiguous, compile default (CUDA graphs need a CUDA device, so reduce-overhead runs as default on cpu)"
    for (_, a), (_, b) in zip(runs["none"].losses, fast.losses):
        assert a == pytest.approx(b, rel=1e-4)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    out = {}
    for mode in ("none", "default"):
        denoiser = make_denoiser(runs["none"].ema.module, "cpu", compile=mode)
        out[mode] = sample(denoiser, d, x_T.shape, sampler="ddim", steps=3, x_T=x_T)
        assert denoiser.path == f"fp32, contiguous, compile {mode}"
    assert torch.allclose(out["none"], out["default"], atol=1e-4)


# ---------------------------------------------------------------- proxies
@pytest.mark.slow
def test_dispatch_counts_stay_bounded():
    """Generous bounds on the CPU proxies of the GPU's launch overhead (measured on the default config:
    1,598 ops per fp32 training step, 1,926 at bf16 (3,079 / 3,407 before the multi-tensor EMA);
    416 per sampling step; 6 casts per bf16 sampling step, 168 under autocast before): a regression
    of several times fails. The default U-Net's layers at a quarter of its width: the same operations
    (the counts above are equal at ch 16 and 64), and bf16 on small tensors (a CPU without native bf16
    runs bf16 matmuls at about 1 GFLOP/s)."""
    m = MODEL_CONFIGS["fashion-mnist"]
    unet = replace(m.unet, ch=16)
    for precision, train_bound in (("fp32", 2500), ("bf16", 3000)):
        assert count_train(unet, m.image_size, m.channels, precision=precision)["ops_per_step"] < train_bound
    s = count_sample(unet, m.image_size, m.channels, precision="bf16")
    assert s["ops_per_step"] < 800 and s["casts_per_step"] <= 20, s


def test_step_graph_runs_the_same_training_uncaptured_on_cpu():
    """compile: step-graph's loop (tensor learning rate filled by the scheduler, the averages updated
    from their counts on the device, the graph's outputs copied) run uncaptured on the CPU: the same
    losses as the plain loop, the raw weights and the averages equal to float rounding (a float32 tensor
    learning rate, a product and a sum for the averages' lerp), the counts kept."""
    images = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    d = Diffusion.from_schedule("linear", 20)
    runs = {}
    for mode in ("none", "step-graph"):
        cfg = TrainConfig(steps=5, batch_size=4, warmup_steps=3, log_every=2, compile=mode, ema_snapshot_every=2,
                          grad_clip=0.5)
        runs[mode] = train(init_state(micro_unet(), cfg, 0, "cpu"), d, images, cfg)
    plain, graph = runs["none"], runs["step-graph"]
    assert graph.path == ("fp32, contiguous, compile step-graph (CUDA graphs need a CUDA device, so on cpu the step "
                          "runs uncaptured and eager)")
    assert graph.losses == plain.losses
    assert isinstance(graph.optimizer.param_groups[0]["lr"], torch.Tensor)
    assert graph.optimizer.param_groups[0]["lr"].item() == pytest.approx(plain.optimizer.param_groups[0]["lr"])
    for a, b in zip(plain.model.parameters(), graph.model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not all(torch.equal(a, b) for a, b in zip(micro_unet().parameters(), graph.model.parameters()))
    for pa, pb in zip([plain.ema, *plain.profiles], [graph.ema, *graph.profiles]):
        assert int(pa.n_averaged) == int(pb.n_averaged) == 5
        for a, b in zip(pa.module.parameters(), pb.module.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(graph.grad_norm) == pytest.approx(float(plain.grad_norm), rel=1e-6)
