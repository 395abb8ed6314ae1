"""Training, evaluation and prediction: config/presets, optimiser + schedule, crash-safe checkpoints,
torchrun DDP/FSDP, logging and reports. Generic pieces (``checkpoint``, ``config``, ``distributed``,
``logging``) are meant for reuse by the dense-prediction tasks."""

from .config import PRESETS, TrainConfig, resolve_config

__all__ = ["PRESETS", "TrainConfig", "resolve_config", "train"]


def train(cfg: TrainConfig):
    """Run a training (see :mod:`davit.train.trainer`)."""
    from .trainer import train as _train

    return _train(cfg)
