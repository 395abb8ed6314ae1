"""davit-pytorch: DaViT (Dual Attention Vision Transformers, Ding et al., ECCV 2022)."""

from .models import DaViT, DaViTFeatures, create_model, list_models, model_info

__version__ = "0.1.0"
__all__ = ["DaViT", "DaViTFeatures", "create_model", "list_models", "model_info", "__version__"]
