"""Checkpoints: read, recognise and rename every DaViT key layout, load with a by-name report, save
safetensors, and fetch the released weights through the Hugging Face hub cache.

Native names are our model's (equal to timm's). Accepted layouts (SPEC section 4), detected from the keys:

- ``timm``: native names; also timm's Florence towers (``spatial_block``/``channel_block``) and timm
  ``features_only`` models (``stages_0``).
- ``official``: dingmyu/davit (``patch_embeds``, ``main_blocks``, ``cpe.0/1``, ``norms``, ``head``).
- ``florence2``: the original Florence-2 checkpoint (``vision_tower.convs``, ``conv1.fn.dw``,
  ``window_attn.fn``, ...).
- ``florence2_hf``: Florence-2 in transformers (``model.vision_tower.convs.{i}.conv``, ``conv1``,
  ``ffn.fc1``, ...).
- ``mm``: mmdet/mmseg backbones (``backbone.`` + official names, ``backbone.norm{i}`` -> ``out_norms.{i}``).

Keys outside the vision tower (language model, projector, detection neck/heads) are ignored and counted.
Fine-tuning with another class count: ``load_weights(model, path, ignore_head=True)`` keeps the trunk and head
norm and leaves the classifier Linear freshly initialised; ``create_model(..., pretrained=...,
num_classes=N)`` does this automatically when N differs from the checkpoint's classes.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LAYOUTS",
    "LoadReport",
    "WeightsError",
    "WeightsDownloadError",
    "load_state_dict",
    "detect_layout",
    "to_native",
    "from_native",
    "infer_arch",
    "guess_variants",
    "check_weights",
    "load_weights",
    "save_weights",
    "read_metadata",
    "pretrained_file",
    "load_pretrained",
]

log = logging.getLogger(__name__)

LAYOUTS = ("timm", "official", "florence2", "florence2_hf", "mm")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class WeightsError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model."""


class WeightsDownloadError(RuntimeError):
    """Pretrained weights could not be fetched from the hub (offline, missing repo or file)."""


# ----- reading files ----------------------------------------------------------------------------------------
def load_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict (stored names, wrappers/prefixes stripped).

    ``.safetensors`` is read with safetensors; torch files (.pth/.pt/.bin/.ckpt) only with
    ``torch.load(weights_only=True)``, so a pickle that would build arbitrary objects is refused, never run.
    ``{'state_dict': ...}``/``{'model': ...}`` wrappers are unwrapped (``use_ema=True`` prefers
    ``state_dict_ema``/``model_ema``), and ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) prefixes
    removed.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    if p.is_dir():
        raise WeightsError(f"{p} is a directory; pass the checkpoint file inside it (e.g. model.safetensors)")
    size = p.stat().st_size
    if size == 0:
        raise WeightsError(
            f"{p} is empty (0 bytes): the download or copy was interrupted; fetch the file again"
        )
    with open(p, "rb") as f:
        head = f.read(16)
    zipped, pickled = head[:4] == b"PK\x03\x04", head[:1] == b"\x80"
    # safetensors: u64 header length, then a JSON object; sniff the content so a misnamed file still loads
    if p.suffix == ".safetensors" or (head[8:9] == b"{" and not (zipped or pickled)):
        return _clean(_read_safetensors(p), p, use_ema)
    if zipped or pickled or p.suffix in TORCH_SUFFIXES:
        return _clean(_read_torch(p, zipped, zipped or pickled), p, use_ema)
    raise WeightsError(
        f"{p} is neither a safetensors file nor a PyTorch checkpoint (first bytes {head[:8]!r}); "
        "expected .safetensors, .pth, .pt, .bin or .ckpt"
    )


def _read_safetensors(p: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for every bad file
        raise WeightsError(f"cannot read {p} as safetensors: the file is corrupted or truncated ({e})") from e


def _read_torch(p: Path, zipped: bool, looks_pickled: bool = True) -> Any:
    try:
        # mmap keeps a multi-GB checkpoint (e.g. the whole Florence-2 VLM) out of RAM until tensors are used
        return torch.load(p, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        # random bytes also trip the weights-only unpickler: only call it a hostile pickle if it is one
        if looks_pickled and ("weights only" in str(e).lower() or "weights_only" in str(e)):
            raise WeightsError(
                f"refusing to load {p}: it is a pickle that holds more than tensors and plain containers "
                "(it would construct arbitrary Python objects, which can run code). Only plain state dicts "
                "are read (torch.load weights_only=True). If you trust its origin, extract the tensors "
                "yourself and "
                f"save them with davit.weights.save_weights(state_dict, 'model.safetensors'). Detail: "
                f"{str(e).splitlines()[-1] if str(e) else e}"
            ) from e
        raise WeightsError(f"cannot read {p} as a PyTorch checkpoint: not a valid pickle ({e})") from e
    except Exception as e:  # torch raises RuntimeError, EOFError, struct/zip errors... for damaged files
        raise WeightsError(
            f"cannot read {p} as a PyTorch checkpoint: the file is corrupted or truncated ({e})"
        ) from e


_WRAPPERS = ("state_dict", "model", "module", "net", "network")
_EMA_WRAPPERS = ("state_dict_ema", "model_ema", "ema")


def _clean(obj: Any, where: Any, use_ema: bool = False) -> dict[str, Tensor]:
    """Unwrap training-checkpoint containers, strip DDP/compile prefixes, insist on tensor values."""
    for _ in range(3):  # e.g. {'model': {'state_dict': ...}}
        if not isinstance(obj, Mapping):
            raise WeightsError(f"{where}: expected a dict of tensors, found {type(obj).__name__}")
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        order = (_EMA_WRAPPERS + _WRAPPERS) if use_ema else (_WRAPPERS + _EMA_WRAPPERS)
        inner = next((k for k in order if isinstance(obj.get(k), Mapping) and obj.get(k)), None)
        if inner is None:
            break
        obj = obj[inner]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{where}: holds no tensors (an empty or non-dict checkpoint)")
    bad = [(k, type(v).__name__) for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        shown = ", ".join(f"{k!r} ({t})" for k, t in bad[:5])
        raise WeightsError(
            f"{where}: not a plain state dict: {len(bad)} of {len(obj)} entries are not tensors, "
            f"e.g. {shown}; "
            f"top-level keys: {list(obj)[:10]}"
        )
    out = {}
    for k, v in obj.items():
        k = str(k).replace("_orig_mod.", "")
        while k.startswith("module."):
            k = k[len("module.") :]
        out[k] = v
    return out


# ----- key layouts ------------------------------------------------------------------------------------------
# Rules are (layout prefix template, native prefix template); {s} stage, {k} block, {b} 0=spatial / 1=channel.
# A rule matches a whole key: the template, then one leaf (weight/bias). Rules are read in both directions.
_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")  # same in official and native
_OFFICIAL = [
    ("patch_embeds.0.proj.", "stem.conv."),
    ("patch_embeds.0.norm.", "stem.norm."),
    ("patch_embeds.{s}.proj.", "stages.{s}.downsample.conv."),
    ("patch_embeds.{s}.norm.", "stages.{s}.downsample.norm."),
    ("main_blocks.{s}.{k}.{b}.cpe.0.proj.", "stages.{s}.blocks.{k}.{b}.cpe1.proj."),
    ("main_blocks.{s}.{k}.{b}.cpe.1.proj.", "stages.{s}.blocks.{k}.{b}.cpe2.proj."),
    *[(f"main_blocks.{{s}}.{{k}}.{{b}}.{p}.", f"stages.{{s}}.blocks.{{k}}.{{b}}.{p}.") for p in _PARTS],
    ("norms.", "head.norm."),
    ("head.", "head.fc."),
]
_MM = [r for r in _OFFICIAL if not r[1].startswith("head.")] + [("norm{s}.", "out_norms.{s}.")]


def _florence_rules(hf: bool) -> list[tuple[str, str]]:
    conv = "conv" if hf else "proj"
    rules = [
        (f"convs.0.{conv}.", "stem.conv."),
        ("convs.0.norm.", "stem.norm."),
        (f"convs.{{s}}.{conv}.", "stages.{s}.downsample.conv."),
        ("convs.{s}.norm.", "stages.{s}.downsample.norm."),
    ]
    for blk, b, attn in (("spatial_block", 0, "window_attn"), ("channel_block", 1, "channel_attn")):
        if hf:
            parts = {
                "conv1": "cpe1.proj",
                "norm1": "norm1",
                f"{attn}.qkv": "attn.qkv",
                f"{attn}.proj": "attn.proj",
                "conv2": "cpe2.proj",
                "norm2": "norm2",
                "ffn.fc1": "mlp.fc1",
                "ffn.fc2": "mlp.fc2",
            }
        else:
            parts = {
                "conv1.fn.dw": "cpe1.proj",
                f"{attn}.norm": "norm1",
                f"{attn}.fn.qkv": "attn.qkv",
                f"{attn}.fn.proj": "attn.proj",
                "conv2.fn.dw": "cpe2.proj",
                "ffn.norm": "norm2",
                "ffn.fn.net.fc1": "mlp.fc1",
                "ffn.fn.net.fc2": "mlp.fc2",
            }
        rules += [
            (f"blocks.{{s}}.{{k}}.{blk}.{src}.", f"stages.{{s}}.blocks.{{k}}.{b}.{dst}.")
            for src, dst in parts.items()
        ]
    return rules


_RULES = {
    "official": _OFFICIAL,
    "mm": _MM,
    "florence2": _florence_rules(False),
    "florence2_hf": _florence_rules(True),
}
# a key that only this layout has, and the prefix it is usually stored under
_ANCHORS = {
    "timm": ("stem.conv.weight", ""),
    "official": ("patch_embeds.0.proj.weight", ""),
    "florence2": ("convs.0.proj.weight", "vision_tower."),
    "florence2_hf": ("convs.0.conv.weight", "model.vision_tower."),
}


def _compile(template: str) -> re.Pattern:
    pat = re.escape(template).replace(r"\{s\}", r"(?P<s>\d+)").replace(r"\{k\}", r"(?P<k>\d+)")
    return re.compile("^" + pat.replace(r"\{b\}", r"(?P<b>[01])") + r"(?P<leaf>[^.]+)$")


_FWD = {n: [(_compile(src), dst) for src, dst in r] for n, r in _RULES.items()}
_REV = {n: [(_compile(dst), src) for src, dst in r] for n, r in _RULES.items()}


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pat, template in rules:
        m = pat.match(key)
        if m:
            g = m.groupdict()
            return template.format(**{k: v for k, v in g.items() if k != "leaf"}) + g["leaf"]
    return None


def _find_layout(sd: Mapping[str, Any]) -> tuple[str, str]:
    for layout, (anchor, _) in _ANCHORS.items():
        for k in sd:
            if k.endswith(anchor) and (k == anchor or k[: -len(anchor)].endswith(".")):
                prefix = k[: -len(anchor)]
                if layout == "official" and (prefix == "backbone." or f"{prefix}norm0.weight" in sd):
                    return "mm", prefix
                return layout, prefix
    shown = ", ".join(list(sd)[:6])
    raise WeightsError(
        f"unrecognised checkpoint layout: no DaViT stem key (stem.conv / patch_embeds.0.proj / "
        f"vision_tower.convs.0) among {len(sd)} keys (first: {shown}). Is this a DaViT checkpoint?"
    )


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """Name of the key layout (one of :data:`LAYOUTS`) of a state dict."""
    return _find_layout(state_dict)[0]


def to_native(
    state_dict: Mapping[str, Tensor], layout: str | None = None
) -> tuple[dict[str, Tensor], str, list[str], list[str]]:
    """Rename a state dict to native names.

    Returns ``(native, layout, ignored, unmapped)``: ``ignored`` are source keys outside the DaViT tower
    (language model, projector, detection neck/heads); ``unmapped`` are keys under the tower no rule knows
    (kept in ``native`` under their source name so a load reports them as unexpected).
    """
    found, prefix = _find_layout(state_dict)
    layout = "timm" if layout == "native" else layout
    if layout is not None and layout != found:
        if layout not in LAYOUTS:
            raise WeightsError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        # a caller-forced layout: use its usual prefix when the keys carry it
        prefix = _ANCHORS.get(layout, ("", "backbone." if layout == "mm" else ""))[1]
        if not any(k.startswith(prefix) for k in state_dict):
            prefix = ""
        found = layout
    native: dict[str, Tensor] = {}
    ignored, unmapped = [], []
    for key, v in state_dict.items():
        if not key.startswith(prefix):
            ignored.append(key)
            continue
        k = key[len(prefix) :]
        if found == "timm":
            # timm features_only models flatten stages.0 to stages_0; timm's Florence towers name the blocks
            new = re.sub(r"^stages_(\d+)\.", r"stages.\1.", k)
            new = new.replace(".spatial_block.", ".0.").replace(".channel_block.", ".1.")
        else:
            new = _rename(k, _FWD[found])
        if new is None:
            unmapped.append(key)
            new = k
        native[new] = v
    return native, found, ignored, unmapped


def from_native(
    state_dict: Mapping[str, Tensor], layout: str, named_blocks: bool = False
) -> dict[str, Tensor]:
    """Rename native keys to ``layout`` ("native", "timm", "official" or "mm").

    ``named_blocks`` writes timm's Florence-tower names (``spatial_block``/``channel_block``) for ``timm``.
    """
    if layout in ("native", "timm"):
        if not (named_blocks and layout == "timm"):
            return dict(state_dict)
        return {
            re.sub(
                r"(\.blocks\.\d+\.)([01])\.",
                lambda m: m.group(1) + ("spatial_block." if m.group(2) == "0" else "channel_block."),
                k,
            ): v
            for k, v in state_dict.items()
        }
    if layout not in ("official", "mm"):
        raise WeightsError(f"cannot write layout {layout!r}; choose native, timm, official or mm")
    prefix = "backbone." if layout == "mm" else ""
    out, bad = {}, []
    for k, v in state_dict.items():
        new = _rename(k, _REV[layout])
        if new is None:
            bad.append(k)
        else:
            out[prefix + new] = v
    if bad:
        raise WeightsError(
            f"{len(bad)} keys have no name in the {layout} layout (e.g. {bad[:5]}); use --to native"
        )
    return out


# ----- architecture from weights ----------------------------------------------------------------------------
def infer_arch(native: Mapping[str, Tensor]) -> dict[str, Any]:
    """Read embed_dims, depths, downsample kernel, in_chans and classes off a native state dict's shapes."""
    stages = sorted({int(m.group(1)) for k in native if (m := re.match(r"stages\.(\d+)\.", k))})
    dims, depths = [], []
    for i in stages:
        w = native.get("stem.conv.weight" if i == 0 else f"stages.{i}.downsample.conv.weight")
        dims.append(int(w.shape[0]) if w is not None else None)
        ks = {int(m.group(1)) for k in native if (m := re.match(rf"stages\.{i}\.blocks\.(\d+)\.", k))}
        depths.append(max(ks) + 1 if ks else 0)
    down = native.get("stages.1.downsample.conv.weight")
    conv_stem = "stem.conv1.weight" in native  # ConvStem: the input channels are its first conv's
    stem = native.get("stem.conv1.weight" if conv_stem else "stem.conv.weight")
    fc = native.get("head.fc.weight")
    return dict(
        embed_dims=tuple(dims),
        depths=tuple(depths),
        down_kernel_size=int(down.shape[-1]) if down is not None else None,
        in_chans=int(stem.shape[1]) if stem is not None else None,
        num_classes=int(fc.shape[0]) if fc is not None else 0,
        conv_stem=conv_stem,
    )


def guess_variants(native: Mapping[str, Tensor]) -> list[str]:
    """Registered variants whose dims, depths and downsample kernel equal those in the weights."""
    from .models import VARIANTS

    a = infer_arch(native)
    return [
        n
        for n, (arch, _) in VARIANTS.items()
        if tuple(arch["embed_dims"]) == a["embed_dims"]
        and tuple(arch["depths"]) == a["depths"]
        and arch.get("down_kernel_size", 2) == a["down_kernel_size"]
    ]


# ----- matching a model -------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a load did, by key name (native names unless said otherwise)."""

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys absent from the checkpoint (errors)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model has no place for (errors)
    mismatched: list[tuple[str, tuple | str, tuple | str]] = field(default_factory=list)  # key, ckpt, model
    fresh: list[str] = field(default_factory=list)  # model keys left at init on purpose (new head, out norms)
    unused: list[str] = field(default_factory=list)  # checkpoint keys this model does not need (head)
    ignored: list[str] = field(default_factory=list)  # source keys outside the DaViT tower (source names)
    hint: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"{self.source}: layout {self.layout}, {len(self.loaded)} tensors loaded"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {len(keys)} {label}: {_few(keys)}")
        if self.mismatched:
            shown = "; ".join(f"{k} checkpoint {a} vs model {b}" for k, a, b in self.mismatched[:8])
            more = f" (+{len(self.mismatched) - 8} more)" if len(self.mismatched) > 8 else ""
            lines.append(f"  {len(self.mismatched)} shape/dtype mismatches: {shown}{more}")
        if self.fresh:
            lines.append(
                f"  {len(self.fresh)} left initialised (not in checkpoint, allowed): {_few(self.fresh)}"
            )
        if self.unused:
            lines.append(f"  {len(self.unused)} unused by this model (allowed): {_few(self.unused)}")
        if self.ignored:
            lines.append(
                f"  {len(self.ignored)} keys outside the vision tower ignored: {_few(self.ignored, 3)}"
            )
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


def _few(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _prepare(src: str | os.PathLike | Mapping[str, Tensor], use_ema: bool, layout: str | None):
    if isinstance(src, Mapping):
        sd, name = _clean(src, "state dict", use_ema), "<state dict>"
    else:
        sd, name = load_state_dict(src, use_ema), str(src)
    native, found, ignored, _ = to_native(sd, layout)
    return native, found, ignored, name


def _match(model: nn.Module, native: dict[str, Tensor], layout: str, ignore_head: bool):
    """Pair checkpoint tensors with model parameters; returns (report fields, tensors to load)."""
    from .models import DaViTFeatures

    target = model.state_dict()
    r = dict(loaded=[], missing=[], unexpected=[], mismatched=[], fresh=[], unused=[])
    src = dict(native)
    if isinstance(model, DaViTFeatures):
        n_stages = len(model.stages)
        for k in list(src):
            m = re.match(r"stages\.(\d+)\.", k)
            if k.startswith("head.") or (m and int(m.group(1)) >= n_stages):
                r["unused"].append(k)  # a classifier's head / stages past the last output
                del src[k]
        if (
            layout == "mm" and model.out_norms is not None
        ):  # mm names out norms by stage, we by output position
            pos = {s: j for j, s in enumerate(model.out_indices)}
            for k in [k for k in src if k.startswith("out_norms.")]:
                s, rest = k.split(".", 2)[1:]
                v = src.pop(k)
                if int(s) in pos:
                    src[f"out_norms.{pos[int(s)]}.{rest}"] = v
                else:
                    r["unused"].append(k)
    for k in [k for k in src if k.startswith("out_norms.") and k not in target]:
        r["unused"].append(
            k
        )  # dense-prediction norms: not part of a classifier / a features model without them
        del src[k]
    if ignore_head:
        for k in [k for k in src if k.startswith("head.fc.")]:
            r["unused"].append(k)
            del src[k]
    src_has_head = any(k.startswith("head.") for k in src)
    num_classes = getattr(model, "num_classes", None)
    to_load = {}
    for k, t in target.items():
        if k not in src:
            # allowed gaps: fresh dense-prediction norms, a new classifier, the head norm of a headless tower
            allowed = (
                k.startswith("out_norms.")
                or (ignore_head and k.startswith("head."))
                or (not src_has_head and num_classes == 0 and k.startswith("head.norm."))
            )
            r["fresh" if allowed else "missing"].append(k)
        elif tuple(src[k].shape) != tuple(t.shape):
            r["mismatched"].append((k, tuple(src[k].shape), tuple(t.shape)))
        elif src[k].dtype.is_floating_point != t.dtype.is_floating_point:
            # copy_ would silently cast e.g. int32 or bool into float parameters: a wrong file, not a format
            r["mismatched"].append((k, f"dtype {src[k].dtype}", f"dtype {t.dtype}"))
        else:
            to_load[k] = src[k]
            r["loaded"].append(k)
    r["unexpected"] = [k for k in src if k not in target]
    return r, to_load


def _hint(model: nn.Module, native: dict[str, Tensor], r: dict) -> str:
    if not (r["missing"] or r["unexpected"] or r["mismatched"]):
        return ""
    a = infer_arch(native)
    name = getattr(model, "pretrained_cfg", {}).get("name", type(model).__name__)
    hints = []
    structural = [
        k
        for k, c, _ in r["mismatched"]
        if isinstance(c, tuple) and not k.startswith(("head.fc.", "stem.conv.weight"))
    ]
    if any(isinstance(c, str) for _, c, _ in r["mismatched"]):
        hints.append("integer/bool tensors where the model has float parameters: these are not DaViT weights")
    own_conv_stem = hasattr(getattr(model, "stem", None), "conv1")  # a ConvStem
    if a["conv_stem"] != own_conv_stem:
        has = "has" if a["conv_stem"] else "has no"
        hints.append(
            f"the checkpoint {has} a two-conv stem (stem.conv1): build the model with "
            f"conv_stem={a['conv_stem']}"
        )
    if structural or r["unexpected"] or any(not k.startswith("head.") for k in r["missing"]):
        guesses = guess_variants(native)
        desc = (
            f"embed_dims {a['embed_dims']}, depths {a['depths']}, downsample kernel {a['down_kernel_size']}"
        )
        if guesses and name not in guesses:  # (the right variant with other options: the stem hint says)
            hints.append(
                f"the checkpoint looks like {' or '.join(guesses)} ({desc}), not {name}; build that model"
            )
        elif not guesses:
            hints.append(f"the checkpoint has {desc}, which matches no registered variant")
    n_cls = getattr(model, "num_classes", None)
    head_keys = r["missing"] + r["unexpected"] + [k for k, _, _ in r["mismatched"]]
    has_head = any(k.startswith("head.") for k in native)
    if not has_head and any(k.startswith("head.") for k in r["missing"]):
        hints.append(
            "the checkpoint is a backbone without a head: pass ignore_head=True or build num_classes=0"
        )
    elif any(k.startswith("head.fc.") for k in head_keys) and a["num_classes"] != n_cls:
        hints.append(
            f"classifier: checkpoint has {a['num_classes']} classes, model {n_cls}; pass ignore_head=True to "
            "keep a fresh classifier (fine-tuning), or build the model with the checkpoint's classes"
        )
    if a["in_chans"] is not None and a["in_chans"] != getattr(model, "in_chans", a["in_chans"]):
        hints.append(f"input channels: checkpoint {a['in_chans']}, model {getattr(model, 'in_chans', '?')}")
    return "; ".join(hints)


def check_weights(
    model: nn.Module,
    src: str | os.PathLike | Mapping[str, Tensor],
    ignore_head: bool = False,
    layout: str | None = None,
    use_ema: bool = False,
) -> LoadReport:
    """The report :func:`load_weights` would give, without touching the model (works on the meta device)."""
    native, found, ignored, name = _prepare(src, use_ema, layout)
    r, _ = _match(model, native, found, ignore_head)
    return LoadReport(source=name, layout=found, ignored=ignored, hint=_hint(model, native, r), **r)


def load_weights(
    model: nn.Module,
    src: str | os.PathLike | Mapping[str, Tensor],
    strict: bool = True,
    ignore_head: bool = False,
    layout: str | None = None,
    use_ema: bool = False,
    adapt_in_chans: bool = False,
) -> LoadReport:
    """Load a checkpoint (file path or state dict, any accepted layout) into a DaViT or DaViTFeatures.

    Args:
        strict: raise :class:`WeightsError` listing missing / unexpected / shape-mismatched keys by name
            (with a guess of the right variant) instead of loading what fits.
        ignore_head: do not load ``head.fc`` (the classifier Linear) and allow it to be absent: fine-tuning
            with a different number of classes.
        layout: force a layout instead of detecting it.
        use_ema: prefer EMA weights when the file holds both.
        adapt_in_chans: a stem conv with other input channels than the model's is adapted (summed for
            1 channel, tiled and rescaled otherwise: a grey Fashion-MNIST classifier into an RGB backbone).

    A model built under ``torch.device("meta")`` takes the checkpoint tensors as its parameters (fast, no
    double allocation). Allowed without error (listed in the report): the head of a classification checkpoint
    loaded into a features model, dense-prediction ``out_norms`` missing (fresh) or unused, the head norm of a
    headless tower.
    """
    native, found, ignored, name = _prepare(src, use_ema, layout)
    if adapt_in_chans:
        _adapt_stem(model, native)
    r, to_load = _match(model, native, found, ignore_head)
    report = LoadReport(source=name, layout=found, ignored=ignored, hint=_hint(model, native, r), **r)
    if strict and not report.ok:
        raise WeightsError(f"checkpoint does not fit the model (strict load):\n{report}")
    target = model.state_dict()
    if any(t.is_meta for t in target.values()):
        # built under torch.device("meta"): take the checkpoint tensors as the parameters (no init, no copy),
        # in the model's dtype; anything the checkpoint lacks stays on meta and fails loudly if used
        to_load = {k: v.to(target[k].dtype) for k, v in to_load.items()}
        model.load_state_dict(to_load, strict=False, assign=True)
    else:
        model.load_state_dict(to_load, strict=False)
    return report


# ----- writing ----------------------------------------------------------------------------------------------
def save_weights(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write weights as ``.safetensors`` (never a pickle), atomically; metadata values stored as strings."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix != ".safetensors":
        raise WeightsError(
            f"refusing to write {p}: weights are saved as .safetensors only (pickles can run code)"
        )
    sd = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    tensors, seen = {}, set()
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise WeightsError(f"cannot save {k!r}: {type(v).__name__} is not a tensor")
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:  # safetensors refuses tensors that share storage
            v = v.clone()
        seen.add(ptr)
        tensors[k] = v
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".safetensors.tmp", dir=p.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return p


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The header metadata of a .safetensors (e.g. what the trainer stored through :func:`save_weights`:
    model, arch, classes, in_chans, img_size, mean, std...), JSON values decoded; {} for other files."""
    if not str(path).endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = f.metadata() or {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


# ----- released weights through the hub cache ---------------------------------------------------------------
def _tag(hub_id: str) -> str:
    return hub_id.split(".", 1)[1] if "." in hub_id.split("/")[-1] else "msft_florence2"


def released_tag(name: str) -> str | None:
    """The tag of a variant's released weights (``"msft_in1k"``), None when it has none."""
    from .models import model_info

    hub_id = model_info(name)["hf_hub_id"]
    return _tag(hub_id) if hub_id else None


def pretrained_file(name: str, tag: bool | str = True) -> str:
    """Local path of a variant's released weights, fetched with ``huggingface_hub`` (standard hub cache)."""
    from .models import VARIANTS, model_info

    hub_id = model_info(name)["hf_hub_id"]
    if not hub_id:
        have = [f"{n} ({_tag(m['hf_hub_id'])})" for n, (_, m) in VARIANTS.items() if m.get("hf_hub_id")]
        raise WeightsDownloadError(
            f"{name} has no released weights; variants with weights: {', '.join(have)}. "
            f"Pass your own checkpoint with pretrained='path/to/file'."
        )
    if isinstance(tag, str) and tag != _tag(hub_id):
        raise WeightsDownloadError(
            f"unknown pretrained tag {tag!r} for {name} (and no such file); available: {_tag(hub_id)!r}. "
            "pretrained= takes True, a tag, or the path of an existing checkpoint file."
        )
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    # timm repos hold model.safetensors; Florence-2 repos the whole VLM as pytorch_model.bin
    files = (
        ("model.safetensors",) if hub_id.startswith("timm/") else ("pytorch_model.bin", "model.safetensors")
    )
    unreachable, cache_only = False, False
    for fname in files:
        try:
            return hf_hub_download(hub_id, fname, local_files_only=cache_only)
        except LocalEntryNotFoundError:
            # offline or unreachable, and not cached; the other file may still be cached (no retries needed)
            unreachable = cache_only = True
        except EntryNotFoundError:
            continue  # the repo has no such file; try the next name
        except HfHubHTTPError as e:
            raise WeightsDownloadError(f"could not download {hub_id}/{fname} for {name}: {e}") from e
    cache = constants.HF_HUB_CACHE
    if unreachable:
        why = (
            "HF_HUB_OFFLINE is set and the file is not in the hub cache"
            if constants.is_offline_mode()
            else "the Hugging Face Hub could not be reached and the file is not in the hub cache; this "
            "machine "
            "seems to be offline"
        )
        raise WeightsDownloadError(
            f"could not download the pretrained weights for {name} ({hub_id}, {files[0]}): {why} ({cache}). "
            f"Either pass a local checkpoint, e.g. create_model({name!r}, pretrained='/path/to/{files[0]}') "
            f"(any layout `davit convert` reads), or fetch it once on a connected machine "
            f"(`hf download {hub_id} "
            f"{files[0]}`), copy the hub cache here (or point HF_HUB_CACHE at it) and set HF_HUB_OFFLINE=1."
        )
    raise WeightsDownloadError(
        f"{hub_id} holds none of {files}; pass pretrained='path/to/checkpoint' instead"
    )


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or s.endswith((".safetensors",) + TORCH_SUFFIXES) or os.path.exists(s)


def load_pretrained(model: nn.Module, name: str, pretrained: bool | str) -> LoadReport:
    """``create_model(pretrained=...)``: True or a tag downloads the released weights; a path loads a file.

    A classifier whose class count differs from the checkpoint's gets a fresh head (trunk and head norm
    loaded); a model with in_chans != 3 gets the stem conv adapted from RGB (summed for 1 channel, tiled and
    rescaled otherwise).
    """
    if isinstance(pretrained, str) and _looks_like_path(pretrained):
        path = pretrained
        if not os.path.exists(path):
            raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    else:
        path = pretrained_file(name, pretrained)
    native, found, ignored, src = _prepare(path, False, None)
    fc = native.get("head.fc.weight")
    ignore_head = fc is not None and getattr(model, "num_classes", 0) != fc.shape[0]
    _adapt_stem(model, native)
    report = load_weights(model, native, strict=True, ignore_head=ignore_head, layout="timm")
    report.source, report.layout, report.ignored = src, found, ignored
    if ignore_head:
        log.info(
            "%s: classifier re-initialised for %s classes (checkpoint has %d)",
            name,
            model.num_classes,
            fc.shape[0],
        )
    return report


def _adapt_stem(model: nn.Module, native: dict[str, Tensor]) -> None:
    """Adapt ``native``'s stem conv (the first conv of a ConvStem) in place to the model's input channels
    when only those differ."""
    key = "stem.conv1.weight" if "stem.conv1.weight" in native else "stem.conv.weight"
    stem, own = native.get(key), model.state_dict().get(key)
    if stem is None or own is None or stem.ndim != 4 or stem.shape[1] == own.shape[1]:
        return
    if stem.shape[0] != own.shape[0] or stem.shape[2:] != own.shape[2:]:
        return  # another architecture: the strict load names the mismatch
    native[key] = _adapt_input_conv(stem, own.shape[1])
    log.info("adapted %s from %d to %d input channels", key[:-7], stem.shape[1], own.shape[1])


def _adapt_input_conv(w: Tensor, in_chans: int) -> Tensor:
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)  # a grey image is R=G=B: the summed filter gives the same response
    reps = -(-in_chans // w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)
