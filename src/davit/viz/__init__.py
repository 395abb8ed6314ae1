"""Seeing inside DaViT: window and channel attention maps, Grad-CAM, and summary sheets as PNG files.

    from davit.viz import capture_attention, grad_cam, visualize
    maps = capture_attention(model.eval(), x)  # {"stages.0.blocks.0.0": AttentionMap(kind="spatial"), ...}
    cam = grad_cam(model, x)  # (B, H, W) in [0, 1], for the top prediction
    visualize(model, x[0], "viz/", class_names=names)  # spatial_stage*, channel_stage*, gradcam, sheet .png

Nothing is attached to the model outside these calls: its forward and speed are untouched.
"""

from .capture import AttentionMap, attention_hooks, capture_attention, grad_cam, gradcam_and_logits
from .run import (
    Analysis,
    analyse,
    load_image,
    load_model,
    make_sheet,
    resolve_data_config,
    visualize,
    write_demo_sheets,
)

__all__ = [
    "AttentionMap",
    "Analysis",
    "analyse",
    "attention_hooks",
    "capture_attention",
    "grad_cam",
    "gradcam_and_logits",
    "load_image",
    "load_model",
    "make_sheet",
    "resolve_data_config",
    "visualize",
    "write_demo_sheets",
]
