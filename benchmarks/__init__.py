"""Benchmarks of the DDPM pipeline, outside the library: ``ddpm/`` and the DVC stages
never import this package.

  bench       throughput and MFU of our U-Net against diffusers' UNet2DModel
  gpu_check   ``make gpu-check``: every GPU figure of the project in one run
  cli         ``python -m benchmarks bench | gpu-check``
"""
