"""ddpm: a small library for denoising diffusion models (tensors in, tensors out).

Modules, one job each:
  schedules    β schedules in float64
  diffusion    tables, forward process q_sample, posterior, x0/ε/v conversions, respacing
  predictions  model output → (x̂_0, ε̂) for prediction = eps | x0 | v | mean
  variance     σ_t² of p_θ(x_{t-1} | x_t): fixed_small | fixed_large | learned
  likelihood   Gaussian KL, discretised decoder, the variational bound in bits/dim
  objectives   training losses: simple | vlb | hybrid
  timestep_sampling  t ~ uniform | importance (loss-aware)
  unet         the DDPM U-Net
  samplers     the sampling loop and one step function per sampler
  preview      cheap ancestral sample grids to watch training (independent of samplers)
  training     the training loop (AdamW, warm-up, clipping, EMA), resumable state
  ema          averages of the weights: power (EDM2) | warmup (diffusers) | fixed (Ho et al.)
  posthoc_ema  EDM2's post-hoc EMA: snapshots' profiles, least squares, reconstruction
  evaluation   held-out denoising error (ε-MSE at fixed timesteps and noise)
  distributed  data-parallel helpers over torch.distributed (torchrun, DDP)
  checkpoint   self-describing, atomically written checkpoints
  files        atomic writes of a file or a folder, a full disk as one error; loading a torch file
  pixels       uint8 images ↔ the model's range [-1, 1]
  data         data sets as uint8 tensors (their files checked; CIFAR pickles run no code)
  classifier   the feature-extractor classifier for offline FID
  metrics      FID / KID / IS through torch-fidelity
  acceleration the fast path: precision (bf16 autocast), memory format, torch.compile, fused AdamW

It never imports YAML, Typer, DVC, MLflow or the benchmarks (``benchmarks/``).
"""
