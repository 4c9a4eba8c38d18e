"""ddpm: a small library for denoising diffusion models (tensors in, tensors out)."""
