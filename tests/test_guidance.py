"""Class conditioning and classifier-free guidance, checked without training.

For data from a class-conditional Gaussian mixture, the optimal conditional ε-predictor
E[ε | x_t, y = k] is the Gaussian one of component k and the unconditional E[ε | x_t] is the
mixture's: both closed-form. Fed to the samplers as one class-conditional "model" (the null
label selects the unconditional one), they check that w = 0 samples each class's own
distribution, that w > 0 moves the samples as the guided score predicts, and that guidance
happens once, in the shared denoiser, for every sampler and prediction. Then the training
side (the null-label drop rate) and the pipeline (the checkpoint keeps the classes; guided
cells, class accuracy, report).
"""

import json

import pytest
import torch
import yaml
from helpers import REPO, committed_params_text
from PIL import Image
from gaussian import F64, M, S, W, gaussian_eps, mixture_eps
from test_samplers_family import FAMILY, FAMILY_IDS, tolerance
from tiny import CLASSES, cli, workspace

from ddpm.checkpoint import CheckpointError, save_checkpoint
from ddpm.data import load_split
from ddpm.diffusion import (Diffusion, eps_from_x0, q_posterior_mean_variance, respace, timestep_subsequence,
                            v_from_x0_eps, x0_from_eps)
from ddpm.evaluation import denoising_mse
from ddpm.config.sampling import Guidance
from ddpm.guidance import balanced_labels, drop_labels, guided_eps, with_label
from ddpm.model import ModelSpec, load_model
from ddpm.pixels import to_model_range
from ddpm.samplers import _denoiser, sample
from ddpm.training import TrainConfig, init_state, train
from ddpm.unet import UNet, UNetConfig
from ddpm.variance import learned_log_variance
from pipeline.params.base import ParamsError
from pipeline.params.schema import parse_params

pytestmark = pytest.mark.usefixtures("one_thread")

K = 2          # the mixture's components are the classes
NULL = K       # the null label


@pytest.fixture(scope="module")
def d():
    return Diffusion.from_schedule("linear", 1000, dtype=F64)


def as_output(d, prediction, eps, x, t):
    """What a network predicting ``prediction`` outputs when its ε is ``eps`` (full, unrespaced diffusion)."""
    if prediction == "eps":
        return eps
    x0 = x0_from_eps(d, x, t, eps)
    return {"x0": x0, "v": v_from_x0_eps(d, x0, t, eps), "mean": q_posterior_mean_variance(d, x0, x, t)[0]}[prediction]


def class_model(d, prediction="eps", means=M, stds=S, uncond=mixture_eps, calls=None):
    """The optimal class-conditional predictor: class k → component k, the null label → ``uncond``."""

    def model(x, t, y):
        if calls is not None:
            calls.append(x.shape[0])
        a = d.alphas_cumprod[t][:, None]
        xd = x.double()
        k = y.clamp(max=K - 1)
        eps = torch.where((y == NULL)[:, None], uncond(a, xd), gaussian_eps(a, xd, means[k], stds[k]))
        return as_output(d, prediction, eps, xd, t).to(x.dtype)

    return model


def draw(model, d, sampler, steps, options, w=0.0, n=8000, seed=0, **kw):
    labels = balanced_labels(n, K)
    x = sample(model, d, (n, 2), sampler=sampler, steps=steps, clip="none", options=options,
               generator=torch.Generator().manual_seed(seed), labels=labels, null_label=NULL,
               guidance=Guidance(w=w, **kw))
    return x, labels


# ---------------------------------------------------------------- the guided denoiser
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "mean"])
def test_guidance_combines_eps_in_one_batched_forward(d, prediction):
    """ε̃ = (1 + w) ε_c − w ε_u whatever the network predicts; one forward of 2B per guided step, B unguided."""
    calls = []
    model = class_model(d, prediction, calls=calls)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    every_step = list(range(d.num_timesteps))
    guided = _denoiser(model, d, every_step, prediction, "none", 99.5, "fp32", labels=labels, null_label=NULL,
                       guidance=Guidance(w=2.0))
    plain = _denoiser(model, d, every_step, prediction, "none", 99.5, "fp32", labels=labels, null_label=NULL)
    for i in (3, 300, 990):
        a = d.alphas_cumprod[i]
        eps_c = gaussian_eps(a, x, M[labels], S[labels])
        eps_u = mixture_eps(torch.full((6, 1), a.item(), dtype=F64), x)
        pred = guided(x, i)
        torch.testing.assert_close(pred.eps, 3 * eps_c - 2 * eps_u, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x, a.sqrt() * pred.x0 + (1 - a).sqrt() * pred.eps)
        torch.testing.assert_close(plain(x, i).eps, eps_c, rtol=1e-6, atol=1e-6)  # w = 0: the conditional model
    assert calls == [12, 6] * 3


def test_guided_x0_is_clipped_after_guidance(d):
    x = 3 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    labels = balanced_labels(64, K)
    den = _denoiser(class_model(d), d, list(range(1000)), "eps", "static", 99.5, "fp32", labels=labels,
                    null_label=NULL, guidance=Guidance(w=5.0))
    pred = den(x, 700)
    a = d.alphas_cumprod[700]
    assert pred.x0.abs().max() <= 1 and (pred.x0.abs() == 1).any()  # clipping did something
    torch.testing.assert_close(pred.eps, eps_from_x0(d, x, torch.full((64,), 700), pred.x0))
    torch.testing.assert_close(x, a.sqrt() * pred.x0 + (1 - a).sqrt() * pred.eps)


def test_learned_variance_is_the_conditional_halfs(d):
    """With learned variance guidance moves the mean only: Σ is the conditional model's."""
    base = class_model(d)

    def model(x, t, y):  # variance channels v = 0.2 for a class, 0.9 for the null label
        v = torch.where((y == NULL)[:, None], 0.9, 0.2).expand_as(x).to(x.dtype)
        return torch.cat([base(x, t, y), v], dim=1)

    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    labels = torch.tensor([0, 1, 0, 1])
    den = _denoiser(model, d, list(range(1000)), "eps", "none", 99.5, "fp32", variance="learned", labels=labels,
                    null_label=NULL, guidance=Guidance(w=3.0))
    pred = den(x, 400)
    t = torch.full((4,), 400)
    torch.testing.assert_close(pred.log_variance, learned_log_variance(d, t, torch.full_like(x, 0.2)))
    torch.testing.assert_close(pred.eps, _denoiser(base, d, list(range(1000)), "eps", "none", 99.5, "fp32",
                                                   labels=labels, null_label=NULL, guidance=Guidance(w=3.0))(x, 400).eps)


def test_interval_guides_only_the_steps_inside_it(d):
    """Kynkäänniemi et al. 2024: guided (2B) evaluations exactly where σ_lo < σ ≤ σ_hi."""
    calls = []
    steps, interval = 20, (0.3, 5.0)
    draw(class_model(d, calls=calls), d, "ddim", steps, {}, w=2.0, n=10, interval=interval)
    r = respace(d, timestep_subsequence(1000, steps))
    sigma = ((1 - r.alphas_cumprod) / r.alphas_cumprod).sqrt()
    inside = int(((sigma > interval[0]) & (sigma <= interval[1])).sum())
    assert 0 < inside < steps
    assert sorted(calls) == [10] * (steps - inside) + [20] * inside


def test_rescale_matches_the_conditional_std():
    """Lin et al. 2024: φ = 1 gives ε̃ the per-sample std of ε_c; φ = 0 is plain guidance."""
    g = torch.Generator().manual_seed(3)
    eps_c, eps_u = torch.randn(5, 1, 4, 4, generator=g), 0.5 * torch.randn(5, 1, 4, 4, generator=g)
    plain = guided_eps(eps_c, eps_u, 3.0)
    torch.testing.assert_close(plain, 4 * eps_c - 3 * eps_u)
    full = guided_eps(eps_c, eps_u, 3.0, rescale=1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), eps_c.std(dim=(1, 2, 3)))
    torch.testing.assert_close(guided_eps(eps_c, eps_u, 3.0, rescale=0.5), 0.5 * (plain + full))


def test_guidance_needs_labels(d):
    with pytest.raises(ValueError, match="needs labels"):
        sample(lambda x, t: x, d, (2, 2), sampler="ddim", steps=2, guidance=Guidance(w=1.0))
    with pytest.raises(ValueError, match="interval"):
        Guidance(w=1.0, interval=(2.0, 1.0)).check()


# ---------------------------------------------------------------- sampled distributions
@pytest.mark.parametrize("sampler,options", FAMILY, ids=FAMILY_IDS)
def test_w0_samples_match_the_conditional_moments(d, sampler, options):
    """w = 0: the samples of class k have component k's mean and std, not the mixture's."""
    x, labels = draw(class_model(d), d, sampler, 50, options)
    for k in range(K):
        xk = x[labels == k]
        err = max(float((xk.mean(0) - M[k]).abs().max()), float((xk.std(0) - S[k]).abs().max()))
        assert err < tolerance(50), (k, err)


# equal variances: the guided score is exactly the score of N(μ_k + w (μ_k − μ_u), s²) at every t
M_EQ = torch.tensor([[-0.3, 0.2], [0.4, -0.1]], dtype=F64)
S_EQ = torch.tensor([0.2, 0.3], dtype=F64)
MU_U = torch.tensor([0.1, 0.0], dtype=F64)


@pytest.mark.parametrize("sampler,options", FAMILY, ids=FAMILY_IDS)
def test_guided_samples_move_as_the_guided_score_predicts(d, sampler, options):
    """With p(x|k) = N(μ_k, s²) and p(x) = N(μ_u, s²), (1 + w) ∇log p_t(x|k) − w ∇log p_t(x) is the score
    of N(μ_k + w (μ_k − μ_u), s²) diffused: guided samples have that mean and the same std."""
    model = class_model(d, means=M_EQ, stds=S_EQ.expand(K, 2), uncond=lambda a, x: gaussian_eps(a, x, MU_U, S_EQ))
    for w in (1.0, 3.0):
        x, labels = draw(model, d, sampler, 50, options, w=w)
        for k in range(K):
            xk = x[labels == k]
            target = M_EQ[k] + w * (M_EQ[k] - MU_U)
            err = max(float((xk.mean(0) - target).abs().max()), float((xk.std(0) - S_EQ).abs().max()))
            assert err < tolerance(50), (w, k, err)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guidance_raises_the_class_posterior_on_the_mixture(d, sampler):
    """The guidance term is w ∇log p_t(y | x_t): larger w, samples the Bayes classifier of the mixture
    assigns more surely to their class (the CAS idea on closed-form data) and farther from the other mean."""
    surety, spread = [], []
    for w in (0.0, 1.0, 3.0):
        x, labels = draw(class_model(d), d, sampler, 50, {}, w=w)
        log_joint = W.log() - 0.5 * (((x[:, None, :] - M) / S) ** 2 + 2 * S.log()).sum(-1)   # [n, K]
        posterior = torch.softmax(log_joint, 1).gather(1, labels[:, None]).squeeze(1)
        surety.append(float(posterior.mean()))
        spread.append(float((x[labels == 0].mean(0) - x[labels == 1].mean(0)).norm()))
    assert surety[0] < surety[1] < surety[2], surety
    assert spread[0] < spread[1] < spread[2], spread


# ---------------------------------------------------------------- training: the null-label drop rate
def test_drop_labels_rate():
    labels = torch.randint(0, 10, (200_000,), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    dropped = drop_labels(labels, 0.1, 10, g)
    kept = dropped != 10
    assert abs(float((~kept).double().mean()) - 0.1) < 0.004  # 6 standard errors
    assert torch.equal(dropped[kept], labels[kept])
    assert torch.equal(drop_labels(labels, 0.0, 10, g), labels)
    assert bool((drop_labels(labels, 1.0, 10, g) == 10).all())


@pytest.mark.parametrize("cond_drop", [0.0, 0.25])
def test_training_feeds_labels_dropped_at_the_cond_drop_rate(cond_drop):
    torch.manual_seed(0)
    net = UNet(UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0),
               image_size=8, in_channels=1, out_channels=1, num_classes=10)
    seen = []
    net.label_emb.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    cfg = TrainConfig(steps=12, batch_size=64, warmup_steps=1, log_every=12, checkpoint_every=0)
    state = init_state(net, cfg, seed=0, device="cpu")
    images = torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(100) % 10
    train(state, Diffusion.from_schedule("linear", 100), images, cfg, labels=labels, cond_drop=cond_drop)
    y = torch.cat(seen)
    assert y.shape == (12 * 64,) and int(y.min()) >= 0 and int(y.max()) <= 10
    null = float((y == 10).double().mean())
    assert abs(null - cond_drop) < 0.07  # 4.5 standard errors at 768 draws
    assert len(set(y[y != 10].tolist())) == 10  # every class shows up


# ---------------------------------------------------------------- the network and its checkpoint
def test_class_unet_takes_labels_and_keeps_the_base_initialisation():
    cfg = UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    torch.manual_seed(0)
    plain = UNet(cfg, image_size=8, in_channels=1, out_channels=1)
    torch.manual_seed(0)
    net = UNet(cfg, image_size=8, in_channels=1, out_channels=1, num_classes=3)
    assert net.label_emb.weight.shape == (4, 32)  # 3 classes + the null class, width 4 · ch
    shared = plain.state_dict()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in shared.items())
    with torch.no_grad():  # the zero-initialised layers would hide the embedding
        for w in net.parameters():
            w.add_(0.1 * torch.randn_like(w))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
    with torch.no_grad():
        a, b = net(x, t, torch.tensor([0, 2])), net(x, t, torch.tensor([0, 3]))
    assert torch.equal(a[0], b[0]) and (a[1] - b[1]).norm() > 1e-3 * a[1].norm()  # the label changes the output
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, torch.tensor([0, 1]))
    torch.testing.assert_close(with_label(net, 3)(x, t), net(x, t, torch.tensor([3, 3])))


def test_model_spec_round_trip_keeps_the_classes(tmp_path):
    spec = ModelSpec(unet=UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()), image_size=8,
                     conditioning="class", num_classes=3, classes=["cat", "dog", "eel"])
    net = spec.build_unet()
    save_checkpoint(tmp_path / "m.pt", step=1, config={"model": spec.to_dict()}, model=net.state_dict(),
                    ema={f"module.{k}": v for k, v in net.state_dict().items()})
    loaded, back, _ = load_model(tmp_path / "m.pt")
    assert back == spec and back.classes == ["cat", "dog", "eel"] and loaded.num_classes == 3
    old = spec.to_dict()
    for key in ("conditioning", "num_classes", "classes"):  # a checkpoint from before conditioning existed
        old.pop(key)
    assert ModelSpec.from_dict(old).conditioning == "none" and ModelSpec.from_dict(old).num_classes == 0
    bad = {**spec.to_dict(), "num_classes": 4}
    save_checkpoint(tmp_path / "bad.pt", step=1, config={"model": bad}, model=net.state_dict(), ema={})
    with pytest.raises(CheckpointError, match="num_classes"):
        load_model(tmp_path / "bad.pt")


def test_dvc_sweep_plot_template_draws_one_line_per_cell_through_its_w():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    plot = next(p["plots/guidance_sweep.csv"] for p in stages["report"]["plots"] if "plots/guidance_sweep.csv" in p)
    assert (plot["template"], plot["x"], plot["y"]) == ("guidance_sweep", "recall", "precision")
    template = json.loads((REPO / ".dvc" / "plots" / "guidance_sweep.json").read_text())
    assert template["encoding"]["color"]["field"] == "cell"
    assert template["layer"][0]["encoding"]["order"]["field"] == "w"
    # each point labelled with its setting (the plain cell "w=0"), only where a revision has guidance
    assert template["layer"][1]["encoding"]["text"]["field"] == "label"
    assert {"calculate": "datum.guidance == 'none' ? 'w=0' : datum.guidance", "as": "label"} in template["layer"][1][
        "transform"]
    # the guided cells are the plain matrix plus the guidance axis, named <sampler>-<steps>-<guidance>
    assert stages["sample_guided"]["matrix"]["guidance"] == "${sample.guidance}"
    cell = "samples/${item.sampler}-${item.steps}-${item.guidance}"
    assert f"{cell}/samples.pt" in stages["sample_guided"]["outs"] and f"{cell}/grid.png" in stages["sample_guided"]["plots"]


def test_params_guidance_needs_a_class_model():
    raw = yaml.safe_load(committed_params_text())
    raw["sample"]["guidance"] = ["w3"]
    with pytest.raises(ParamsError, match="needs conditioning: class"):
        parse_params(raw)
    raw["conditioning"] = "class"
    assert parse_params(raw).guidance["w3"].w == 3.0
    raw["sample"]["guidance"] = ["w7"]
    with pytest.raises(ParamsError, match=r"\['w7'\], not defined under 'guidance'"):
        parse_params(raw)
    raw["sample"]["guidance"], raw["cond_drop"] = ["w3"], 0.0
    with pytest.raises(ParamsError, match="cond_drop > 0"):
        parse_params(raw)
    raw["cond_drop"], raw["guidance"]["w-3"] = 0.1, {"w": 3.0}
    with pytest.raises(ParamsError, match="'w-3' must be letters"):
        parse_params(raw)
    del raw["guidance"]["w-3"]
    raw["guidance"]["w3"]["rescale"] = 1.5
    with pytest.raises(ParamsError, match=r"guidance\.w3\.rescale"):
        parse_params(raw)


# ---------------------------------------------------------------- the pipeline, end to end on tiny data
@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """prepare's outputs → classifier → train (conditioning: class) → sample (w = 0 and w3) → fid → report."""
    root = workspace(tmp_path_factory.mktemp("cfg"), sample_every=1000)  # with train's preview grids
    p = yaml.safe_load((root / "params.yaml").read_text())
    p.update(conditioning="class")
    p["sample"].update(samplers=["ddim"], steps=[3], guidance=["w3"])
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    for args in (["classifier", "--device", "cpu"], ["train", "--device", "cpu"], ["ema"],
                 ["sample", "--sampler", "ddim", "--steps", "3", "--out", "samples/ddim-3"],
                 ["sample", "--sampler", "ddim", "--steps", "3", "--guidance", "w3", "--out", "samples/ddim-3-w3"],
                 ["fid-ref"], ["fid", "--samples", "samples/ddim-3/samples.pt", "--out", "metrics/cells/ddim-3.json"],
                 ["fid", "--samples", "samples/ddim-3-w3/samples.pt", "--out", "metrics/cells/ddim-3-w3.json"],
                 ["report"]):
        r = cli(root, *args)
        assert r.exit_code == 0, (args, r.output)
    return root


def test_checkpoint_records_the_classes(conditional):
    net, spec, ckpt = load_model(conditional / "models/model.pt")
    assert spec.conditioning == "class" and spec.classes == CLASSES and spec.num_classes == 10
    assert net.label_emb.num_embeddings == 11 and ckpt["config"]["objective"]["cond_drop"] == 0.1
    # train's preview grids of the conditional model (image i of class i mod 10): the first and the last step's
    assert sorted(f.name for f in (conditional / "plots/train_samples").iterdir()) == ["step_0000000.png",
                                                                                    "step_0000006.png"]


def test_samples_are_class_balanced_with_their_labels(conditional):
    for cell in ("ddim-3", "ddim-3-w3"):
        s = torch.load(conditional / f"samples/{cell}/samples.pt", weights_only=True)
        assert torch.equal(s["labels"], torch.arange(24) % 10) and s["classes"] == CLASSES
        # the grid: one row per class, 24 // 10 = 2 samples each, 8 px images with 2 px padding
        assert Image.open(conditional / f"samples/{cell}/grid.png").size == (2 * 10 + 2, 10 * 10 + 2)
    guided = torch.load(conditional / "samples/ddim-3-w3/samples.pt", weights_only=True)
    plain = torch.load(conditional / "samples/ddim-3/samples.pt", weights_only=True)
    assert guided["guidance"] == "w3" and guided["w"] == 3.0 and plain["w"] == 0.0
    info = json.loads((conditional / "samples/ddim-3-w3/info.json").read_text())
    assert (info["guidance"], info["w"], info["rescale"], info["interval"]) == ("w3", 3.0, 0.0, None)


def test_cells_report_class_accuracy_and_the_sweep(conditional):
    plain, guided = (json.loads((conditional / f"metrics/cells/{c}.json").read_text()) for c in ("ddim-3", "ddim-3-w3"))
    assert 0 <= plain["class_accuracy"] <= 1 and (plain["w"], guided["w"], guided["guidance"]) == (0.0, 3.0, "w3")
    fid = json.loads((conditional / "metrics/fid.json").read_text())  # the FID of each cell: fid.<sampler>.<cell>
    assert fid["fid"]["ddim"] == {"3": plain["fid"], "3-w3": guided["fid"]}
    rows = (conditional / "plots/fid_vs_steps.csv").read_text().splitlines()  # the rest: the plots
    assert rows[0].split(",")[-2:] == ["class_accuracy", "line"]
    assert float(rows[1].split(",")[-2]) == plain["class_accuracy"]
    sweep = (conditional / "plots/guidance_sweep.csv").read_text().splitlines()
    assert sweep[0] == "cell,sampler,steps,guidance,w,fid,class_accuracy,precision,recall"
    assert [row.split(",")[3:5] for row in sweep[1:]] == [["none", "0.0"], ["w3", "3.0"]]
    md = (conditional / "reports/report.md").read_text()
    assert "## Guidance sweep" in md and "| ddim-3 | w3 | 3 |" in md and "One row per class: 0, 1," in md
    assert "](../samples/ddim-3-w3/grid.png)" in md and "## Class accuracy by sampler and steps" in md


def test_nll_of_a_class_model_is_the_unconditional_bound(conditional):
    r = cli(conditional, "nll", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads((conditional / "metrics/nll.json").read_text())["nll"]["bits_per_dim"] > 0


def test_denoise_of_a_class_model_scores_the_unconditional_model(conditional):
    r = cli(conditional, "denoise", "--device", "cpu")
    assert r.exit_code == 0, r.output
    scores = json.loads((conditional / "metrics/denoise.json").read_text())["denoise"]
    net, spec, _ = load_model(conditional / "models/model_ema.pt", weights="ema")
    d = yaml.safe_load((conditional / "params.yaml").read_text())["denoise"]
    x0 = to_model_range(load_split(conditional / "data/prepared/test.pt").images[:d["num_images"]])
    null = denoising_mse(net, spec.build_diffusion("cpu"), x0, prediction=spec.prediction, variance=spec.variance,
                         num_timesteps=d["timesteps"], seed=d["seed"], batch_size=d["batch_size"], label=10)
    assert scores["ema_mse"] == round(null["mse"], 6) and 0 < scores["ema_mse"] < scores["untrained_mse"]


def test_guidance_of_an_unconditional_model_is_one_clear_line(conditional, tmp_path):
    p = yaml.safe_load((conditional / "params.yaml").read_text())
    p.update(conditioning="none")
    p["sample"]["guidance"] = []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    params = str(tmp_path / "params.yaml")
    r = cli(conditional, "train", "--params", params, "--device", "cpu", "--out", str(tmp_path / "m.pt"),
            "--metrics", str(tmp_path / "t.json"), "--plot", str(tmp_path / "l.csv"),
            "--timing", str(tmp_path / "t2.json"), "--state", str(tmp_path / "s.pt"),
            "--system-metrics", str(tmp_path / "sys.json"))
    assert r.exit_code == 0, r.output
    r = cli(conditional, "sample", "--params", params, "--checkpoint", str(tmp_path / "m.pt"), "--sampler", "ddim",
            "--steps", "2", "--guidance", "w3", "--out", str(tmp_path / "s"))
    assert r.exit_code == 1 and "is unconditional" in r.output and not (tmp_path / "s").exists()
    r = cli(conditional, "sample", "--sampler", "ddim", "--steps", "2", "--guidance", "w9", "--out", str(tmp_path / "s"))
    assert r.exit_code == 1 and "'w9' is not defined under 'guidance'" in r.output
