"""A small CNN classifier trained on the data set, used as the offline feature
extractor for FID/KID (Inception weights need the internet; this does not).

Six 3×3 conv blocks (BatchNorm, ReLU) of widths w, 2w, 2w, 4w, 4w, 8w, with stride 2 on
blocks 2, 4 and 6 (28 → 14 → 7 → 4), global average pooling, a ``feature_dim`` embedding
(the FID features) and a linear classifier head (the logits, used for the Inception
Score): globally pooled deep features, as Inception-v3's pool3 features are for the
standard FID. Its test accuracy is reported with it: an extractor that cannot classify
gives a meaningless FID.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm.config.evaluation import ClassifierConfig
from ddpm.pixels import to_model_range


def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Classifier(nn.Module):
    def __init__(self, config: ClassifierConfig, *, in_channels: int, num_classes: int):
        super().__init__()
        self.config, self.in_channels, self.num_classes = config, in_channels, num_classes
        c, w = config, config.width
        self.body = nn.Sequential(_block(in_channels, w, 1), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
                                  _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1), _block(4 * w, 8 * w, 2))
        self.embed = nn.Linear(8 * w, c.feature_dim)
        self.head = nn.Linear(c.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1], [B, C, H, W] → (features [B, feature_dim], logits [B, num_classes])."""
        h = self.body(x).mean(dim=(2, 3))
        features = F.relu(self.embed(h))
        return features, self.head(features)


def train_classifier(model: Classifier, images: torch.Tensor, labels: torch.Tensor, *, steps: int, batch_size: int,
                     lr: float, seed: int, device, progress=None) -> list[tuple[int, float]]:
    """Train with AdamW + cosine decay on random batches; returns (step, loss) every 50 steps."""
    model.to(device).train()
    g = torch.Generator(device=device).manual_seed(seed)
    images, labels = images.to(device), labels.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    losses, running = [], torch.zeros((), device=device)
    for step in range(1, steps + 1):
        idx = torch.randint(images.shape[0], (batch_size,), generator=g, device=device)
        x = to_model_range(images[idx])
        loss = F.cross_entropy(model(x)[1], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.detach()
        if step % 50 == 0 or step == steps:
            losses.append((step, (running / (50 if step % 50 == 0 else step % 50)).item()))
            running.zero_()
        if progress is not None:
            progress(1)
    return losses


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int = 1000) -> float:
    model.to(device).eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = model(to_model_range(images[i:i + batch_size].to(device)))[1]
        correct += (logits.argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
    return correct / images.shape[0]
