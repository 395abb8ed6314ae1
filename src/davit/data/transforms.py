"""Train and eval transforms: timm's ImageNet recipe (RandomResizedCrop, flip, RandAugment, random erasing;
eval = resize then center crop at crop_pct) and a light recipe for small images (``simple=True``).

Works for 1-channel images too: timm's RandAugment ops are PIL operations that accept "L" images, and the fill
colour for rotate/shear/translate is the 1-element mean. One fix applied on top of timm 1.0.31: with
``mstd > 0`` the magnitude can reach 10, where timm's PosterizeIncreasing asks for 0 bits, which Pillow >= 11
rejects ("bits must be between or equal to 1 and 8"), crashing ~1 in 1500 images; :func:`_patch_posterize`
restores the old meaning of 0 bits (an all-black image).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from torchvision import transforms as T

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _safe_posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    if bits_to_keep < 1:  # keep no bit at all: what Pillow < 11 returned for bits=0
        return img.point(lambda _: 0)
    return timm_aa.posterize(img, bits_to_keep, **kwargs)


def _patch_posterize(transform):
    """Swap timm's posterize in every RandAugment/AutoAugment op found in ``transform`` (in place)."""
    stack = [transform]
    while stack:
        t = stack.pop()
        for op in getattr(t, "ops", []) or []:
            if getattr(op, "aug_fn", None) is timm_aa.posterize:
                op.aug_fn = _safe_posterize
            stack.append(op)
        stack += list(getattr(t, "transforms", []) or [])
    return transform


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(size)
    return (size[-2], size[-1]) if len(size) >= 2 else (size[0], size[0])  # (C, H, W) like timm's input_size


def build_transform(
    is_training: bool,
    input_size: int | Sequence[int],
    in_chans: int = 3,
    aa: str | None = None,
    reprob: float = 0.0,
    remode: str = "pixel",
    interpolation: str = "bicubic",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float = 0.875,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    color_jitter: float | Sequence[float] | None = None,
    simple: bool = False,
    padding: int | None = None,
):
    """PIL image ("RGB" for in_chans 3, "L" for 1) -> normalised float tensor (in_chans, H, W).

    ``mean``/``std`` default to ImageNet's (their average for 1 channel). ``aa`` is a timm auto-augment string
    such as "rand-m9-mstd0.5-inc1". ``simple=True``: for small images (e.g. 28-32 px) — train = resize the
    short side, random crop with ``padding`` (default size/8) and flip (+ ``aa``, random erasing if given);
    eval = resize the short side and center crop, no crop_pct margin.
    """
    h, w = _pair(input_size)
    if mean is None:
        mean = IMAGENET_MEAN if in_chans == 3 else (sum(IMAGENET_MEAN) / 3,) * in_chans
    if std is None:
        std = IMAGENET_STD if in_chans == 3 else (sum(IMAGENET_STD) / 3,) * in_chans
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean {mean} and std {std} must have in_chans={in_chans} values each")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if not simple:
        t = create_transform(
            (in_chans, h, w),
            is_training=is_training,
            scale=scale,
            hflip=hflip,
            color_jitter=color_jitter,
            auto_augment=aa,
            interpolation=interpolation,
            mean=mean,
            std=std,
            re_prob=reprob,
            re_mode=remode,
            crop_pct=crop_pct,
        )
        return _patch_posterize(t)

    interp = str_to_pil_interp(interpolation)
    tfl = [T.Resize(min(h, w), interpolation=interp)]
    if not is_training:
        tfl += [T.CenterCrop((h, w))]
    else:
        pad = round(min(h, w) / 8) if padding is None else padding
        tfl += [T.RandomCrop((h, w), padding=pad)]
        if hflip > 0:
            tfl += [T.RandomHorizontalFlip(hflip)]
        if aa:
            hp = dict(
                translate_const=int(min(h, w) * 0.45),
                img_mean=tuple(min(255, round(255 * m)) for m in mean),
                interpolation=interp,
            )
            if not aa.startswith("rand"):
                raise ValueError(f"simple=True supports RandAugment strings ('rand-...'), got aa={aa!r}")
            tfl += [timm_aa.rand_augment_transform(aa, hp)]
        elif color_jitter:
            cj = (float(color_jitter),) * 3 if isinstance(color_jitter, (int, float)) else tuple(color_jitter)
            tfl += [T.ColorJitter(*cj)]
    tfl += [T.ToTensor(), T.Normalize(mean, std)]
    if is_training and reprob > 0:
        tfl += [RandomErasing(reprob, mode=remode, device="cpu")]
    return _patch_posterize(T.Compose(tfl))
