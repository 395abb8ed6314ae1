"""Inference speed of the recipe-size dense models: `davit_tiny` Mask R-CNN (coco-maskrcnn-1x) and UperNet
(ade20k-upernet-160k), each built exactly as its preset builds it.

    .venv/bin/python benchmarks/dense_infer.py --device cpu --repeats 5 --json /tmp/dense_infer.json

Inputs are synthetic images of typical dataset sizes: a 480 x 640 COCO-like image, which Mask R-CNN's own
transform rescales to its test size (short side 800, long side at most 1333: 800 x 1067), and a
512 x 683 ADE20K-like image segmented whole at the preset's test resize (short side 512). The weights are
random (no COCO/ADE20K checkpoint here): for UperNet that does not change the work; Mask R-CNN's work
depends on how many detections pass the score threshold (the mask head runs on each), and random weights
pass none at the preset's 0.05, so the threshold is set to 0 here: the mask head then runs on the full
``detections_per_img`` (100), the upper end of a trained model's work.
Reported per model: median seconds per image over ``--repeats`` timed runs after one warm-up, img/s, and the
peak resident memory (CPU) or peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from datetime import datetime, timezone

import torch

from davit.tasks.config import resolve_task_config
from davit.tasks.engine import build_model
from davit.tasks.segmentation import segment_inference


def _timed(fn, repeats: int, device: torch.device) -> list[float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (allocations, oneDNN/cuDNN kernel choice)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    rows = []

    det_cfg = resolve_task_config("detect", "coco-maskrcnn-1x")
    det = build_model(det_cfg, backbone_weights=False).to(dev).eval()
    det.roi_heads.score_thresh = 0.0  # see the module docstring: 100 detections, as a busy trained model
    coco_img = torch.rand(3, 480, 640, generator=g).to(dev)
    with torch.no_grad():
        n_det = len(det([coco_img])[0]["boxes"])
        t = _timed(lambda: det([coco_img]), args.repeats, dev)
    rows.append(dict(model="Mask R-CNN davit_tiny (coco-maskrcnn-1x)", input="480x640 -> 800x1067",
                     detections=n_det, times_s=t))  # fmt: skip

    seg_cfg = resolve_task_config("segment", "ade20k-upernet-160k")
    seg = build_model(seg_cfg, backbone_weights=False).to(dev).eval()
    ade_img = torch.randn(1, 3, 512, 683, generator=g).to(dev)

    def run_seg():
        return segment_inference(seg, ade_img, seg_cfg.test_mode, seg_cfg.test_crop, seg_cfg.test_stride,
                                 seg_cfg.test_scales, seg_cfg.test_flip, scale=seg_cfg.scale)  # fmt: skip

    t = _timed(run_seg, args.repeats, dev)
    rows.append(dict(model="UperNet davit_tiny (ade20k-upernet-160k)", input="512x683, whole", times_s=t))

    for r in rows:
        med = statistics.median(r["times_s"])
        r.update(median_s=round(med, 4), img_per_s=round(1 / med, 3))
        print(f"{r['model']:45s} {r['input']:22s} {med:8.3f} s/img  {1 / med:7.3f} img/s", flush=True)
    if dev.type == "cuda":
        mem = dict(peak_gpu_mem_gb=round(torch.cuda.max_memory_allocated(dev) / 2**30, 2))
    else:
        mem = dict(peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    print(mem)
    if args.json:
        meta = dict(
            command="benchmarks/dense_infer.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
            machine=f"{platform.machine()} {torch.get_num_threads()} threads, {platform.processor() or ''}",
            device=str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
            torch=torch.__version__,
            date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            **mem,
        )
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
