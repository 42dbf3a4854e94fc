"""Speed experiments behind results/speed/ (README there): the GPU report (the device figures of
one call: training img/s eager and compiled, FLOPs per image, MFU, the loader, the teacher's
update, a torchrun check) and our vectorised targets timed against Lightweight OpenPose's loops.

    python results/speed/speed.py --gpu-report --preset paper [--out DIR]
    python results/speed/speed.py --bench-targets

Run from the repository's root. `python repro.py --bench` (in repro.py) is the everyday speed
check; this file imports repro.py for the method, its timing helpers and its command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repro.py, two folders up
import repro as R  # noqa: E402
from repro import (  # noqa: E402
    PRESETS, TEACHER_HARD_CROPS, Batch, BatchMaker, Config, Data, Job, Teacher, Trainer,
    autocast, collate, config_flag, device_name, heatmap_targets, load_checkpoint, load_data,
    one_thread, paf_targets, pose_loss, precision, seconds_per_call, skeleton, start_job,
    to_input, write_json)

PROG = "results/speed/speed.py"

# [ours] from NVIDIA's datasheets: dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a part
# of the name torch reports; the first match counts, so the specific names come first
GPU_BF16_PEAK_TFLOPS = (("H200", 989.5), ("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.5),
                        ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0))


def bf16_peak_tflops(device: torch.device) -> tuple[str, float | None]:
    name = device_name(device)
    return name, next((peak for part, peak in GPU_BF16_PEAK_TFLOPS if part in name), None)


def train_flops_per_image(trainer: Trainer, batch: Batch) -> float:
    """Model FLOPs of one training step (forward + backward), per image,
    as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, device = trainer.cfg, trainer.device
    with FlopCounterMode(display=False) as counter:
        with autocast(device, cfg):
            outputs = trainer.model(to_input(batch.image, device))
        loss, _ = pose_loss(outputs, batch.target.to(device), batch.loss_mask.to(device))
        loss.backward()
    trainer.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch.image)


def data_argv(cfg: Config) -> list[str]:
    """The flags that name this run's data, for a child process."""
    flags = ("data", "coco_root", "train_json", "train_images", "val_json", "val_images",
             "synthetic_json", "bank_json", "demo_dir", "demo_size", "mpii_root", "skeleton")
    return [a for f in flags if getattr(cfg, f) is not None
            for a in (config_flag(f), str(getattr(cfg, f)))]


def torchrun_check(cfg: Config, device: torch.device, steps: int = 3) -> dict:
    """`torchrun --nproc-per-node 1` (NCCL on a GPU, gloo on a CPU) trains a few steps of this
    network."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "1", str(Path(R.__file__).resolve()), "--preset", cfg.preset,
                "--mode", "real", *data_argv(cfg),
                "--arch", cfg.arch, "--stages", str(cfg.stages), "--width", str(cfg.width),
                "--input-size", str(cfg.input_size), "--batch-size", str(cfg.batch_size),
                "--steps", str(steps), "--minutes", "0", "--device", device.type, "--init", "none",
                "--max-val-images", "1", "--eval-scales", "1.0", "--eval-height",
                str(cfg.input_size), "--out", str(Path(tmp) / "run")]
        t = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        ckpt = Path(tmp) / "run" / "ckpt.pt"
        step = load_checkpoint(ckpt)["step"] if ckpt.is_file() else None
    return dict(backend="nccl" if device.type == "cuda" else "gloo", returncode=done.returncode,
                steps=step,
                seconds=seconds, ok=done.returncode == 0 and step == steps,
                stderr_tail=done.stderr[-500:] if done.returncode else "")


def gpu_report(cfg: Config, data: Data, device: torch.device, steps: int = 20) -> dict:
    """The issue-20 device figures in one call: the student's training img/s (eager and compiled),
    its FLOPs per image and MFU, the loader against pre-made batches with a worker per core, the
    teacher's cost per update and a torchrun check; written to results/gpu-bench/gpu-bench.json
    (or --out)."""
    cores = len(os.sched_getaffinity(0))
    cfg = dataclasses.replace(cfg, mode="augmented", steps=10 * steps, workers=cores, init=None)
    name, peak = bf16_peak_tflops(device)
    report = dict(device=name, torch=torch.__version__, cuda=torch.version.cuda, cores=cores,
                  precision=precision(device, cfg), preset=cfg.preset, arch=cfg.arch,
                  stages=cfg.stages, input_size=cfg.input_size, batch_size=cfg.batch_size,
                  argv=sys.argv, bf16_peak_tflops=peak)
    trainer = Trainer(cfg, data, device, Path("."))
    rng = np.random.default_rng(0)
    fixed = trainer.maker.batch(trainer.maker.plan(cfg.batch_size, rng), rng)
    report["train_flops_per_image"] = flops = train_flops_per_image(trainer, fixed)
    for compiled in (False, True):
        t = trainer if not compiled else Trainer(dataclasses.replace(cfg, compile=True), data,
                                                 device, Path("."))
        # compiled: the compile itself
        first = seconds_per_call(lambda: t.train_step(fixed, cfg.lr), 1)
        img_s = cfg.batch_size / seconds_per_call(lambda: t.train_step(fixed, cfg.lr), steps,
                                                  warmup=2)
        key = "compiled" if compiled else "eager"
        report[f"{key}_first_step_s"], report[f"{key}_img_s_premade"] = first, img_s
        report[f"{key}_mfu"] = flops * img_s / (peak * 1e12) if peak else None
    stream = (b for _, b in trainer.batches())
    streamed = cfg.batch_size / seconds_per_call(lambda: trainer.train_step(next(stream), cfg.lr),
                                                 steps, warmup=3)
    report |= dict(eager_img_s_end_to_end=streamed, loader_workers=cores,
                   pipeline_ratio=streamed / report["eager_img_s_premade"])
    teacher = Teacher(dataclasses.replace(cfg, mode="student-teacher"), trainer.maker, device)
    # a window's hard crops
    hard = np.resize(fixed.image, (TEACHER_HARD_CROPS,) + fixed.image.shape[1:])
    target = np.full(teacher.bins, 1 / teacher.bins)
    report["teacher_update_s"] = seconds_per_call(lambda: (teacher.learn(target, hard, cfg.lr, 0),
                                                           teacher.output(hard)), 5, warmup=1)
    report["torchrun"] = torchrun_check(cfg, device)
    path = Path(cfg.out) / "gpu-bench.json" if cfg.out else Path("results/gpu-bench/gpu-bench.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, path)
    for k, v in report.items():
        print(f"  {k:28s} {v:10.3f}" if isinstance(v, float) else f"  {k:28s} {v}")
    print(f"written: {path}")
    return report


def peer_targets(keypoints: np.ndarray, size: int, stride: int, sigma: float, thickness: float,
                 limbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the side-by-side timing only, not used in training: the peer's method, Lightweight
    OpenPose's plain Python loops (datasets/coco.py, _generate_keypoint_maps + _generate_paf_maps),
    re-implemented on one sample's (P, K, 3) people. Per joint, the cells of a 4-sigma window get
    the Gaussian (cut at 0.01) added and clipped at 1; per limb, the cells of its joints' box grown
    by `thickness` cells and within `thickness` cells of its line get its unit vector, the last
    person winning."""
    n = size // stride
    heat, paf = (np.zeros((keypoints.shape[1] + 1, n, n), np.float32),
                 np.zeros((2 * len(limbs), n, n), np.float32))
    shift = stride / 2 - 0.5
    for part in range(keypoints.shape[1]):
        for x, y, v in keypoints[:, part]:
            if v <= 0:
                continue
            x0, y0 = max(int(x - 4 * sigma), 0), max(int(y - 4 * sigma), 0)
            x1, y1 = min(int(x + 4 * sigma), size), min(int(y + 4 * sigma), size)
            for row in range(y0 // stride, y1 // stride):
                for col in range(x0 // stride, x1 // stride):
                    e = (((col * stride + shift - x) ** 2 + (row * stride + shift - y) ** 2)
                         / (2 * sigma ** 2))
                    if e <= math.log(100):
                        heat[part, row, col] = min(heat[part, row, col] + math.exp(-e), 1.0)
    heat[-1] = 1 - heat[:-1].max(0)
    for limb, (ja, jb) in enumerate(limbs):
        in_cells = keypoints / [stride, stride, 1]
        for (xa, ya, va), (xb, yb, vb) in zip(in_cells[:, ja], in_cells[:, jb]):
            norm = math.hypot(xb - xa, yb - ya)
            if va <= 0 or vb <= 0 or norm < 1e-7:
                continue
            ux, uy = (xb - xa) / norm, (yb - ya) / norm
            for row in range(int(max(min(ya, yb) - thickness, 0)),
                             int(min(max(ya, yb) + thickness, n))):
                for col in range(int(max(min(xa, xb) - thickness, 0)),
                                 int(min(max(xa, xb) + thickness, n))):
                    if abs((col - xa) * uy - (row - ya) * ux) <= thickness:
                        paf[2 * limb, row, col], paf[2 * limb + 1, row, col] = ux, uy
    return heat, paf


def bench_people(data: Data, cfg: Config, per_sample: int, samples: int,
                 rng: np.random.Generator) -> torch.Tensor:
    """(samples, per_sample, K, 3) people as crops at cfg's geometry place them: everyone in 4x as
    many training crops, drawn at random."""
    maker = BatchMaker(data, dataclasses.replace(cfg, mode="real"))
    pool = []
    while len(pool) < 4 * samples * per_sample:
        for kp in collate([maker.sample(spec, rng) for spec in maker.plan(16, rng)])[1]:
            pool += [person for person in kp if (person[:, 2] > 0).any()]
    pool = np.stack(pool)
    return torch.as_tensor(pool[rng.choice(len(pool), (samples, per_sample), replace=False)])


def bench_targets(cfg: Config, data: Data, people: tuple[int, ...] = (1, 5, 10),
                  batch: int = 16) -> dict:
    """heatmap_targets + paf_targets against the peer's loops, on one thread and the same people:
    ms per sample batched as the loader does, one sample at a time, and the peer's (best of 5)."""
    sk, rng, figures = skeleton(cfg), np.random.default_rng(0), {}
    with one_thread():
        for name, preset in (("demo", PRESETS["demo"]), ("paper", PRESETS["paper"])):
            geometry = {k: preset.get(k, getattr(Config(), k))
                        for k in ("input_size", "stride", "sigma", "paf_width",
                                  "max_center_offset")}
            g = dataclasses.replace(cfg, **geometry)
            size, stride = g.input_size, g.stride
            print(f"\ntargets at the {name} geometry ({size} px, stride {stride}, sigma "
                  f"{g.sigma}, PAF half-width {g.paf_width} px = the peer's thickness "
                  f"{g.paf_width / stride} cells), 1 thread, ms per sample")
            for n in people:
                kp = bench_people(data, g, n, batch, rng)

                def ours(k):
                    return (heatmap_targets(k, size, stride, g.sigma),
                            paf_targets(k, size, stride, g.paf_width, sk.limbs))

                # the best of 5: on a shared machine the fastest repeat is the least disturbed one
                batched = min(seconds_per_call(lambda: ours(kp), 1, warmup=1)
                              for _ in range(5)) / batch
                single = min(seconds_per_call(lambda: [ours(k[None]) for k in kp], 1)
                             for _ in range(5)) / batch
                thickness = g.paf_width / stride
                peer = min(seconds_per_call(lambda: [peer_targets(k.numpy(), size, stride, g.sigma,
                                                                  thickness, sk.limbs)
                                                     for k in kp], 1) for _ in range(5)) / batch
                figures[f"{name}_{n}_people"] = row = dict(batched_ms=batched * 1e3,
                                                           single_ms=single * 1e3,
                                                           peer_ms=peer * 1e3,
                                                           speedup_batched=peer / batched,
                                                           speedup_single=peer / single)
                print(f"  people {n:2d}: ours batched by {batch} {row['batched_ms']:6.3f}, one at "
                      f"a time {row['single_ms']:6.3f}, peer {row['peer_ms']:6.3f}: "
                      f"{row['speedup_batched']:4.1f}x and {row['speedup_single']:4.1f}x faster")
    return figures


# ----------------------------------------------------------------------------------------------
# The command line: repro.py's parser, with this file's jobs
# ----------------------------------------------------------------------------------------------

def bench_targets_job(cfg: Config, args: argparse.Namespace) -> None:
    start_job(cfg)
    bench_targets(cfg, load_data(cfg))


def gpu_report_job(cfg: Config, args: argparse.Namespace) -> None:
    device = start_job(cfg)[2]
    gpu_report(cfg, load_data(cfg), device)


JOBS = {job.flag: job for job in (
    Job("--bench-targets", bench_targets_job, "time heatmap + PAF targets against Lightweight "
        "OpenPose's loops at the demo and paper geometries (one thread) and exit",
        action="store_true", prog=PROG),
    Job("--gpu-report", gpu_report_job, "the device figures of one call (training img/s eager and "
        "compiled, FLOPs per image, MFU, loader ratio, teacher update, a torchrun check) into "
        "results/gpu-bench/, and exit", action="store_true", prog=PROG),
)}


parse_args, main = R.command_line(JOBS)  # repro.py's, over this file's jobs

if __name__ == "__main__":
    sys.exit(main())
