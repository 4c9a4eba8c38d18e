"""The trained model as an MLflow model: a pyfunc that samples images with the EMA weights.

MLflow logs this file as the model's code ("models from code": when the model is loaded,
MLflow runs this file and takes the model ``set_model`` names), with the ``ddpm`` package
beside it (``code_paths``) and the EMA weights plus the model's description as the artifact
``checkpoint``. So ``mlflow.pyfunc.load_model("models:/ddpm/1")`` needs MLflow, torch and
numpy, not this repository.

Input: a table with one column ``seed`` (int64), one image per row; x_T of each image is
drawn from its own seed, so with a deterministic sampler (ddim with eta 0, the default;
euler; heun; dpm_solver++) an image depends on its seed only. Params: ``sampler`` (a kind
of ``ddpm.samplers``: ddpm, ddim, dpm_solver++, euler, heun), ``steps`` and ``eta`` (ddim).
Output: uint8 images [N, C, H, W].
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

DEFAULTS = {"sampler": "ddim", "steps": 50, "eta": 0.0}
BATCH = 256


class DiffusionSampler(PythonModel):
    def load_context(self, context):
        import torch

        from ddpm.model import load_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net, self.spec, _ = load_model(context.artifacts["checkpoint"], self.device, weights="ema")
        self.diffusion = self.spec.build_diffusion(self.device)

    def predict(self, context, model_input: pd.DataFrame, params=None):
        import numpy as np
        import torch

        from ddpm.samplers import SAMPLERS, sample
        from ddpm.pixels import to_uint8

        p = {**DEFAULTS, **(params or {})}
        if p["sampler"] not in SAMPLERS:
            raise ValueError(f"unknown sampler {p['sampler']!r}; choose one of {', '.join(SAMPLERS)}")
        steps = int(p["steps"])
        if not 1 <= steps <= self.spec.timesteps:
            raise ValueError(f"steps must be in [1, {self.spec.timesteps}], got {steps}")
        options = {"eta": float(p["eta"])} if p["sampler"] == "ddim" else {}
        seeds = [int(s) for s in model_input["seed"]]
        shape = (self.spec.channels, self.spec.image_size, self.spec.image_size)
        out = []
        for i in range(0, len(seeds), BATCH):
            chunk = seeds[i:i + BATCH]
            x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in chunk])
            g = torch.Generator(device=self.device).manual_seed(chunk[0])  # the noise of stochastic samplers
            x = sample(self.net, self.diffusion, (len(chunk), *shape), sampler=p["sampler"], steps=steps,
                       prediction=self.spec.prediction, variance=self.spec.variance, generator=g,
                       options=options, x_T=x_T)
            out.append(to_uint8(x).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, *shape), dtype=np.uint8)


mlflow.models.set_model(DiffusionSampler())
