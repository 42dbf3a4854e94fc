"""Learning to Train with Synthetic Humans (Hoffmann et al., GCPR 2019): a minimal reproduction.

    python repro.py --mode augmented                 # demo benchmark, rendered on first use
    python repro.py --mode real --coco-root COCO     # real COCO through pycocotools
    python repro.py --mode eval --ckpt runs/RUN/ckpt.pt
    python repro.py --mode predict --input photos/     # your own images or a video, the shipped student
    python repro.py --bench

Reading map. Part I, the method, has these sections: config, skeletons, datasets, person-centric crops
and compositing, targets and loss masks, batches, networks, loss, teacher, trainer, inference,
evaluation. Part II, the tooling around it: MPII human pose, files, figures, benchmark, predict,
runs, the command line. The experiments behind results/ are scripts beside their results, each
importing this file and using its command line with jobs of its own: results/protocol/claims.py
(the claims protocol: its rounds as data, the runner, the statistics, the probe, the report),
results/domain-gap/domain_gap.py, results/speed/speed.py (the GPU report, targets against
Lightweight OpenPose's loops).
The way in, main to Trainer.fit (a test follows its calls and counts the long jumps):
  main -> parse_args -> check_config -> train_job -> load_data -> run_training -> Trainer.fit
Part I follows one training step's data (Trainer.fit):
  BatchMaker.plan (which crops: real, synthetic or augmented slots, or the teacher's bin)
  -> BatchMaker.sample: crop_person, paste_people (person-centric crops; synthetic people pasted on)
  -> make_targets (heatmaps, PAFs, the loss mask M; pasted people in or out of the loss): a Batch
  -> Trainer.train_step (pose_loss; sample_hardness for the teacher): a StepResult
  -> Teacher.observe, every teacher_interval steps Teacher.decide (reward, update, next bin);
then inference and grouping, and the evaluation.
Where the paper's rules live:
  pasted people in or out of the loss ... people_in_targets, volumetric_mask (PASTED_MASK_THRESHOLD)
  the image's ignore mask ............... ignore_mask
  the heatmap and PAF targets ........... heatmap_targets, paf_targets
  the loss and the teacher's hardness ... pose_loss, sample_hardness
  the teacher's reward and update ....... Teacher.decide, soft_target, Teacher.learn (SharedAdam)
  inference and grouping ................ network_maps, find_peaks, group_people
  what differs between benchmarks ....... CocoBenchmark, MpiiBenchmark (Skeleton.benchmark)
Part I uses Part II only through these seams (a test checks the list): load_checkpoint, load_weights,
save_atomic (checkpoint files), append_jsonl, write_json (metric and prediction files),
MpiiBenchmark (MPII's file formats and scoring: Skeleton.benchmark looks it up by the skeleton's
name); a skeleton is whole once built. Part II: MPII's files and scoring, files and checkpoints,
figures, the bench, predict and ONNX, runs (main, a training run's start, its folder and finish),
and the command line.
Every constant says where it comes from: "paper code:" for the authors' released code
(DavHoffmann/LearningToTrainWithSyntheticHumans), "[ours]" for our choices; README.md's sections
"What the paper's code does" and "Deviations and choices" say both in words.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import render_humans as rh

cv2.setNumThreads(1)  # cv2's own pool fights torch for the cores; our images are small


# ==============================================================================================
# Part I: the method, in the order one training step's data flows
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# Config: every setting once, with its help, its --help group and the jobs that read it
# ----------------------------------------------------------------------------------------------

MODES = ("real", "synthetic", "augmented", "student-teacher", "eval", "predict")


def config_flag(name: str) -> str:
    """A Config field's command-line flag: train_subset -> --train-subset."""
    return "--" + name.replace("_", "-")


class FlagGroup(NamedTuple):
    """A --help group of Config's flags, and the jobs that read its fields besides the --mode runs
    (which read every field): the job flags of the command line; "predict" for --mode predict."""
    title: str
    jobs: str

    def __call__(self, default, help: str, choices: tuple | None = None, jobs: str | None = None):
        """A Config field of this group with its own help and choices; `jobs`, where a field's
        readers are not its group's, names them all."""
        readers = tuple((self.jobs if jobs is None else jobs).split())
        meta = dict(help=help, choices=choices, group=self.title, jobs=readers)
        return field(default=default, metadata=meta)


# The groups in --help's order, each with the jobs that read its fields. A job reads what its
# function reads: bench and gpu_report fix the mode (augmented) and the steps, gpu_report also
# --init, --workers and --compile; the domain gap evaluates a checkpoint on rendered sets (its
# network is the checkpoint's; --preset sets --eval-height). The probe takes a training run's flags,
# as the protocol passes it its runs' common ones (--minutes, --log-every, --eval-scales, ... it
# does not read), less those its design fixes (--mode, the sampling) and other jobs' inputs
# (--resume, --ckpt, --input, --onnx). --mode predict's network is its checkpoint's: it reads few
# training flags. --probe, --domain-gap, --gpu-report and --bench-targets are the jobs of the
# scripts under results/ (ELSEWHERE), which read these fields through this file's parser.
WHAT = FlagGroup("what to run", "--probe --domain-gap --bench --bench-targets --gpu-report predict")
DATA = FlagGroup("data", "--probe --bench --bench-targets --gpu-report")
METHOD = FlagGroup("method", "--probe --bench --gpu-report")
NETWORK = FlagGroup("network", "--probe --bench --gpu-report")
GEOMETRY = FlagGroup("geometry", "--probe --bench --bench-targets --gpu-report")
OPTIMISATION = FlagGroup("optimisation", "--probe")
INFERENCE = FlagGroup("inference", "--probe --domain-gap --bench predict")
EVALUATION = FlagGroup("evaluation during training", "--probe")
TEACHER = FlagGroup("teacher", "--probe --gpu-report")
RUN = FlagGroup("run", "--probe")
FILES = FlagGroup("checkpoint and input", "predict")
MACHINE = FlagGroup("machine", "--probe --domain-gap --bench --gpu-report predict")
HELP_GROUPS = (WHAT, DATA, METHOD, NETWORK, GEOMETRY, OPTIMISATION, INFERENCE, EVALUATION, TEACHER,
               RUN, FILES, MACHINE)
STEPS = "--probe --bench --gpu-report"  # the jobs that take training steps as the --mode runs do


@dataclass
class Config:
    """Every setting of a run; the defaults are the CPU-sized demo preset (README, "Deviations")."""
    mode: str = WHAT("augmented", "training regime, eval of --ckpt, or predict: --ckpt on your own "
                     "--input", MODES, jobs="predict")
    preset: str = WHAT("demo", "paper: the paper's network and schedule; demo: CPU-sized",
                       ("demo", "paper"))
    # data
    data: str = DATA("auto", "auto: coco when --coco-root/--train-json is given, else the built-in "
                     "demo benchmark", ("auto", "demo", "coco"))
    coco_root: str | None = DATA(None, "COCO root with train2017/, val2017/, "
                                 "annotations/person_keypoints_*2017.json")
    train_json: str | None = DATA(None, "any COCO-format keypoint json for training (with "
                                  "--train-images)")
    train_images: str | None = DATA(None, "image folder of --train-json")
    val_json: str | None = DATA(None, "COCO-format keypoint json to evaluate on (with "
                                "--val-images)")
    val_images: str | None = DATA(None, "image folder of --val-json")
    synthetic_json: str | None = DATA(None, "purely synthetic scenes from render_humans.py, images "
                                      "beside it in images/ (default: the demo's)")
    bank_json: str | None = DATA(None, "person bank from render_humans.py --kind bank (default: "
                                 "the demo's)")
    demo_dir: str = DATA("data/demo", "where the built-in demo benchmark is rendered and cached")
    demo_size: str = DATA("small", "small: quick first run; large: more images for experiments",
                          ("small", "large"))
    demo_val: str = DATA("standard", "the demo's val split: standard, or crowded (more people per "
                         "image, about 2400 in all: the claims protocol's, README)",
                         ("standard", "crowded"))
    max_val_images: int = EVALUATION(0, "evaluate on at most this many val images (0 = all)")
    train_subset: int = DATA(0, "train on the first N training images only (0 = all); subsets are "
                             "nested")
    skeleton: str = DATA("coco", "coco: COCO-17 + neck, COCO AP; mpii: the paper's OpenPose-MPI "
                         "parts, MPII multi-person mAP", ("coco", "mpii"),
                         jobs="--probe --bench --bench-targets --gpu-report predict")
    mpii_root: str | None = DATA(None, "MPII root: mpii_human_pose_v1_u12_1.mat (the official "
                                 "RELEASE) and images/ (implies --skeleton mpii)")
    # method
    synthetic_loss: str = METHOD("mask", "mask: pasted people are out of the loss (paper's best); "
                                 "include: supervised", ("mask", "include"))
    paste_mean: float = METHOD(4.0, "mean of the Poisson number of pasted people per augmented "
                               "image (paper code: 4)")
    paste_min: int = METHOD(2, "least number of pasted people per augmented image (paper code: 2)")
    # network
    arch: str = NETWORK("small", "openpose: VGG-19 + 6 CPM stages (paper); small: light backbone "
                        "for CPUs", ("small", "openpose"))
    stages: int = NETWORK(3, "number of prediction stages (paper: 6)")
    width: int = NETWORK(64, "channels of the small network's stages")
    pretrained: bool = NETWORK(False, "load torchvision's ImageNet VGG-19 weights (needs a "
                               "download or a cached file)")
    # geometry (paper preset: 368 input, stride 8, sigma 7, PAF half-width 8). The demo's sigma and
    # PAF width are 1.25 output cells, not the paper's 0.6 at this scale: the sparser target was
    # not picked up within minutes (README, design table).
    # --bench-targets times both presets' sizes, so it reads none of these five
    input_size: int = GEOMETRY(128, "training crop side in pixels (paper: 368)", jobs=STEPS)
    stride: int = GEOMETRY(4, "output stride of the network (paper: 8)", jobs=STEPS)
    sigma: float = GEOMETRY(5.0, "heatmap Gaussian sigma in input pixels (paper: 7 at 368)",
                            jobs=STEPS)
    paf_width: float = GEOMETRY(5.0, "half-width of a limb's PAF in input pixels (paper: 8 at 368)",
                                jobs=STEPS)
    # paper code: scale 1.25/person_scale, MPII scale = height/200
    person_fraction: float = GEOMETRY(250 / 368, "a crop's centre person is scaled to this "
                                      "fraction of the input height ...")
    scale_range: tuple[float, ...] = GEOMETRY((0.4, 1.6), "... times U(lo, hi) (paper code: 0.4 "
                                              "1.6)")
    max_rotation: float = GEOMETRY(40.0, "rotation augmentation U(-r, r) degrees (paper code: 40)")
    max_center_offset: float = GEOMETRY(49.0 * 128 / 368, "crop centre jitter in input pixels "
                                        "(paper code: 49 at 368)", jobs=STEPS)
    flip_prob: float = GEOMETRY(0.5, "horizontal flip probability, with left/right swap (paper "
                                "code: 0.5)")
    # optimisation
    batch_size: int = OPTIMISATION(16, "crops per step; mixed modes use half synthetic/augmented, "
                                   "half real", jobs=STEPS)
    real_share: float = OPTIMISATION(0.5, "share of real crops in a mixed mode's batch (paper "
                                     "code: 16 of 32); 0 with --mode synthetic trains on synthetic "
                                     "data only", jobs=STEPS)
    lr: float = OPTIMISATION(1e-3, "Adam learning rate (paper: 5e-5); a demo-preset fine-tune from "
                             "--init runs at a constant 5e-5 unless --lr or --lr-schedule is "
                             "given", jobs=STEPS)
    beta1: float = OPTIMISATION(0.9, "Adam beta1 (paper: 0.8)", jobs=STEPS)
    weight_decay: float = OPTIMISATION(0.0, "AdamW weight decay", jobs=STEPS)
    bn_stats: str = OPTIMISATION("update", "BatchNorm running statistics while training: update "
                                 "them, or keep those of --init (BatchNorm in eval mode; "
                                 "results/first-run)", ("update", "keep"))
    lr_schedule: str = OPTIMISATION("cosine", "cosine (demo, 100-step warm-up), step (paper: x "
                                    "lr_gamma every lr_step steps) or constant",
                                    ("cosine", "step", "constant"))
    lr_step: int = OPTIMISATION(20000, "steps between learning-rate drops for the step schedule")
    lr_gamma: float = OPTIMISATION(0.33, "factor of each learning-rate drop")
    # [ours] 60 steps: the first run's length, the same experiment on every machine
    # (results/first-run)
    steps: int = OPTIMISATION(60, "training steps (0: no training, only the evaluation of the "
                              "start)")
    minutes: float = OPTIMISATION(0.0, "also stop training after this many wall-clock minutes (0: "
                                  "steps only); the schedule then follows the time, so runs differ "
                                  "between machines")
    init: str | None = OPTIMISATION(
        "auto", "start from this checkpoint's weights (paper: a real-only student); auto: the "
        "shipped demo student on the demo data with its network, else none (from scratch); with "
        "--bench: time grouping on its maps", jobs="--probe --bench")
    # inference
    eval_height: int = INFERENCE(192, "val images are resized to this height at scale 1.0")
    eval_scales: tuple[float, ...] = INFERENCE((0.7, 1.0, 1.3), "inference scales (paper code: 0.7 "
                                               "1.0 1.3)")
    eval_flip: bool = INFERENCE(False, "also average the flipped image's maps")
    eval_steps: tuple[float, ...] = EVALUATION((), "also evaluate on val after these steps")
    eval_init: bool = EVALUATION(True, "evaluate the --init weights before training (prints AP "
                                 "before and after)")
    eval_minutes: tuple[float, ...] = EVALUATION((), "evaluate on val when the training time "
                                                 "crosses these minutes")
    # teacher
    teacher_attribute: str = TEACHER("min_dist", "person attribute binned for the teacher")
    teacher_arch: str = TEACHER(
        "small", "vgg19: the paper code's VGG-19 trunk and head (no BatchNorm, ReLU on the "
        "logits); small [ours]: 4 convolutions with BatchNorm, linear logits; small-nobn: the "
        "small trunk without BatchNorm under the paper's head", ("small", "small-nobn", "vgg19"))
    teacher_data: str = TEACHER("synthetic", "synthetic scenes or augmented real images as the "
                                "teacher's samples", ("synthetic", "augmented"))
    teacher_interval: int = TEACHER(20, "student steps between teacher decisions (paper code: 20)")
    bins: int = TEACHER(10, "number of bins of the teacher attribute (paper code: 10)")
    teacher_step: float = TEACHER(0.01, "soft-label step of the teacher's update (paper code: "
                                  "alpha = beta = 0.01); larger moves the teacher faster [ours]")
    teacher_update: str = TEACHER(
        "symmetric", "soft label when the student's loss fell: symmetric [ours] lowers the picked "
        "bin as a rise raises it; paper: as the paper's code runs it, the picked bin stays and "
        "only the others rise", ("symmetric", "paper"))
    teacher_bins: str = TEACHER(
        "ours", "bin edges of min_dist and camera_angle: ours puts the paper's first edge at bin "
        "0's lower end; paper: np.digitize on them as the paper's code does, so bin 0 holds only "
        "values below the first edge", ("ours", "paper"))
    teacher_lr: float = TEACHER(
        0.0, "the teacher's learning rate; 0: the student's at each step, as the paper's code (its "
        "teacher steps with the student's optimizer; the paper's lr: 5e-5)")
    teacher_uniform: bool = TEACHER(False, "baseline: same loop, uniform sampling over all "
                                    "synthetic samples", jobs="--gpu-report")
    teacher_stratified: bool = TEACHER(False, "control [ours]: same loop, each window's bin picked "
                                       "uniformly at random among the bins large enough to train "
                                       "on, no learning", jobs="--gpu-report")
    teacher_min_bin: int = TEACHER(32, "bins with at most this many samples are penalised and "
                                   "re-picked (paper code: 32)")
    # run
    seed: int = RUN(0, "seed for python, numpy and torch",
                    jobs="--probe --domain-gap --bench --gpu-report")
    out: str | None = RUN(
        None, "run folder (default runs/<mode>-<data>-s<seed>)",
        jobs="--probe --domain-gap --gpu-report --compare --export-student predict")
    resume: bool = RUN(False, "continue from the run folder's checkpoint", jobs="")
    ckpt: str | None = FILES(None, "checkpoint to evaluate (--mode eval), to predict with (--mode "
                             "predict) or to export (--export-onnx); predict and export default to "
                             "the shipped demo student", jobs="--domain-gap --export-onnx predict")
    input: str | None = FILES(None, "--mode predict: an image, a folder of images or a video file")
    onnx: str | None = FILES(None, "--mode predict through this ONNX model (from --export-onnx) in "
                             "onnxruntime instead of torch")
    ckpt_every: int = RUN(200, "steps between checkpoints")
    log_every: int = RUN(20, "steps between metric lines")
    workers: int = MACHINE(-1, "data loader processes (-1: 1 on CPU, 4 on CUDA); 0 builds batches "
                           "in the training process", jobs="--probe --bench")
    device: str = MACHINE("auto", "where to train", ("auto", "cpu", "cuda"))
    amp: bool = MACHINE(True, "bfloat16 mixed precision on CUDA and on CPUs with native bf16 "
                        "(AVX512-BF16/AMX)")
    threads: int = MACHINE(0, "torch CPU threads (0: torch's default)")
    compile: bool = MACHINE(False, "torch.compile the student for training (README, Speed: slower "
                            "on 2 CPU cores)", jobs="--probe --bench")


PRESETS: dict[str, dict] = {
    # The paper's student and schedule (paper code: Adam 5e-5, beta1 0.8, x0.33 every 20k steps,
    # batch 16 synthetic/mixed + 16 real, 368 input, stride 8, 6 stages).
    "paper": dict(arch="openpose", stages=6, input_size=368, stride=8, sigma=7.0, paf_width=8.0,
                  max_center_offset=49.0, batch_size=32, lr=5e-5, beta1=0.8, lr_schedule="step",
                  lr_step=20000, lr_gamma=0.33, steps=100000, minutes=0.0, eval_height=368,
                  teacher_arch="vgg19", ckpt_every=2000, log_every=100, demo_size="large"),
    "demo": {},  # the Config defaults
}


def check_config(cfg: Config) -> None:
    """Refuses settings that cannot run, before anything is read, rendered or written."""
    mixed = cfg.mode in ("synthetic", "augmented", "student-teacher")
    teacher = cfg.mode == "student-teacher"
    rules = [
        (cfg.batch_size >= (2 if mixed else 1), f"--batch-size must be at least {2 if mixed else 1}"
         + (" (half of it is real)" if mixed else "")),
        (cfg.steps >= 0, "--steps must be 0 or more"),
        (cfg.minutes >= 0, "--minutes must be 0 (steps only) or more"),
        (cfg.input_size > 0 and cfg.stride > 0 and cfg.input_size % cfg.stride == 0,
         "--input-size must be a positive multiple of --stride"),
        (cfg.stages >= 1 and cfg.width >= 1, "--stages and --width must be at least 1"),
        (cfg.lr > 0, "--lr must be positive"),
        (cfg.ckpt_every >= 1 and cfg.log_every >= 1,
         "--ckpt-every and --log-every must be at least 1"),
        (cfg.max_val_images >= 0, "--max-val-images must be 0 (all) or more"),
        (cfg.eval_height >= cfg.stride and all(s > 0 for s in cfg.eval_scales)
         and len(cfg.eval_scales) > 0,
         "--eval-height must be at least --stride and --eval-scales positive"),
        (len(cfg.scale_range) == 2 and 0 < cfg.scale_range[0] <= cfg.scale_range[1],
         "--scale-range takes two numbers 0 < lo <= hi"),
        (cfg.paste_min >= 0 and cfg.paste_mean >= 0,
         "--paste-min and --paste-mean must be 0 or more"),
        (0 <= cfg.real_share <= 1 and (not mixed or cfg.batch_size * (1 - cfg.real_share) >= 1),
         "--real-share must be in [0, 1] and leave at least one synthetic/augmented crop per "
         "batch"),
        (not teacher or cfg.batch_size * cfg.real_share >= 1,
         "the student-teacher needs real crops in its batches (--real-share > 0): the teacher "
         "sees them"),
        (cfg.train_subset >= 0, "--train-subset must be 0 (all) or more"),
        (not teacher or cfg.bins >= 2, "--bins must be at least 2 for the student-teacher"),
        (not teacher or cfg.teacher_interval >= 1, "--teacher-interval must be at least 1"),
        (not (cfg.teacher_uniform and cfg.teacher_stratified),
         "give --teacher-uniform or --teacher-stratified, not both"),
        (cfg.teacher_lr >= 0, "--teacher-lr must be 0 (the student's) or positive"),
        (not teacher or cfg.teacher_bins == "ours" or (
            cfg.teacher_data == "synthetic" and cfg.teacher_attribute in PAPER_BIN_EDGES),
         f"--teacher-bins paper has the paper code's edges for {' and '.join(PAPER_BIN_EDGES)} of "
         "synthetic scenes only: use --teacher-bins ours"),
        (not cfg.mpii_root or cfg.skeleton == "mpii", "--mpii-root needs --skeleton mpii"),
        (cfg.mode != "predict" or cfg.input,
         "--mode predict needs --input PATH (an image, a folder of images or a video)"),
        (not cfg.onnx or cfg.mode == "predict",
         "--onnx is for --mode predict (make the model with --export-onnx)"),
        (not (cfg.onnx and cfg.ckpt),
         "give --onnx or --ckpt, not both: --onnx runs the model exported from one"),
        (cfg.threads >= 0 and cfg.workers >= -1,
         "--threads must be 0 (torch's default) or more, --workers -1 (auto) or more"),
        (not (cfg.mpii_root and (cfg.coco_root or cfg.train_json or cfg.val_json)),
         "give either --mpii-root or COCO-format data (--coco-root, --train-json, --val-json), "
         "not both"),
    ]
    for ok, message in rules:
        if not ok:
            raise ReproError(message)


class ReproError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Skeletons: one table each (COCO as OpenPose, MPII as the paper's OpenPose-MPI model)
# ----------------------------------------------------------------------------------------------

def mirror(name: str) -> str:
    return name.replace("left", "@").replace("right", "left").replace("@", "right")


class Skeleton:
    """A dataset's joints (the json's keypoint order), the network's parts (heatmap channels, the
    background follows) and limbs (PAF channels, x and y each), and the maps between them. Every
    step that depends on the parts reads this table; nothing else names a part. Its `benchmark`
    is what differs in the evaluation."""

    def __init__(self, name: str, num_joints: int, parts: dict[str, tuple[int, int]],
                 limbs: list[tuple[str, str]], min_centre_keypoints: int, never_start: int = 0):
        self.name, self.num_joints, self.parts = name, num_joints, tuple(parts)
        # (K, 2): a part is the midpoint of two joints
        self.from_joints = np.array(list(parts.values()))
        index = {n: i for i, n in enumerate(parts)}
        self.limbs = np.array([(index[a], index[b]) for a, b in limbs])  # (L, 2)
        self.num_parts, self.num_limbs = len(parts), len(limbs)
        self.num_heat, self.num_paf = self.num_parts + 1, 2 * self.num_limbs
        self.flip_parts = np.array([index[mirror(n)] for n in parts])
        # A flipped limb (a, b) is the limb (flip a, flip b); its PAF's x component changes sign.
        pairs = [tuple(limb) for limb in self.limbs.tolist()]
        self.flip_limbs = np.array([pairs.index((self.flip_parts[a], self.flip_parts[b]))
                                    for a, b in pairs])
        # labelled parts
        self.joint_parts = np.nonzero(self.from_joints[:, 0] == self.from_joints[:, 1])[0]
        self.min_centre_keypoints, self.never_start = min_centre_keypoints, never_start

    def to_parts(self, joints: np.ndarray) -> np.ndarray:
        """(..., J, 3) dataset joints -> (..., K, 3) parts; a midpoint part is labelled when both
        of its joints are, with the lower visibility of the two."""
        pair = joints[..., self.from_joints, :].astype(np.float32)  # (..., K, 2, 3)
        out = np.empty(joints.shape[:-2] + (self.num_parts, 3), np.float32)
        out[..., :2] = pair[..., :2].mean(-2)
        labelled = (pair[..., 0, 2] > 0) & (pair[..., 1, 2] > 0)
        out[..., 2] = np.where(labelled, np.minimum(pair[..., 0, 2], pair[..., 1, 2]), 0)
        return out

    def to_joints(self, parts: np.ndarray) -> np.ndarray:
        """(..., K, C) parts -> (..., J, C) dataset joints; joints no part copies (MPII's thorax and
        pelvis, which are not scored) are all zeros."""
        out = np.zeros(parts.shape[:-2] + (self.num_joints, parts.shape[-1]), parts.dtype)
        out[..., self.from_joints[self.joint_parts, 0], :] = parts[..., self.joint_parts, :]
        return out

    @property
    def benchmark(self) -> CocoBenchmark:
        """The interface is CocoBenchmark, in Part I; MPII's file formats and scoring are Part II's,
        looked up when first asked for, so the skeleton is whole from its construction."""
        return {"coco": CocoBenchmark, "mpii": MpiiBenchmark}[self.name]()


# COCO-17 + neck = shoulder midpoint: 18 parts, 19 limbs = 38 PAF channels (OpenPose)
COCO = Skeleton(
    "coco", 17, {n: (i, i) for i, n in enumerate(rh.COCO_KEYPOINT_NAMES)} | {"neck": (5, 6)},
    [("neck", "right_shoulder"), ("neck", "left_shoulder"), ("right_shoulder", "right_elbow"),
     ("right_elbow", "right_wrist"), ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
     ("neck", "right_hip"), ("right_hip", "right_knee"), ("right_knee", "right_ankle"),
     ("neck", "left_hip"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
     ("neck", "nose"), ("nose", "right_eye"), ("right_eye", "right_ear"), ("nose", "left_eye"),
     ("left_eye", "left_ear"), ("right_shoulder", "right_ear"), ("left_shoulder", "left_ear")],
    min_centre_keypoints=5,  # OpenPose COCO: people with >= 5 keypoints are crop centres
    never_start=2)  # OpenPose COCO: the ear-shoulder limbs never start a person


MPII = Skeleton(  # paper code (OpenPose's MPI model): 15 parts, 14 limbs = 28 PAF channels
    # MPII joint ids: 0 r ankle ... 5 l ankle, 6 pelvis, 7 thorax, 8 upper neck, 9 head top, ...
    "mpii", 16,
    {"head_top": (9, 9), "upper_neck": (8, 8), "right_shoulder": (12, 12), "right_elbow": (11, 11),
     "right_wrist": (10, 10), "left_shoulder": (13, 13), "left_elbow": (14, 14),
     "left_wrist": (15, 15), "right_hip": (2, 2), "right_knee": (1, 1), "right_ankle": (0, 0),
     "left_hip": (3, 3), "left_knee": (4, 4),
     "left_ankle": (5, 5), "centre": (7, 6)},  # paper code: centre = mean of thorax and pelvis
    [("head_top", "upper_neck"), ("upper_neck", "right_shoulder"),
     ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
     ("upper_neck", "left_shoulder"), ("left_shoulder", "left_elbow"),
     ("left_elbow", "left_wrist"), ("upper_neck", "centre"),
     ("centre", "right_hip"), ("right_hip", "right_knee"), ("right_knee", "right_ankle"),
     ("centre", "left_hip"), ("left_hip", "left_knee"), ("left_knee", "left_ankle")],
    min_centre_keypoints=1)  # paper code: one training sample per annotated MPII person


SKELETONS = {s.name: s for s in (COCO, MPII)}


def skeleton(cfg: Config) -> Skeleton:
    return SKELETONS[cfg.skeleton]


# ----------------------------------------------------------------------------------------------
# Datasets: COCO-format json + images (real, stand-in, synthetic scenes, person bank)
# ----------------------------------------------------------------------------------------------

# Per-person attributes render_humans.py writes for the teacher's bins
# (paper code: minDist, camera_angle, ...)
ATTRIBUTES = ("min_dist", "camera_angle", "visibility_ratio", "truncation", "scale", "num_people")


@dataclass
class ImageRecord:
    image_id: int
    path: Path
    width: int
    height: int
    # (P, K, 3) the skeleton's parts in image pixels, v: 0 unlabelled, 1 occluded, 2 visible
    keypoints: np.ndarray
    boxes: np.ndarray  # (P, 4) x, y, w, h
    attributes: dict[str, np.ndarray]  # per person, e.g. min_dist, camera_angle (synthetic data)
    ignore_rles: list = field(default_factory=list)  # crowd regions, people without keypoints


@dataclass
class KeypointSet:
    """A keypoint dataset: one record per image (per group for MPII validation), its skeleton, and
    what its evaluation needs: the COCO json, or the MPII ground-truth groups."""
    json_path: Path | None
    records: list[ImageRecord]
    skeleton: Skeleton = COCO
    groups: list[Group] | None = None  # MPII: the ground truth of each record, head boxes included
    images: dict[int, np.ndarray] | None = None  # decoded images, when the set fits in memory

    def image(self, index: int) -> np.ndarray:
        rec = self.records[index]
        if self.images is not None and rec.image_id in self.images:
            return self.images[rec.image_id]
        return read_image(rec.path,
                          cv2.IMREAD_UNCHANGED if rec.path.suffix == ".png" else cv2.IMREAD_COLOR)

    def preload(self, max_pixels: float = 4e8) -> None:
        """Decode everything once when it fits in memory (the demo sets, person banks)."""
        if sum(r.width * r.height for r in self.records) <= max_pixels:
            self.images = {r.image_id: self.image(i) for i, r in enumerate(self.records)}

    def centre_people(self) -> np.ndarray:
        """(N, 2) (record, person) pairs that may be a crop's centre person."""
        sk = self.skeleton
        pairs = [(i, p) for i, r in enumerate(self.records) for p in range(len(r.keypoints))
                 if (r.keypoints[p, sk.joint_parts, 2] > 0).sum() >= sk.min_centre_keypoints]
        return np.array(pairs, np.int64).reshape(-1, 2)


def read_image(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    if not path.is_file():
        raise ReproError(f"image not found: {path} (check the images folder given with the json)")
    img = cv2.imread(str(path), flags)
    if img is None:
        raise ReproError(f"cannot decode image {path}: the file is corrupt or not an image; "
                         "replace it or remove it from the json")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return img


def load_keypoint_set(json_path: str | Path, images_dir: str | Path,
                      sk: Skeleton = COCO) -> KeypointSet:
    """Loads any COCO-format person-keypoint json with pycocotools; its keypoints are the skeleton's
    joints (COCO's 17, or MPII's 16 as render_humans.py --skeleton mpii writes them)."""
    from pycocotools.coco import COCO

    json_path, images_dir = Path(json_path), Path(images_dir)
    if not json_path.is_file():
        raise ReproError(f"annotation file not found: {json_path}")
    if not images_dir.is_dir():
        raise ReproError(f"image folder not found: {images_dir}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(json_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if json_path.suffix.lower() == ".mat":
            raise ReproError(f"{json_path} is a Matlab .mat file, not COCO json: an MPII "
                             "annotation list is read with --skeleton mpii") from None
        raise ReproError(f"{json_path} is not valid json ({e}); "
                         "re-download or re-render it") from None
    except (KeyError, TypeError, AssertionError) as e:
        raise ReproError(f"{json_path} is not a COCO-format annotation file "
                         f"(missing {e})") from None
    anns = coco.dataset.get("annotations", [])
    if not anns or not any("keypoints" in a for a in anns):
        raise ReproError(f"{json_path} has no person keypoints: expected COCO-format person "
                         f"keypoint annotations with {sk.num_joints} (x, y, v) keypoints each")
    records = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        people, boxes, ignore, attrs = [], [], [], {}
        for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            kp = np.asarray(a.get("keypoints", []), np.float32)
            if a.get("iscrowd", 0) or a.get("num_keypoints",
                                            int((kp[2::3] > 0).sum()) if kp.size else 0) == 0:
                if a.get("segmentation"):
                    ignore.append(coco.annToRLE(a))
                continue
            if kp.size != 3 * sk.num_joints:
                other = next((s.name for s in SKELETONS.values() if 3 * s.num_joints == kp.size),
                             None)
                hint = f" (that is --skeleton {other})" if other else ""
                raise ReproError(f"{json_path}: annotation {a.get('id')} has {kp.size // 3} "
                                 f"keypoints{hint}, expected {sk.name.upper()}'s {sk.num_joints} "
                                 f"({3 * sk.num_joints} numbers)")
            people.append(kp.reshape(sk.num_joints, 3))
            boxes.append(a.get("bbox", keypoint_box(people[-1])))
            for key in ATTRIBUTES:
                attrs.setdefault(key, []).append(float(a.get(key, np.nan)))
        records.append(ImageRecord(
            image_id=image_id, path=images_dir / info["file_name"], width=int(info["width"]),
            height=int(info["height"]),
            keypoints=sk.to_parts(np.array(people, np.float32).reshape(-1, sk.num_joints, 3)),
            boxes=np.array(boxes, np.float32).reshape(-1, 4),
            attributes={k: np.array(v, np.float32) for k, v in attrs.items()}, ignore_rles=ignore))
    return KeypointSet(json_path, records, sk)


def keypoint_box(kp: np.ndarray) -> list[float]:
    pts = kp[kp[:, 2] > 0, :2]
    if len(pts) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    lo, hi = pts.min(0), pts.max(0)
    return [float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])]


def ignore_mask(rec: ImageRecord) -> np.ndarray:
    """The image's ignore mask (OpenPose: mask_miss): uint8 (H, W), 0 in crowd regions and on people
    without keypoints (their loss is switched off), 255 elsewhere."""
    from pycocotools import mask as mask_utils

    mask = np.full((rec.height, rec.width), 255, np.uint8)
    for rle in rec.ignore_rles:
        mask[mask_utils.decode(rle).astype(bool)] = 0
    return mask


@dataclass
class Data:
    train: KeypointSet
    val: KeypointSet
    synthetic: KeypointSet | None
    bank: KeypointSet | None
    name: str  # "demo" or "coco"/the json's name: labels every result


# The demo benchmark: a stand-in for real photos (train/val, disjoint seeds) and the synthetic
# data, all rendered by render_humans.py.  Sizes chosen so a first run renders in a few minutes.
DEMO_VERSION = 2  # bump when the renderer's output changes: the cache is kept per version


DEMO_SIZES = {
    "small": dict(standin_train=1000, standin_val=150, synthetic=500, bank=500),
    "large": dict(standin_train=2000, standin_val=200, synthetic=1000, bank=800),
}


DEMO_STANDIN = dict(style="standin", image_size=256, mean_people=2.5, min_people=1,
                    camera_distance=(6.0, 0.5))


DEMO_SYNTHETIC = dict(style="synthetic", image_size=320, mean_people=5.0, min_people=2,
                      camera_distance=(7.0, 0.5))


DEMO_BANK = dict(style="synthetic", image_size=160)


# [ours] the claims protocol's val split: enough people that sampling noise sits under the effects
# (about 2400), and more of them per image, so that the heavy-occlusion bin is populated
DEMO_CROWDED_VAL = dict(kind="scenes", num_images=800, seed=5000,
                        **(DEMO_STANDIN | dict(mean_people=3.0)))


def build_demo(cfg: Config) -> dict[str, Path]:
    """Renders the demo benchmark on first use; later calls find the cache and return at once."""
    sizes = DEMO_SIZES[cfg.demo_size]
    # the MPII demo: the same scenes, labelled with MPII's 16 joints, in a cache of its own
    labels = {} if cfg.skeleton == "coco" else dict(skeleton=cfg.skeleton)
    root = Path(cfg.demo_dir) / (f"v{DEMO_VERSION}-{cfg.demo_size}"
                                 + ("" if not labels else f"-{cfg.skeleton}"))
    jobs = {
        "train": dict(kind="scenes", num_images=sizes["standin_train"], seed=1000, **DEMO_STANDIN),
        "val": dict(kind="scenes", num_images=sizes["standin_val"], seed=2000, **DEMO_STANDIN)
        if cfg.demo_val == "standard" else DEMO_CROWDED_VAL,
        "synthetic": dict(kind="scenes", num_images=sizes["synthetic"], seed=3000,
                          **DEMO_SYNTHETIC),
        "bank": dict(kind="bank", num_images=sizes["bank"], seed=4000, **DEMO_BANK),
    }
    paths = {}
    for name, job in jobs.items():
        out = root / (name if name != "val" or cfg.demo_val == "standard"
                      else f"val-{cfg.demo_val}")
        if not (out / "annotations.json").is_file():
            print(f"rendering the demo benchmark's {name} split into {out} (first use only)")
        paths[name] = Path(rh.render_dataset(out, progress=True, **job, **labels))
    return paths


def real_data_paths(cfg: Config) -> dict[str, str | None]:
    """--train-json/--train-images/--val-json/--val-images, filled in from --coco-root's layout."""
    paths = {k: getattr(cfg, k) for k in ("train_json", "train_images", "val_json", "val_images")}
    if cfg.coco_root:
        root = Path(cfg.coco_root)
        if not root.is_dir():
            raise ReproError(f"--coco-root {root} does not exist; expected train2017/, val2017/ "
                             "and annotations/person_keypoints_{train,val}2017.json inside")
        layout = dict(train_json="annotations/person_keypoints_train2017.json",
                      train_images="train2017",
                      val_json="annotations/person_keypoints_val2017.json", val_images="val2017")
        paths = {k: v or str(root / layout[k]) for k, v in paths.items()}
    return paths


def load_data(cfg: Config) -> Data:
    sk = skeleton(cfg)
    paths = real_data_paths(cfg)
    real = bool(paths["train_json"] or paths["val_json"] or cfg.mpii_root)
    if cfg.data == "coco" and not real:
        raise ReproError("--data coco needs --coco-root DIR or "
                         "--train-json/--train-images/--val-json/--val-images")
    needs_synthetic = cfg.mode in ("synthetic", "augmented", "student-teacher")
    demo = None
    if not real or (needs_synthetic and not (cfg.synthetic_json and cfg.bank_json)):
        demo = build_demo(cfg)
    if cfg.mpii_root:
        train, val = sk.benchmark.load_root(Path(cfg.mpii_root))
        name = "mpii"
    elif real:
        needed = ("val_json", "val_images") + (("train_json", "train_images")
                                               if cfg.mode != "eval" else ())
        for flag in needed:
            if not paths[flag]:
                raise ReproError(f"{config_flag(flag)} is missing (or give --coco-root)")
        train = (load_keypoint_set(paths["train_json"], paths["train_images"], sk)
                 if cfg.mode != "eval" else None)
        val = sk.benchmark.load_val(paths["val_json"], paths["val_images"], sk)
        name = "coco" if cfg.coco_root else Path(paths["val_json"]).stem
    else:
        train = load_keypoint_set(demo["train"], demo["train"].parent / "images", sk)
        val = load_keypoint_set(demo["val"], demo["val"].parent / "images", sk)
        name = "demo" if sk is COCO else f"demo-{sk.name}"
    syn_json = Path(cfg.synthetic_json) if cfg.synthetic_json else demo and demo["synthetic"]
    bank_json = Path(cfg.bank_json) if cfg.bank_json else demo and demo["bank"]
    synthetic = load_keypoint_set(syn_json, syn_json.parent / "images", sk) if syn_json else None
    bank = load_keypoint_set(bank_json, bank_json.parent / "images", sk) if bank_json else None
    if train is not None and cfg.train_subset:
        # the first N: smaller subsets are nested in larger
        train.records = train.records[:cfg.train_subset]
    for s in (bank, train, val, synthetic):
        if s is not None:
            s.preload()
    return Data(train, val, synthetic, bank, name)


# ----------------------------------------------------------------------------------------------
# Person-centric crops and compositing (numpy + cv2; one affine warp per crop)
# ----------------------------------------------------------------------------------------------

@dataclass
class Sample:
    image: np.ndarray  # (S, S, 3) uint8 BGR crop
    keypoints: np.ndarray  # (P, 18, 3) the image's own people, crop pixels
    pasted: np.ndarray  # (Q, 18, 3) pasted synthetic people: make_targets decides their loss
    # (S, S) uint8 the crop's ignore mask: 0 where the loss is off, 255 elsewhere
    ignore: np.ndarray


def crop_affine(centre: np.ndarray, person_height: float, cfg: Config,
                rng: np.random.Generator | None):
    """2x3 matrix from image to crop pixels and whether it flips; rng None = no augmentation."""
    size = cfg.input_size
    scale = cfg.person_fraction * size / max(person_height, 1.0)
    angle, offset, flip = 0.0, np.zeros(2), False
    if rng is not None:
        scale *= rng.uniform(*cfg.scale_range)
        angle = math.radians(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
        offset = rng.uniform(-1, 1, 2) * cfg.max_center_offset
        flip = bool(rng.random() < cfg.flip_prob)
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    linear = np.array([[c, s], [-s, c]])
    shift = (size - 1) / 2 + offset - linear @ centre
    if flip:
        linear, shift = linear * [[-1], [1]], shift * [-1, 1] + [size - 1, 0]
    return np.hstack([linear, shift[:, None]]).astype(np.float32), flip


def transform_keypoints(keypoints: np.ndarray, affine: np.ndarray,
                        flip_parts: np.ndarray | None) -> np.ndarray:
    """(..., K, 3) through a 2x3 affine; a mirroring affine also swaps left and right parts."""
    out = keypoints.copy()
    out[..., :2] = keypoints[..., :2] @ affine[:, :2].T + affine[:, 2]
    return out[..., flip_parts, :] if flip_parts is not None else out


def crop_person(image: np.ndarray, ignore: np.ndarray | None, rec: ImageRecord, person: int,
                cfg: Config, rng: np.random.Generator | None) -> Sample:
    box = rec.boxes[person]
    centre = np.array([box[0] + box[2] / 2, box[1] + box[3] / 2])
    affine, flip = crop_affine(centre, box[3], cfg, rng)
    size = (cfg.input_size, cfg.input_size)
    crop = cv2.warpAffine(image, affine, size, flags=cv2.INTER_LINEAR, borderValue=(128, 128, 128))
    # Padding counts as background (OpenPose warps its ignore mask with border 255).
    crop_ignore = (np.full(size, 255, np.uint8) if ignore is None else
                   cv2.warpAffine(ignore, affine, size, flags=cv2.INTER_NEAREST, borderValue=255))
    sk = skeleton(cfg)
    no_one = np.zeros((0, sk.num_parts, 3), np.float32)
    keypoints = transform_keypoints(rec.keypoints, affine, sk.flip_parts if flip else None)
    return Sample(crop, keypoints, no_one, crop_ignore)


def covered(keypoints: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(..., 18) bool: keypoint inside the crop and under a pasted person's opaque pixels."""
    h, w = alpha.shape
    xy = np.round(keypoints[..., :2]).astype(np.int64)
    inside = (xy[..., 0] >= 0) & (xy[..., 0] < w) & (xy[..., 1] >= 0) & (xy[..., 1] < h)
    hit = np.zeros(keypoints.shape[:-1], bool)
    hit[inside] = alpha[xy[..., 1][inside], xy[..., 0][inside]] > 0.5
    return hit


def paste_centres(n: int, size: int, rng: np.random.Generator,
                  near: tuple[float, float] | None) -> np.ndarray:
    """Where pasted people go: anywhere in the crop; with `near` = (lo, hi), the nearest one to the
    crop's centre person lies at a distance in [lo, hi) and the others no nearer."""
    if near is None:
        return rng.uniform(0, size, (n, 2))
    middle = np.full(2, (size - 1) / 2)
    first = rng.uniform(*near)
    angle = rng.uniform(0, 2 * np.pi, n)
    dist = np.concatenate([[first], rng.uniform(first, max(first, size / 2) * 1.5, n - 1)])
    return middle + dist[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)


def paste_people(sample: Sample, bank: KeypointSet, cfg: Config, rng: np.random.Generator,
                 near: tuple[float, float] | None = None) -> Sample:
    """Pastes Poisson(paste_mean) (>= paste_min) bank people in front of a real crop.

    Real joints they cover become occluded (v=1) and stay supervised (paper code). Pasting happens
    in crop space, at the real people's scale distribution and anywhere in the crop (README).
    Whether the pasted people are in the loss is decided with the targets (make_targets)."""
    size = cfg.input_size
    image = sample.image.astype(np.float32)
    keypoints, pasted = sample.keypoints.copy(), []
    count = max(cfg.paste_min, int(rng.poisson(cfg.paste_mean)))
    for centre in paste_centres(count, size, rng, near):
        j = int(rng.integers(len(bank.records)))
        rgba, kp = bank.image(j), bank.records[j].keypoints[0]
        height = cfg.person_fraction * size * rng.uniform(*cfg.scale_range)
        s = height / rgba.shape[0]
        flip = bool(rng.random() < 0.5)
        linear = np.diag([-s if flip else s, s])
        shift = centre - linear @ (np.array(rgba.shape[1::-1]) - 1) / 2
        affine = np.hstack([linear, shift[:, None]]).astype(np.float32)
        # Resample premultiplied colour, or the person's edge blends towards black (a dark halo).
        premultiplied = rgba.astype(np.float32)
        premultiplied[..., :3] *= premultiplied[..., 3:] / 255
        layer = cv2.warpAffine(premultiplied, affine, (size, size), flags=cv2.INTER_LINEAR,
                               borderValue=(0, 0, 0, 0))
        alpha = layer[..., 3:] / 255
        image = image * (1 - alpha) + layer[..., :3]
        hidden = covered(keypoints, alpha[..., 0]) & (keypoints[..., 2] == 2)
        keypoints[..., 2][hidden] = 1
        for p in pasted:
            p[..., 2][covered(p, alpha[..., 0]) & (p[..., 2] == 2)] = 1
        pasted.append(transform_keypoints(kp[None], affine,
                                          bank.skeleton.flip_parts if flip else None)[0])
    pasted = np.array(pasted, np.float32).reshape(-1, keypoints.shape[1], 3)
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    return Sample(image, keypoints, pasted, sample.ignore)


# ----------------------------------------------------------------------------------------------
# Targets and loss masks (torch, vectorised over the grid cells near each joint and limb)
# ----------------------------------------------------------------------------------------------

def grids(size: int | tuple[int, int], stride: int,
          device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-pixel centres of the output cells along y and x."""
    h, w = (size, size) if isinstance(size, int) else size
    # paper code (OpenPose): output cell i sits on input pixel i*stride + (stride-1)/2
    def centres(n):
        return (torch.arange(n // stride, device=device, dtype=torch.float32) * stride
                + (stride - 1) / 2)
    return centres(h), centres(w)


def box_cells(lo: torch.Tensor, hi: torch.Tensor, gy: torch.Tensor, gx: torch.Tensor, stride: int):
    """(N, 2) boxes [lo, hi] in input pixels, (x, y) -> the (instance, row, column) of every cell
    whose centre lies in a box, as three (M,) tensors."""
    offset, last_cell = (stride - 1) / 2, torch.tensor([len(gx) - 1, len(gy) - 1], device=lo.device)
    first = torch.ceil((lo - offset) / stride).clamp(0, 1e9).long()
    last = torch.floor((hi - offset) / stride).clamp(-1, 1e9).long().minimum(last_cell)
    shape = (last - first + 1).clamp(min=0)
    area = shape[:, 0] * shape[:, 1]
    inst = torch.repeat_interleave(torch.arange(len(area), device=lo.device), area)
    k = torch.arange(len(inst), device=lo.device) - (torch.cumsum(area, 0) - area)[inst]
    cols, start = shape[inst, 0], first[inst]
    return inst, start[:, 1] + torch.div(k, cols, rounding_mode="floor"), start[:, 0] + k % cols


def heatmap_targets(keypoints: torch.Tensor, size: int | tuple[int, int], stride: int,
                    sigma: float) -> torch.Tensor:
    """(B, P, 18, 3) -> (B, 19, H, W): Gaussians merged by max; the last channel is background.

    size: the input's side, or its (height, width); the grid is size // stride."""
    gy, gx = grids(size, stride, keypoints.device)
    B, K, H, W = keypoints.shape[0], keypoints.shape[2], len(gy), len(gx)
    b, _, j = torch.nonzero(keypoints[..., 2] > 0, as_tuple=True)
    xy = keypoints[..., :2][keypoints[..., 2] > 0]  # (N, 2) labelled joints
    # Only a window of cells around each joint is computed: beyond sqrt(2 ln 100) sigma the
    # Gaussian is below the paper code's 0.01 cut, so every other cell is 0 as in a dense map.
    reach = sigma * math.sqrt(2 * math.log(100))

    def window(coord, g):  # (N,) -> (N, n) cells, n fixed; shifted inside the grid, still covering
        n = min(len(g), int(2 * reach / stride) + 3)
        first = torch.floor((coord - reach - (stride - 1) / 2) / stride).clamp(0, len(g) - n).long()
        return first[:, None] + torch.arange(n, device=coord.device)

    iy, ix = window(xy[:, 1], gy), window(xy[:, 0], gx)
    # The Gaussian is separable: two 1-D profiles and one outer product, no 2-D exp.
    along_x = torch.exp(-(gx[ix] - xy[:, 0, None]) ** 2 / (2 * sigma ** 2))  # (N, nx)
    along_y = torch.exp(-(gy[iy] - xy[:, 1, None]) ** 2 / (2 * sigma ** 2))  # (N, ny)
    heat = along_y[:, :, None] * along_x[:, None, :]
    heat = torch.where(heat >= 0.01, heat, 0.0)  # paper code: truncated below 0.01
    maps = keypoints.new_zeros(B, K + 1, H, W)
    cell = ((b * (K + 1) + j)[:, None, None] * H + iy[:, :, None]) * W + ix[:, None, :]
    maps.view(-1).scatter_reduce_(0, cell.flatten(), heat.flatten(), "amax")  # people merged by max
    maps[:, K] = 1 - maps[:, :K].amax(1)
    return maps


def paf_targets(keypoints: torch.Tensor, size: int | tuple[int, int], stride: int,
                width: float, limbs: np.ndarray) -> torch.Tensor:
    """(B, P, K, 3) -> (B, 2L, H, W): unit vectors of the (L, 2) limbs within `width` px, averaged
    over people."""
    gy, gx = grids(size, stride, keypoints.device)
    B, L, H, W = keypoints.shape[0], len(limbs), len(gy), len(gx)
    a, b = keypoints[:, :, limbs[:, 0]], keypoints[:, :, limbs[:, 1]]  # (B, P, L, 3)
    d = b[..., :2] - a[..., :2]
    length = torch.sqrt((d ** 2).sum(-1))
    valid = (a[..., 2] > 0) & (b[..., 2] > 0) & (length > 1e-3)
    ib, _, il = torch.nonzero(valid, as_tuple=True)
    # (N, ...) drawn limbs
    a, b, d, length = a[..., :2][valid], b[..., :2][valid], d[valid], length[valid]
    u = d / length.clamp(min=1e-3)[:, None]
    # Only the cells of each limb's bounding box are tested: the field reaches `width` along and
    # across the limb, so width * (|ux| + |uy|) in x and y beyond its joints; the 0.01 px margin
    # [ours] is far above float rounding, so no cell the exact test keeps is dropped.
    reach = width * u.abs().sum(1, keepdim=True) + 0.01
    inst, iy, ix = box_cells(torch.minimum(a, b) - reach, torch.maximum(a, b) + reach, gy, gx,
                             stride)
    # (M, 5): one gather of what each cell's test needs
    per = torch.cat([a, u, length[:, None]], 1)[inst]
    rx, ry, ux, uy = gx[ix] - per[:, 0], gy[iy] - per[:, 1], per[:, 2], per[:, 3]
    along = rx * ux + ry * uy
    across = (rx * uy - ry * ux).abs()
    # Like OpenPose's bounding box, the field reaches `width` past both joints, so that short
    # limbs (eye-ear) still hold enough samples for the line integral.
    inside = (along >= -width) & (along <= per[:, 4] + width) & (across <= width)
    inst, cell = inst[inside], ((ib * L + il)[inst] * H + iy) * W + ix
    cell = cell[inside]  # flat (b, l, y, x) of each covered cell, once per person covering it
    count = keypoints.new_zeros(B * L * H * W).index_add_(
        0, cell, torch.ones_like(cell, dtype=keypoints.dtype))
    maps = keypoints.new_zeros(B, L, 2, H * W)  # channel 2l + c is limb l's x (c = 0) or y (c = 1)
    flat = maps.view(-1)
    x_at = cell // (H * W) * (2 * H * W) + cell % (H * W)
    flat.index_add_(0, torch.cat([x_at, x_at + H * W]), torch.cat([u[inst, 0], u[inst, 1]]))
    n = count[cell]
    flat[x_at], flat[x_at + H * W] = flat[x_at] / n, flat[x_at + H * W] / n  # averaged over people
    return maps.reshape(B, 2 * L, H, W)


def flip_maps(maps: torch.Tensor, sk: Skeleton) -> torch.Tensor:
    """Mirror (B, PAF + heat, H, W) maps: swap left/right channels, negate PAF x."""
    paf, heat = maps[:, :sk.num_paf].flip(-1), maps[:, sk.num_paf:].flip(-1)
    paf = paf.reshape(paf.shape[0], sk.num_limbs, 2, *paf.shape[2:])[:, sk.flip_limbs]
    paf = paf * torch.tensor([-1.0, 1.0], device=maps.device)[None, None, :, None, None]
    heat = heat[:, list(sk.flip_parts) + [sk.num_parts]]
    return torch.cat([paf.flatten(1, 2), heat], 1)


# The paper's rule for pasted people, in one place. "In the loss": their targets are drawn like
# anyone's. "Not in the loss" (paper code: volumetricMask): targets as usual, but the loss is
# zeroed, per channel, where their own heatmap or PAF magnitude exceeds this.
PASTED_MASK_THRESHOLD = 0.25


def people_in_targets(keypoints: torch.Tensor, pasted: torch.Tensor, cfg: Config) -> torch.Tensor:
    """(B, P, 18, 3) image people + (B, Q, 18, 3) pasted people
    -> the people whose targets are drawn."""
    return torch.cat([keypoints, pasted], 1) if cfg.synthetic_loss == "include" else keypoints


def volumetric_mask(pasted: torch.Tensor, cfg: Config) -> torch.Tensor:
    """(B, PAF + heat, H, W) bool:
    False where a pasted person's own heatmap / PAF magnitude > 0.25."""
    size, stride, sk = cfg.input_size, cfg.stride, skeleton(cfg)
    heat = heatmap_targets(pasted, size, stride, cfg.sigma)[:, :sk.num_parts]
    paf = paf_targets(pasted, size, stride, cfg.paf_width, sk.limbs)
    paf_mag2 = paf[:, 0::2] ** 2 + paf[:, 1::2] ** 2  # (B, L, H, W) squared limb magnitude
    return torch.cat([(paf_mag2 <= PASTED_MASK_THRESHOLD ** 2).repeat_interleave(2, 1),
                      heat <= PASTED_MASK_THRESHOLD,
                      # background: the same rule on the pasted people's parts; the paper code's
                      # background mask is broken (README, "What the paper's code does") [ours]
                      heat.amax(1, keepdim=True) <= PASTED_MASK_THRESHOLD], 1)


class Targets(NamedTuple):
    people: torch.Tensor  # (B, P', K, 3) the people whose targets are drawn (people_in_targets)
    target: torch.Tensor  # (B, PAF + heat, h, w) in network output order (COCO: 38 PAF, 19 heat)
    loss_mask: torch.Tensor  # (B, PAF + heat, h, w) the loss mask M


def make_targets(keypoints: torch.Tensor, pasted: torch.Tensor, ignore: torch.Tensor,
                 cfg: Config) -> Targets:
    """Targets and the loss mask M of a batch of crops, with the pasted people in or out of the
    loss by --synthetic-loss (decided here, once per batch).

    keypoints: (B, P, K, 3) the crops' own people; pasted: (B, Q, K, 3); ignore: (B, S, S) uint8
    ignore masks of the crops."""
    size, stride, sk = cfg.input_size, cfg.stride, skeleton(cfg)
    people = people_in_targets(keypoints, pasted, cfg)
    target = torch.cat([paf_targets(people, size, stride, cfg.paf_width, sk.limbs),
                        heatmap_targets(people, size, stride, cfg.sigma)], 1)
    mask = F.adaptive_avg_pool2d(ignore[:, None].float() / 255, size // stride)  # area-downsampled
    # a loader pins it for CUDA: no aliasing
    mask = mask.expand(-1, sk.num_paf + sk.num_heat, -1, -1).contiguous()
    if cfg.synthetic_loss == "mask" and pasted.shape[1]:
        mask = mask * volumetric_mask(pasted, cfg)
    return Targets(people, target, mask)


# ----------------------------------------------------------------------------------------------
# Batches: which samples a step trains on, built deterministically from (seed, step)
# ----------------------------------------------------------------------------------------------

REAL, AUGMENTED, SYNTHETIC = "real", "augmented", "synthetic"


class Spec(NamedTuple):
    """One crop of a batch: its source, image record and centre person; `near` (lo, hi) asks the
    pasting to put the nearest pasted person at that distance (a teacher's augmented bin)."""
    source: str
    index: int
    person: int
    near: tuple[float, float] | None = None


def other_source(cfg: Config) -> str | None:
    """The source of a mixed batch's non-real half."""
    if cfg.mode == "student-teacher":
        return AUGMENTED if cfg.teacher_data == "augmented" else SYNTHETIC
    return {"synthetic": SYNTHETIC, "augmented": AUGMENTED}.get(cfg.mode)


def batch_sources(cfg: Config, batch_size: int) -> list[str]:
    """Per-slot sources: mixed modes fill the first share (paper code: 16 of 32), real the rest."""
    other = other_source(cfg)
    if other is None:
        return [REAL] * batch_size
    n_other = math.floor(batch_size * (1 - cfg.real_share))
    return [other] * n_other + [REAL] * (batch_size - n_other)


def step_rng(seed: int, step: int, rank: int = 0) -> np.random.Generator:
    # Data of step t depends on (seed, t) alone, so a resumed run sees exactly the same batches.
    return np.random.default_rng([seed, step, rank])


@dataclass
class Batch:
    """One step's crops with their targets, made in a loader worker (targets cost the training
    process nothing). The people are crop pixels, padded with unlabelled rows (v = 0)."""
    image: np.ndarray  # (B, S, S, 3) uint8 BGR crops
    source: list[str]  # (B,) REAL, SYNTHETIC or AUGMENTED
    keypoints: np.ndarray  # (B, P, K, 3) float32 the crops' own people
    pasted: np.ndarray  # (B, Q, K, 3) float32 pasted synthetic people
    ignore: np.ndarray  # (B, S, S) uint8 the crops' ignore masks
    people: torch.Tensor  # (B, P', K, 3) the people whose targets are drawn (Targets.people)
    target: torch.Tensor  # (B, PAF + heat, h, w) float32
    loss_mask: torch.Tensor  # (B, PAF + heat, h, w) float32, M

    def pin_memory(self) -> Batch:  # the DataLoader's pin_memory=True calls this (CUDA)
        return dataclasses.replace(self, people=self.people.pin_memory(),
                                   target=self.target.pin_memory(),
                                   loss_mask=self.loss_mask.pin_memory())


class BatchMaker:
    """Turns a step's specs into a Batch: the crops,
    and the targets and loss mask made from them."""

    def __init__(self, data: Data, cfg: Config):
        self.data, self.cfg = data, cfg
        self.sets = {REAL: data.train, AUGMENTED: data.train if data.bank else None,
                     SYNTHETIC: data.synthetic}
        self.centres = {k: s.centre_people() for k, s in self.sets.items() if s is not None}
        needed = other_source(cfg)
        if needed and needed not in self.centres:
            what = ("--bank-json (a person bank)" if needed == AUGMENTED
                    else "--synthetic-json (synthetic scenes)")
            raise ReproError(f"--mode {cfg.mode} needs {what}")
        for k, c in self.centres.items():
            if len(c) == 0:
                raise ReproError(f"the {k} training set has no person with >= "
                                 f"{skeleton(cfg).min_centre_keypoints} labelled keypoints to "
                                 "centre a crop on")

    @functools.cache
    def ignore_mask(self, source: str, index: int) -> np.ndarray | None:
        rec = self.sets[source].records[index]
        return ignore_mask(rec) if rec.ignore_rles else None

    def sample(self, spec: Spec, rng: np.random.Generator | None) -> Sample:
        kset = self.sets[spec.source]
        ignore = self.ignore_mask(REAL if spec.source == AUGMENTED else spec.source, spec.index)
        s = crop_person(kset.image(spec.index), ignore, kset.records[spec.index], spec.person,
                        self.cfg, rng)
        if spec.source == AUGMENTED:
            s = paste_people(s, self.data.bank, self.cfg, rng, spec.near)
        return s

    def plan(self, batch_size: int, rng: np.random.Generator, pool: np.ndarray | None = None,
             near: tuple[float, float] | None = None) -> list[Spec]:
        """A step's crops. A teacher's bin restricts the non-real half: to `pool` ((N, 2) record,
        person pairs; drawn with replacement, paper code) or to a pasting distance `near`."""
        sources = batch_sources(self.cfg, batch_size)
        specs = []
        for source in dict.fromkeys(sources):
            n = sources.count(source)
            candidates = pool if (pool is not None and source != REAL) else self.centres[source]
            picks = candidates[rng.integers(len(candidates), size=n)]
            specs += [Spec(source, int(i), int(p), near if source != REAL else None)
                      for i, p in picks]
        return specs

    def batch(self, specs: list[Spec], rng: np.random.Generator | None) -> Batch:
        image, keypoints, pasted, ignore = collate([self.sample(spec, rng) for spec in specs])
        people, target, loss_mask = make_targets(torch.as_tensor(keypoints),
                                                 torch.as_tensor(pasted),
                                                 torch.as_tensor(ignore), self.cfg)
        return Batch(image, [s.source for s in specs], keypoints, pasted, ignore, people, target,
                     loss_mask)


def rank_share(maker: BatchMaker, batch_size: int, seed: int, step: int, rank: int = 0,
               world: int = 1) -> tuple[list[Spec], np.random.Generator]:
    """Rank `rank`'s specs of step `step` and the generator its crops draw on. Every rank plans the
    step's whole batch alike and takes every world-th slot, so the shares are disjoint and together
    are the step's batch, each with its share of real crops. Rank 0's crops continue on the planning
    generator (a world of one is the single-process run, unchanged); another rank's draw on a stream
    of their own, so that no rank builds the others' crops."""
    rng = step_rng(seed, step)
    specs = maker.plan(batch_size, rng)[rank::world]
    return specs, rng if rank == 0 else step_rng(seed, step, rank)


def collate(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Samples -> (image, keypoints, pasted, ignore) stacked, people padded with unlabelled rows."""
    def pad(arrays):
        n = max(1, max(len(a) for a in arrays))
        out = np.zeros((len(arrays), n) + arrays[0].shape[1:], np.float32)
        for i, a in enumerate(arrays):
            out[i, :len(a)] = a
        return out if any(len(a) for a in arrays) else out[:, :0]

    return (np.stack([s.image for s in samples]), pad([s.keypoints for s in samples]),
            pad([s.pasted for s in samples]), np.stack([s.ignore for s in samples]))


def quiet_worker(worker_id: int) -> None:
    """A loader worker takes SIGTERM's default: the loader ends a worker that is slow to stop with
    SIGTERM, and a worker that ran the main process's handler (inherited by fork) would raise in
    the middle of its queue and print a traceback after the run's last line. It ends with its
    run."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    end_with_parent()


def end_with_parent() -> None:
    """On Linux the kernel sends this process SIGKILL when its parent is gone, killed with -9 too
    (the OOM killer, a cluster's preemption), which no handler of the parent sees: a worker left
    blocked on the parent's queue would hold its memory for good. The kernel follows the thread
    that started the process: loaders are made on the main thread."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent.pid:  # gone before the kernel was told
        os._exit(1)


class StepBatches(torch.utils.data.Dataset):
    """Item t is the batch of step start+t (this rank's share of it), so loader workers stay
    deterministic; batch_size is the whole step's, over all ranks."""

    def __init__(self, maker: BatchMaker, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1):
        self.maker, self.batch_size, self.seed = maker, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        specs, rng = rank_share(self.maker, self.batch_size, self.seed, self.start + i, self.rank,
                                self.world)
        return self.maker.batch(specs, rng)


# ----------------------------------------------------------------------------------------------
# Networks: OpenPose's two-branch multi-stage design on two backbones
# ----------------------------------------------------------------------------------------------

def conv(cin: int, cout: int, k: int, norm: bool = False, dilation: int = 1,
         relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=dilation * (k // 2),
                                         dilation=dilation, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


def branch(cin: int, hidden: int, head: int, cout: int, kernel: int, depth: int, norm: bool,
           dilations: tuple[int, ...] | None = None) -> nn.Sequential:
    dilations = dilations or (1,) * depth
    layers = []
    for i in range(depth):
        layers += conv(cin if i == 0 else hidden, hidden, kernel, norm, dilations[i])
    layers += conv(hidden, head, 1, norm) + conv(head, cout, 1, relu=False)
    return nn.Sequential(*layers)


class PoseNet(nn.Module):
    """Backbone features -> stage 1 -> stages 2..T on concat(previous PAF, heatmaps, features).

    forward returns every stage's (B, PAF + heat, H, W) maps: the loss supervises them all."""

    def __init__(self, backbone: nn.Module, features: int, stages: int, stage1: dict,
                 refine: dict, sk: Skeleton):
        super().__init__()
        self.backbone = backbone
        self.stages = nn.ModuleList()
        for t in range(stages):
            spec, cin = ((stage1, features) if t == 0
                         else (refine, features + sk.num_paf + sk.num_heat))
            self.stages.append(nn.ModuleList([branch(cin, cout=sk.num_paf, **spec),
                                              branch(cin, cout=sk.num_heat, **spec)]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone(x)
        outputs, inp = [], features
        for paf_branch, heat_branch in self.stages:
            out = torch.cat([paf_branch(inp), heat_branch(inp)], 1)
            outputs.append(out)
            inp = torch.cat([out, features], 1)
        return outputs


# paper code: conv1_x and conv2_x (torchvision vgg19.features[:10]) frozen when fine-tuning
VGG_FROZEN_LAYERS = 10


def openpose_net(sk: Skeleton, stages: int = 6, pretrained: bool = False) -> PoseNet:
    """The paper's student: VGG-19 conv1_1..conv4_2 + conv4_3_CPM 256 + conv4_4_CPM 128,
    stride 8."""
    import torchvision

    weights = None
    if pretrained:
        weights = torchvision.models.VGG19_Weights.IMAGENET1K_V1
    try:
        vgg = torchvision.models.vgg19(weights=weights)
    except Exception as e:  # urllib/SSL/OSError: no network, no cached file
        raise ReproError("--pretrained: cannot get torchvision's ImageNet VGG-19 weights "
                         f"({type(e).__name__}); put vgg19-dcbb9e9d.pth into "
                         "$TORCH_HOME/hub/checkpoints or drop --pretrained") from None
    backbone = nn.Sequential(*vgg.features[:23], *conv(512, 256, 3), *conv(256, 128, 3))
    return PoseNet(backbone, 128, stages,
                   stage1=dict(hidden=128, head=512, kernel=3, depth=3, norm=False),  # paper code
                   # paper code
                   refine=dict(hidden=128, head=128, kernel=7, depth=5, norm=False), sk=sk)


def small_net(sk: Skeleton, stages: int = 3, width: int = 96) -> PoseNet:
    """CPU-sized student with the same two-branch stages: a stride-4 stem (downsample early, where
    convolutions are cheap) and dilated 3x3 refinement convs in place of 7x7 for the receptive
    field."""
    backbone = nn.Sequential(
        *conv(3, 32, 3, True), nn.MaxPool2d(2),
        *conv(32, 64, 3, True), nn.MaxPool2d(2),
        *conv(64, 96, 3, True), *conv(96, 128, 3, True, 2), *conv(128, 128, 3, True))
    return PoseNet(backbone, 128, stages,
                   stage1=dict(hidden=width, head=2 * width, kernel=3, depth=3, norm=True),
                   refine=dict(hidden=width, head=width, kernel=3, depth=5, norm=True,
                               dilations=(1, 2, 4, 2, 1)),
                   sk=sk)


def build_model(cfg: Config) -> PoseNet:
    if cfg.arch == "openpose":
        return openpose_net(skeleton(cfg), cfg.stages, cfg.pretrained)
    if cfg.arch == "small":
        return small_net(skeleton(cfg), cfg.stages, cfg.width)
    raise ReproError(f"unknown --arch {cfg.arch}: use openpose or small")


IMAGE_MEAN = torch.tensor([0.406, 0.456, 0.485]) * 255  # torchvision's ImageNet statistics, BGR


IMAGE_STD = torch.tensor([0.225, 0.224, 0.229]) * 255


def to_input(images: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    """(B, H, W, 3) uint8 BGR -> normalised float (B, 3, H, W), channels-last in memory."""
    x = torch.as_tensor(images).to(device, non_blocking=True).float()
    x = (x - IMAGE_MEAN.to(device)) / IMAGE_STD.to(device)
    return x.permute(0, 3, 1, 2)  # a permuted NHWC tensor is already channels-last


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------

def pose_loss(outputs: list[torch.Tensor], target: torch.Tensor, mask: torch.Tensor):
    """paper code: sum over stages of 0.5 * sum(M * (pred - gt)^2) / batch.

    Also returns each sample's last-stage loss (the teacher's hardness before sample_hardness
    normalises it)."""
    batch = target.shape[0]
    stage_losses = [0.5 * (mask * (o.float() - target) ** 2).flatten(1).sum(1) for o in outputs]
    return sum(s.sum() for s in stage_losses) / batch, stage_losses[-1].detach()


def supervised_joints(keypoints: torch.Tensor, size: int, sk: Skeleton) -> torch.Tensor:
    """(B,) labelled joints inside the crop (derived parts such as the neck not counted):
    normalises a sample's loss for the teacher (paper code)."""
    xy, v = keypoints[..., sk.joint_parts, :2], keypoints[..., sk.joint_parts, 2]
    inside = (xy >= 0).all(-1) & (xy <= size - 1).all(-1) & (v > 0)
    return inside.flatten(1).sum(1).clamp(min=1)


def sample_hardness(last_stage: torch.Tensor, people: torch.Tensor, size: int,
                    sk: Skeleton) -> np.ndarray:
    """(B,) what the teacher reads of each sample: its last-stage loss per supervised joint
    (paper code)."""
    return (last_stage / supervised_joints(people, size, sk)).cpu().numpy()


class StepResult(NamedTuple):
    """What one optimiser step reports: to the metric lines (LogWindow) and to the teacher."""
    loss: float  # the step's loss (pose_loss)
    hardness: np.ndarray  # (B,) sample_hardness of each crop
    hits: int  # peak_hits of the last stage
    labelled: int
    images: int


def peak_hits(heat: torch.Tensor, keypoints: torch.Tensor, stride: int, radius: int = 1,
              threshold: float = 0.1) -> tuple[int, int]:
    """Cheap learning signal: (hits, labelled keypoints) where the maximum of the part's heatmap
    in a window of 3 * radius cells around the truth is above `threshold` and within `radius`
    cells of it. Random maps score about 1/5; maps of stride `stride`, radius in map pixels."""
    parts = heat[:, :keypoints.shape[2]].float()
    b, _, h, w = parts.shape
    reach = 3 * radius
    cell = torch.round((keypoints[..., :2] - (stride - 1) / 2) / stride).long()  # (B, P, 18, 2)
    ok = ((keypoints[..., 2] > 0) & (cell[..., 0] >= 0) & (cell[..., 0] < w)
          & (cell[..., 1] >= 0) & (cell[..., 1] < h))
    bi, pi, ki = torch.nonzero(ok, as_tuple=True)
    if len(bi) == 0:
        return 0, 0
    padded = F.pad(parts, (reach, reach, reach, reach), value=-1.0)
    offsets = torch.arange(-reach, reach + 1, device=heat.device)
    ys = cell[bi, pi, ki, 1, None, None] + reach + offsets[None, :, None]  # (K, n, 1)
    xs = cell[bi, pi, ki, 0, None, None] + reach + offsets[None, None, :]  # (K, 1, n)
    window = padded[bi[:, None, None], ki[:, None, None], ys, xs].flatten(1)  # (K, n * n)
    best, where = window.max(1)
    n = len(offsets)
    dy, dx = offsets[where // n], offsets[where % n]
    hits = (best > threshold) & (dy.abs() <= radius) & (dx.abs() <= radius)
    return int(hits.sum()), len(bi)


# ----------------------------------------------------------------------------------------------
# Teacher: an adversarial network that picks the bin of synthetic samples the student sees next
# ----------------------------------------------------------------------------------------------

TEACHER_EXPLORE = 0.1  # paper code: 10% of picks uniform at random


TEACHER_HISTORY = 10  # paper code: loss_last is the mean of the last 10 windows


TEACHER_HARD_CROPS = 32  # paper code: the 32 hardest real crops of the window are its input


# paper code: groupBoundaries.npy, the bins' means (np.linspace(lo, hi, 10)); a value's bin is
# np.digitize(x, means[:-1]) (pose_dataset_personLevel_minDist.py). min_dist's hi is the 640-px
# image's width: [ours] the rendered image's width in its place.
PAPER_BIN_EDGES = {"min_dist": (0.0, 640.0), "camera_angle": (3.68161, 32.95209)}


def bin_edges(attribute: str, values: np.ndarray, bins: int, image_size: float,
              rule: str = "ours") -> tuple[float, float]:
    """(low, width) of equal-width bins for assign_bins; the first and last bins are open-ended.
    The paper's attributes step as its means do, (hi - lo) / (bins - 1): 71.1 px at 640 px, 3.25
    degrees.
    rule "ours": bin 0 starts at the first mean; "paper": np.digitize on the means but the last, so
    bin 0 holds only values below the first (always empty for min_dist) and the rest sit one higher.
    Other attributes: `bins` equal steps over the values' range (check_config refuses "paper")."""
    if attribute in PAPER_BIN_EDGES:
        lo, hi = PAPER_BIN_EDGES[attribute]
        hi = image_size if attribute == "min_dist" else hi
        width = (hi - lo) / (bins - 1)
        return (lo - width if rule == "paper" else lo), width
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    return lo, max(hi - lo, 1e-6) / bins


def assign_bins(values: np.ndarray, low: float, width: float, bins: int) -> np.ndarray:
    return np.clip(np.floor((values - low) / width), 0, bins - 1).astype(np.int64)


def person_attribute(kset: KeypointSet, people: np.ndarray, attribute: str) -> np.ndarray:
    """(N,) float64 attribute of (record, person) pairs; NaN where the json has none."""
    if attribute not in ATTRIBUTES:
        raise ReproError(f"--teacher-attribute must be one of {', '.join(ATTRIBUTES)}")
    recs = kset.records
    return np.array([recs[i].attributes.get(attribute, np.full(len(recs[i].keypoints), np.nan))[p]
                     for i, p in people], np.float64).reshape(-1)


def teacher_bins(cfg: Config, maker: BatchMaker) -> tuple[list[np.ndarray], float, float]:
    """The teacher's pools of (record, person) pairs per bin, and the bins' (low, width).

    Synthetic scenes are binned by a person attribute. Augmented bins are generative: every real
    crop fits every bin, and the bin sets the distance of the nearest pasted person."""
    source = other_source(cfg)
    centres = maker.centres[source]
    if source == AUGMENTED:
        if cfg.teacher_attribute != "min_dist":
            raise ReproError("--teacher-data augmented bins the distance to the nearest pasted "
                             "person: use --teacher-attribute min_dist")
        return [centres] * cfg.bins, 0.0, cfg.input_size / cfg.bins
    kset = maker.sets[SYNTHETIC]
    values = person_attribute(kset, centres, cfg.teacher_attribute)
    if np.isnan(values).all():
        raise ReproError(f"the synthetic json has no '{cfg.teacher_attribute}' per person: "
                         "render it with render_humans.py, which writes the teacher's attributes")
    low, width = bin_edges(cfg.teacher_attribute, values, cfg.bins, float(kset.records[0].width),
                           cfg.teacher_bins)
    which = assign_bins(np.nan_to_num(values, nan=-np.inf), low, width, cfg.bins)
    return [centres[which == k] for k in range(cfg.bins)], low, width


def soft_target(p: np.ndarray, picked: int, loss_rose: bool, step: float = 0.01,
                rule: str = "symmetric") -> np.ndarray:
    """The teacher's soft label from its previous output p (paper code: alpha = beta = step = 0.01;
    `compute_gt_teacher` in train_with_adversarial_teacher.py), n bins, k picked, then renormalised:
    - the student's loss rose (rewarded): p[k] * (1 + step); every other bin p[j] - p[k] * step / n;
    - it fell, rule "symmetric" [ours]: p[k] * (1 - step); every other bin p[j] + p[k] * step / n;
    - it fell, rule "paper" (paper code: `probabilities[picked] <= ...`, a comparison, not an
      assignment): p[k] stays; every other bin p[j] + p[k] * step / n, so p[k] loses only by the
      renormalisation, about (n - 1) / n * p[k]^2 * step, 1/11 of a reward's gain at p[k] = 0.1.
    [ours] negative entries are clipped to 0 before renormalising (the paper's code does not)."""
    t, n, k = p.astype(np.float64).copy(), len(p), picked
    gain = p[k] * (step if loss_rose else -step)
    t[k] = p[k] + (gain if loss_rose or rule == "symmetric" else 0.0)
    others = np.arange(n) != k
    t[others] = p[others] - gain / n
    t = np.clip(t, 0, None)
    return t / t.sum()


def teacher_net(arch: str, bins: int, input_size: int) -> nn.Module:
    """The teacher: a trunk, FC 512 x2 (128 for the small trunks [ours]), FC `bins`. The paper's
    head (vgg19, small-nobn) has no BatchNorm and a ReLU on the logits (paper code: vgg_teacher.py;
    its `fc` layers default to relu=True, the last one too); small [ours]: BatchNorm in the trunk
    and linear logits."""
    norm = arch == "small"
    # paper code: own VGG-19 trunk, conv 256, conv 128, pool, conv 64 x2, pool, FC 512 x2
    if arch == "vgg19":
        import torchvision
        trunk = nn.Sequential(*torchvision.models.vgg19().features[:23], *conv(512, 256, 3),
                              *conv(256, 128, 3), nn.MaxPool2d(2), *conv(128, 64, 3),
                              *conv(64, 64, 3), nn.MaxPool2d(2))
        hidden = 512
    elif arch in ("small", "small-nobn"):
        widths = (3, 16, 32, 64, 64)
        trunk = nn.Sequential(*(layer for cin, cout in zip(widths, widths[1:])
                                for layer in (*conv(cin, cout, 3, norm), nn.MaxPool2d(2))))
        hidden = 128
    else:
        raise ReproError(f"unknown --teacher-arch {arch}: use small, small-nobn or vgg19")
    with torch.no_grad():
        flat = trunk(torch.zeros(1, 3, input_size, input_size)).numel()
    logits_relu = [] if norm else [nn.ReLU(inplace=True)]
    return nn.Sequential(trunk, nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, bins),
                         *logits_relu)


class SharedAdam:
    """The teacher's optimiser as the paper's code has it (train_with_adversarial_teacher.py): its
    train op is built by the student's tf.train.AdamOptimizer, so it steps with the student's
    learning rate at that step and the student's betas, and the bias correction counts every step
    of that one optimiser object, the student's and the teacher's together (TF1's Adam keeps one
    beta-power pair per optimiser). Adam as TF1 computes it; weight decay as the student's AdamW."""

    def __init__(self, params, betas: tuple[float, float], weight_decay: float = 0.0,
                 eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.betas, self.weight_decay, self.eps = betas, weight_decay, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float, count: int) -> None:
        """One update; `count` is the optimiser's steps so far including this one
        (student + teacher)."""
        b1, b2 = self.betas
        lr_t = lr * math.sqrt(1 - b2 ** count) / (1 - b1 ** count)
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            p.mul_(1 - lr * self.weight_decay)
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, v.sqrt().add_(self.eps), value=-lr_t)

    def state_dict(self) -> dict:
        return dict(m=[m.clone() for m in self.m], v=[v.clone() for v in self.v])

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.m + self.v, state["m"] + state["v"]):
            mine.copy_(saved)


class Teacher:
    """Every `teacher_interval` student steps: reward or punish the last pick by whether the
    student's loss on it rose, take one cross-entropy step towards that soft label, and pick
    the next bin from the teacher's output on the hardest real crop (10% uniform).

    The teacher always learns on the crops its output p came from (paper code: `teacher_train_old`,
    the hard crops of the window before the pick was made). It starts from random weights: only the
    student is restored from --init (paper code: a Saver of the student's variables).
    With cfg.teacher_uniform the same loop samples all synthetic samples uniformly (the paper's
    baseline); with cfg.teacher_stratified each window's bin is drawn uniformly among the bins
    large enough to train on [ours]: neither learns."""

    def __init__(self, cfg: Config, maker: BatchMaker, device: torch.device):
        self.cfg, self.device, self.bins, self.min_bin = cfg, device, cfg.bins, cfg.teacher_min_bin
        self.learns = not (cfg.teacher_uniform or cfg.teacher_stratified)
        self.explore = TEACHER_EXPLORE  # the share of picks made uniformly at random
        self.pools, self.low, self.width = teacher_bins(cfg, maker)
        self.all = maker.centres[other_source(cfg)]
        self.net = teacher_net(cfg.teacher_arch, cfg.bins, cfg.input_size).to(device)
        self.optimizer = SharedAdam(self.net.parameters(), (cfg.beta1, 0.999), cfg.weight_decay)
        self.updates = 0  # the teacher's optimiser steps so far
        self.rng = np.random.default_rng([cfg.seed, 1234])
        self.probs = np.full(cfg.bins, 1 / cfg.bins)  # the teacher's output behind the current pick
        self.picked = int(self.rng.integers(cfg.bins))  # paper code: the first pick is uniform
        self.history: list[float] = []  # loss_current of past windows
        self.window: list[float] = []  # mean normalised synthetic loss of each step of this window
        self.hard_scores = np.zeros(0, np.float32)
        self.hard_images = np.zeros((0, cfg.input_size, cfg.input_size, 3), np.uint8)
        self.pick_images = self.hard_images  # the hard crops self.probs came from
        self.records: list[dict] = []
        if cfg.teacher_stratified:
            self.picked = self.random_valid_bin()
        elif self.learns:
            self.picked = self.valid_pick(self.picked, lr=cfg.lr, step=0)

    @property
    def counts(self) -> list[int]:
        return [len(p) for p in self.pools]

    def edges(self) -> list[float]:
        return [self.low + k * self.width for k in range(self.bins)]

    def describe(self) -> str:
        edges = ", ".join(f"{e:.1f}" for e in self.edges())
        return (f"teacher bins of {self.cfg.teacher_attribute} (lower edges {edges}): "
                f"samples per bin {self.counts}")

    def current_bin(self) -> tuple[np.ndarray | None, tuple[float, float] | None]:
        """(pool, near) for the next student step."""
        if self.cfg.teacher_uniform:
            return self.all, None
        if self.cfg.teacher_data == "augmented":
            return self.all, (self.low + self.picked * self.width,
                              self.low + (self.picked + 1) * self.width)
        return self.pools[self.picked], None

    # -- after every student step ----------------------------------------------------------
    def observe(self, step: int, batch: Batch, result: StepResult, lr: float) -> None:
        """After student step `step` at learning rate `lr`:
        the window's synthetic loss and hard crops."""
        real = np.array([s == REAL for s in batch.source])
        hardness = result.hardness
        self.window.append(float(hardness[~real].mean()))
        scores = np.concatenate([self.hard_scores, hardness[real]])
        images = np.concatenate([self.hard_images, np.asarray(batch.image)[real]])
        keep = np.argsort(-scores, kind="stable")[:TEACHER_HARD_CROPS]
        self.hard_scores, self.hard_images = scores[keep], images[keep]
        if (step + 1) % self.cfg.teacher_interval == 0:
            self.decide(step + 1, lr)

    def logits(self, images: np.ndarray) -> torch.Tensor:
        return self.net(to_input(images, self.device).contiguous(memory_format=torch.channels_last))

    def learn(self, target: np.ndarray, images: np.ndarray, lr: float, step: int) -> None:
        """One cross-entropy step of the teacher towards a soft label on `images`, after `step`
        student steps (paper code: the label broadcast over the crops, the losses summed), at the
        student's learning rate `lr` unless --teacher-lr sets one."""
        lr = self.cfg.teacher_lr or lr
        logits = self.logits(images)
        target_t = torch.as_tensor(target, dtype=torch.float32,
                                   device=self.device).expand_as(logits)
        loss = -(target_t * F.log_softmax(logits, 1)).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.updates += 1
        self.optimizer.step(lr, count=step + self.updates)

    def output(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():  # paper code: run on all the crops, read the hardest one's
            return F.softmax(self.logits(images)[0].float(), 0).cpu().numpy().astype(np.float64)

    def soft_target(self, picked: int, loss_rose: bool) -> np.ndarray:
        cfg = self.cfg
        return soft_target(self.probs, picked, loss_rose, cfg.teacher_step, cfg.teacher_update)

    def choose(self) -> tuple[int, bool]:
        if self.rng.random() < self.explore:
            return int(self.rng.integers(self.bins)), True
        p = self.probs / self.probs.sum()
        return int(self.rng.choice(self.bins, p=p)), False

    def large_enough(self) -> list[int]:
        ok = [k for k in range(self.bins) if self.counts[k] > self.min_bin]
        if not ok:
            raise ReproError(f"no teacher bin holds more than {self.min_bin} samples "
                             f"({self.counts}): render more synthetic scenes or use fewer --bins")
        return ok

    def random_valid_bin(self) -> int:
        return int(self.rng.choice(self.large_enough()))

    def valid_pick(self, picked: int, lr: float, step: int) -> int:
        """Penalise ("loss fell", on the crops behind p) and re-pick a bin too small to train on; a
        few tries, then the teacher's most probable bin among the large enough ones."""
        for _ in range(10):
            if self.counts[picked] > self.min_bin:
                return picked
            if len(self.pick_images):
                target = self.soft_target(picked, loss_rose=False)
                self.learn(target, self.pick_images, lr, step)
                self.probs = self.output(self.pick_images)
            picked, _ = self.choose()
        return max(self.large_enough(), key=lambda k: self.probs[k])

    # -- every teacher_interval steps ----------------------------------------------------------
    def decide(self, step: int, lr: float) -> None:
        """The paper's update (Teacher section of README, "What the paper's code does"): the reward
        of the window that ended, one step towards its soft label on the crops behind the old p,
        then the new p on this window's hard crops and the next pick."""
        loss_current = float(np.mean(self.window))
        record = dict(step=step, bin=self.picked, loss=loss_current, reward=None)
        if self.learns and self.history and len(self.pick_images):
            loss_last = float(np.mean(self.history[-TEACHER_HISTORY:]))
            record["reward"] = loss_current - loss_last
            target = self.soft_target(self.picked, loss_last <= loss_current)
            self.learn(target, self.pick_images, lr, step)
        self.history.append(loss_current)
        if self.learns:
            self.pick_images = self.hard_images
            self.probs = self.output(self.pick_images)
            picked, explored = self.choose()
            self.picked = self.valid_pick(picked, lr, step)
            record |= dict(probs=self.probs.round(4).tolist(), next_bin=self.picked,
                           explored=explored)
        elif self.cfg.teacher_stratified:
            self.picked = self.random_valid_bin()
            record["next_bin"] = self.picked
        self.records.append(record)
        self.window = []
        self.hard_scores, self.hard_images = self.hard_scores[:0], self.hard_images[:0]

    def last_record(self) -> dict | None:
        return self.records[-1] if self.records else None

    # -- checkpoint ------------------------------------------------------------------------------
    # numpy arrays travel as tensors (bit for bit, dtype kept): a checkpoint holds only what
    # torch.load(weights_only=True) reads, so loading one never runs code
    ARRAYS = ("probs", "hard_scores", "hard_images", "pick_images")

    def state(self) -> dict:
        return dict(net=self.net.state_dict(), optimizer=self.optimizer.state_dict(),
                    rng=self.rng.bit_generator.state, picked=self.picked, history=self.history,
                    window=self.window, records=self.records, updates=self.updates,
                    **{key: torch.from_numpy(getattr(self, key).copy()) for key in self.ARRAYS})

    def restore(self, state: dict) -> None:
        if "updates" not in state:
            raise ReproError("this checkpoint's teacher was saved by an earlier version, which "
                             "learned on other crops with another optimiser: it cannot resume; "
                             "start the run again")
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        for key in ("picked", "history", "window", "records", "updates"):
            setattr(self, key, state[key])
        for key in self.ARRAYS:
            setattr(self, key, state[key].numpy())


def make_teacher(cfg: Config, maker: BatchMaker, device: torch.device) -> Teacher:
    teacher = Teacher(cfg, maker, device)
    print(teacher.describe())
    return teacher


# ----------------------------------------------------------------------------------------------
# Trainer: the student's steps, the teacher beside them
# ----------------------------------------------------------------------------------------------

def cpu_bf16_units() -> tuple[bool, bool]:
    """(AMX, AVX512-BF16) as torch detects them."""
    amx, avx512_bf16 = (getattr(torch.cpu, name, lambda: False)()
                        for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return bool(amx), bool(avx512_bf16)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: there oneDNN runs bf16 convolutions about 2x faster than fp32 (`--bench`
    on the 2-core EPYC: 61 vs 31 img/s for the demo net);
    elsewhere bf16 on the CPU is emulated and slower."""
    return any(cpu_bf16_units())


def uses_bf16(device: torch.device, cfg: Config) -> bool:
    return cfg.amp and (device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()))


def autocast(device: torch.device, cfg: Config):
    # bfloat16 needs no loss scaling, so checkpoints and resume stay simple; weights, optimiser
    # state and the loss stay float32
    return (torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(device, cfg)
            else contextlib.nullcontext())


def precision(device: torch.device, cfg: Config) -> str:
    return "bf16 autocast" if uses_bf16(device, cfg) else "float32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ReproError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    return torch.device(cfg.device)


def learning_rate(cfg: Config, step: int, progress: float) -> float:
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_gamma ** (step // cfg.lr_step)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warmup = min(1.0, (step + 1) / 100)  # a short warm-up keeps BatchNorm + Adam stable at start
    return cfg.lr * warmup * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def batchnorm_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Trainer:
    """Holds the student (and the teacher in student-teacher mode) and runs the steps."""

    def __init__(self, cfg: Config, data: Data, device: torch.device, out: Path, rank: int = 0,
                 world: int = 1):
        self.cfg, self.data, self.device, self.out, self.rank, self.world = (
            cfg, data, device, out, rank, world)
        self.model = build_model(cfg).to(device).to(memory_format=torch.channels_last)
        if cfg.init and not cfg.resume:  # a resumed run gets its weights from its own checkpoint
            load_weights(self.model, load_checkpoint(cfg.init), cfg, cfg.init)
        if cfg.arch == "openpose" and (cfg.pretrained or cfg.init):
            for p in self.model.backbone[:VGG_FROZEN_LAYERS].parameters():
                p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=cfg.lr, betas=(cfg.beta1, 0.999),
                                           weight_decay=cfg.weight_decay)
        self.maker = BatchMaker(data, cfg)
        self.step, self.seconds, self.evals_done, self.log_window = 0, 0.0, 0, LogWindow()
        self.teacher = (make_teacher(cfg, self.maker, device) if cfg.mode == "student-teacher"
                        else None)
        self.net = self.model
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:  # checkpoints and evaluation keep using self.model, the uncompiled module
            self.net = torch.compile(self.net)

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict:
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    step=self.step, seconds=self.seconds, evals_done=self.evals_done,
                    config=dataclasses.asdict(self.cfg),
                    teacher=self.teacher.state() if self.teacher else None,
                    torch_rng=torch.get_rng_state(), log_window=dataclasses.asdict(self.log_window))

    def restore(self, ckpt: dict, path) -> None:
        load_weights(self.model, ckpt, self.cfg, path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.seconds, self.evals_done = (ckpt["step"], ckpt["seconds"],
                                                    ckpt.get("evals_done", 0))
        self.log_window = LogWindow(**ckpt.get("log_window", dict(t0=self.seconds)))
        torch.set_rng_state(ckpt["torch_rng"])
        if self.teacher and ckpt.get("teacher"):
            self.teacher.restore(ckpt["teacher"])

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, batch: Batch, lr: float) -> StepResult:
        """One optimiser step on a batch from BatchMaker.batch."""
        cfg, device, sk = self.cfg, self.device, skeleton(self.cfg)
        # again each step: an evaluation puts the model back in train mode
        if cfg.bn_stats == "keep":
            for m in batchnorm_modules(self.model):
                m.eval()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        people = batch.people.to(device)
        with autocast(device, cfg):
            outputs = self.net(to_input(batch.image, device))
        loss, last_stage = pose_loss(outputs, batch.target.to(device), batch.loss_mask.to(device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        hits, labelled = peak_hits(outputs[-1][:, sk.num_paf:].detach(), people, cfg.stride)
        return StepResult(float(loss.detach()),
                          sample_hardness(last_stage, people, cfg.input_size, sk), hits,
                          labelled, len(batch.image))

    def batches(self):
        """Yields (step, batch). Prefetching workers,
        except when a teacher picks each window's bin."""
        cfg, batch_size = self.cfg, self.cfg.batch_size // self.world
        if self.teacher is not None:
            while self.step < cfg.steps:
                rng = step_rng(cfg.seed, self.step, self.rank)
                pool, near = self.teacher.current_bin()
                yield self.step, self.maker.batch(self.maker.plan(batch_size, rng, pool, near), rng)
            return
        workers = cfg.workers if cfg.workers >= 0 else (4 if self.device.type == "cuda" else 1)
        steps = StepBatches(self.maker, cfg.batch_size, cfg.seed, self.step, cfg.steps, self.rank,
                            self.world)
        loader = torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False,
                                             num_workers=workers,
                                             pin_memory=self.device.type == "cuda",
                                             prefetch_factor=4 if workers else None,
                                             persistent_workers=False,
                                             worker_init_fn=quiet_worker)
        for i, batch in enumerate(loader):
            yield steps.start + i, batch

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> None:
        cfg, main_rank = self.cfg, self.rank == 0
        budget = cfg.minutes * 60
        # With a time budget the bar counts training seconds, so its ETA means something.
        bar = rh.progress(total=round(budget) if budget else cfg.steps,
                          initial=round(self.seconds) if budget else self.step,
                          unit="s" if budget else "step", desc=cfg.mode, enabled=main_rank,
                          stream=sys.stdout)
        t_last = time.perf_counter()
        for step, batch in self.batches():
            progress = max(step / cfg.steps, self.seconds / budget if budget else 0.0)
            lr = learning_rate(cfg, step, progress)
            r = self.train_step(batch, lr)
            if self.teacher is not None:
                self.teacher.observe(step, batch, r, lr)
            now = time.perf_counter()
            self.seconds += now - t_last
            t_last = now
            # rank 0's clock on every rank: one schedule, one stop, no rank left waiting
            if self.world > 1:
                self.seconds = self.from_rank0(self.seconds)
            self.step = step + 1
            self.log_window.add(r)
            bar.update(round(self.seconds) - bar.n if budget else 1)
            if main_rank and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                line = self.log_window.line(self.step, self.seconds, lr)
                if self.teacher is not None:
                    line["teacher"] = self.teacher.last_record()
                append_jsonl(self.out / "metrics.jsonl", line)
                bar.set_postfix(loss=f"{line['loss']:.2f}", hit=f"{line['peak_hit']:.2f}",
                                img_s=f"{line['img_s']:.1f}")
                self.log_window = LogWindow(t0=self.seconds)
            if main_rank and self.eval_due():
                self.evaluate_now()
                t_last = time.perf_counter()  # evaluation time is not training time
            if main_rank and (self.step % cfg.ckpt_every == 0):
                save_atomic(self.state(), self.out / "ckpt.pt")
            if budget and self.seconds >= budget:
                break
        bar.close()
        if main_rank:
            save_atomic(self.state(), self.out / "ckpt.pt")

    def from_rank0(self, value: float) -> float:
        import torch.distributed as dist

        shared = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(shared, 0)
        return float(shared)

    def eval_due(self) -> bool:
        """After one of --eval-steps, or when training time crosses the next of --eval-minutes."""
        marks = self.cfg.eval_minutes
        at_minute = self.evals_done < len(marks) and self.seconds >= marks[self.evals_done] * 60
        self.evals_done += at_minute
        return at_minute or self.step in {int(s) for s in self.cfg.eval_steps}

    def evaluate_now(self) -> dict:
        stats, _ = evaluate(self.model, self.data.val, self.cfg, self.device,
                            self.cfg.max_val_images, progress=False)
        append_jsonl(self.out / "metrics.jsonl",
                     dict(step=self.step, minutes=round(self.seconds / 60, 3), eval=stats))
        return stats


@dataclass
class LogWindow:
    """Training figures summed since the last metric line. It is part of the checkpoint, so the
    first line after a resume averages the same steps as an uninterrupted run's."""
    t0: float = 0.0  # training seconds at the window's start
    loss: float = 0.0
    n: int = 0
    hits: int = 0
    labelled: int = 0
    images: int = 0

    def add(self, r: StepResult) -> None:
        self.loss, self.n, self.images = self.loss + r.loss, self.n + 1, self.images + r.images
        self.hits, self.labelled = self.hits + r.hits, self.labelled + r.labelled

    def line(self, step: int, seconds: float, lr: float) -> dict:
        return dict(step=step, minutes=round(seconds / 60, 3), lr=lr,
                    loss=self.loss / max(self.n, 1),
                    peak_hit=self.hits / max(self.labelled, 1),
                    img_s=self.images / max(seconds - self.t0, 1e-9))


# ----------------------------------------------------------------------------------------------
# Inference: multi-scale maps -> peaks -> greedy PAF grouping (paper's thresholds)
# ----------------------------------------------------------------------------------------------

HEAT_THRESHOLD = 0.05  # paper code: peaks above 0.05


PAF_THRESHOLD = 0.01  # paper code: a limb sample counts when its PAF score is above 0.01 ...


LIMB_SAMPLES, LIMB_MIN_HITS = 10, 7  # paper code: ... on >= 7 of 10 samples


MIN_PARTS, MIN_PERSON_SCORE = 3, 0.2  # paper code: >= 3 parts, mean score >= 0.2


SMOOTH_SIGMA = 3.0  # paper code: Gaussian smoothing of the heatmaps


# [ours] the strongest peaks kept per part: a flat map (an untrained net in bf16 gives
# exactly constant outputs) makes every pixel a 3x3 maximum, and grouping all-pairs of them
# ran out of memory
MAX_PEAKS_PER_PART = 100


def upsample_maps(grid_maps: torch.Tensor, stride: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) output maps -> (B, C, H, W) input pixels (cell centres kept in place)."""
    up = F.interpolate(grid_maps, scale_factor=stride, mode="bicubic", align_corners=False)
    h, w = out_hw
    if up.shape[-2] < h or up.shape[-1] < w:
        up = F.pad(up, (0, max(0, w - up.shape[-1]), 0, max(0, h - up.shape[-2])), mode="replicate")
    return up[..., :h, :w]


def resize_maps(maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return maps if maps.shape[-2:] == hw else F.interpolate(maps, size=hw, mode="bicubic",
                                                            align_corners=False)


def network_maps(model: nn.Module, image: np.ndarray, cfg: Config, device,
                 base: float | None = None) -> tuple[torch.Tensor, float]:
    """Averaged last-stage maps (PAF + heat, H, W) at the base scale, and that scale (resized /
    original; by default the one that makes the image --eval-height tall)."""
    maps, base = batch_maps(model, image[None], cfg, device, base)
    return maps[0], base


@torch.no_grad()
def batch_maps(model: nn.Module, images: np.ndarray, cfg: Config, device,
               base: float | None = None) -> tuple[torch.Tensor, float]:
    """network_maps of (B, H, W, 3) images of one size in one forward pass per scale:
    (B, C, H', W')."""
    n, height, width = images.shape[:3]
    base = base or cfg.eval_height / height
    out_hw = (round(height * base), round(width * base))
    total = None
    for m in cfg.eval_scales:
        h, w = round(height * base * m), round(width * base * m)
        ph, pw = -h % cfg.stride, -w % cfg.stride  # pad to a whole number of cells
        padded = np.stack([cv2.copyMakeBorder(cv2.resize(image, (w, h),
                                                         interpolation=cv2.INTER_CUBIC),
                                              0, ph, 0, pw, cv2.BORDER_CONSTANT,
                                              value=(128, 128, 128))
                           for image in images])
        batch = padded if not cfg.eval_flip else np.concatenate([padded, padded[:, :, ::-1]])
        with autocast(device, cfg):
            maps = model(to_input(batch, device).contiguous(
                memory_format=torch.channels_last))[-1].float()
        if cfg.eval_flip:  # the flipped copy's padding sits on the left: undo the flip first
            maps = torch.stack([maps[:n], flip_maps(maps[n:], skeleton(cfg))]).mean(0)
        maps = upsample_maps(maps, cfg.stride, (h, w))
        total = resize_maps(maps, out_hw) if total is None else total + resize_maps(maps, out_hw)
    return total / len(cfg.eval_scales), base


def gaussian_kernel(sigma: float, device) -> torch.Tensor:
    r = int(math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def find_peaks(heat: torch.Tensor, threshold: float = HEAT_THRESHOLD) -> list[np.ndarray]:
    """(18, H, W) heatmaps -> per part (N, 3) x, y, score; Gaussian smoothing, 3x3 NMS, and a
    log-parabola fit for sub-pixel positions (exact for a Gaussian peak)."""
    k = gaussian_kernel(SMOOTH_SIGMA, heat.device)
    r = len(k) // 2
    h = heat[:, None]
    h = F.conv2d(F.pad(h, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    h = F.conv2d(F.pad(h, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))[:, 0]
    peak = (h == F.max_pool2d(h[:, None], 3, 1, 1)[:, 0]) & (h > threshold)
    part, y, x = torch.nonzero(peak, as_tuple=True)
    logh = torch.log(F.pad(h, (1, 1, 1, 1), mode="replicate").clamp(min=1e-6))

    def offset(minus, centre, plus):
        curvature = minus - 2 * centre + plus
        return torch.where(curvature < -1e-6,
                           (0.5 * (minus - plus) / curvature).clamp(-0.5, 0.5), 0.0)

    yy, xx = y + 1, x + 1
    dx = offset(logh[part, yy, xx - 1], logh[part, yy, xx], logh[part, yy, xx + 1])
    dy = offset(logh[part, yy - 1, xx], logh[part, yy, xx], logh[part, yy + 1, xx])
    found = torch.stack([x + dx, y + dy, h[part, y, x]], 1).cpu().numpy()
    part = part.cpu().numpy()
    return [strongest(found[part == j], MAX_PEAKS_PER_PART) for j in range(heat.shape[0])]


def strongest(peaks: np.ndarray, limit: int) -> np.ndarray:
    """The `limit` highest-scoring rows of (N, 3) peaks, in their original order."""
    if len(peaks) <= limit:
        return peaks
    return peaks[np.sort(np.argsort(-peaks[:, 2], kind="stable")[:limit])]


def connect_limb(a: np.ndarray, b: np.ndarray, paf: np.ndarray,
                 image_height: int) -> list[tuple[int, int, float]]:
    """Greedy one-to-one connections (i, j, score) between candidates a (N, 3) and b (M, 3)."""
    if len(a) == 0 or len(b) == 0:
        return []
    d = b[None, :, :2] - a[:, None, :2]  # (N, M, 2)
    norm = np.linalg.norm(d, axis=-1)
    unit = d / np.maximum(norm, 1e-6)[..., None]
    t = np.linspace(0, 1, LIMB_SAMPLES)
    pts = a[:, None, None, :2] + t[None, None, :, None] * d[:, :, None]  # (N, M, S, 2)
    xi = np.clip(np.round(pts[..., 0]).astype(np.int64), 0, paf.shape[2] - 1)
    yi = np.clip(np.round(pts[..., 1]).astype(np.int64), 0, paf.shape[1] - 1)
    field_ = paf[:, yi, xi]  # (2, N, M, S)
    dots = field_[0] * unit[..., 0, None] + field_[1] * unit[..., 1, None]
    # OpenPose: penalise limbs longer than half the image height
    score = dots.mean(-1) + np.minimum(0.5 * image_height / np.maximum(norm, 1e-6) - 1, 0)
    ok = ((dots > PAF_THRESHOLD).sum(-1) >= LIMB_MIN_HITS) & (score > 0)
    i, j = np.nonzero(ok)
    order = np.argsort(-score[i, j], kind="stable")
    used_a, used_b, out = set(), set(), []
    for k in order:
        if i[k] not in used_a and j[k] not in used_b:
            used_a.add(i[k]), used_b.add(j[k])
            out.append((int(i[k]), int(j[k]), float(score[i, j][k])))
    return out


def group_people(peaks: list[np.ndarray], paf: np.ndarray, image_height: int,
                 sk: Skeleton) -> list[tuple[np.ndarray, float]]:
    """OpenPose's greedy assembly. Returns (K, 3) parts (x, y, peak score) and the mean score."""
    offsets = np.cumsum([0] + [len(p) for p in peaks])
    all_peaks = np.concatenate([p for p in peaks] + [np.zeros((0, 3))])
    people: list[dict] = []  # parts: global peak id per part (-1 none), score: summed scores
    for k, (pa, pb) in enumerate(sk.limbs):
        for i, j, s in connect_limb(peaks[pa], peaks[pb], paf[2 * k:2 * k + 2], image_height):
            ga, gb = offsets[pa] + i, offsets[pb] + j
            owners = [p for p in people if p["parts"][pa] == ga or p["parts"][pb] == gb]
            if len(owners) == 1:
                p = owners[0]
                if p["parts"][pb] != gb:
                    p["parts"][pb] = gb
                    p["score"] += all_peaks[gb, 2] + s
            elif len(owners) == 2:
                p, q = owners
                if not ((p["parts"] >= 0) & (q["parts"] >= 0)).any():  # disjoint: merge
                    p["parts"] = np.maximum(p["parts"], q["parts"])
                    p["score"] += q["score"] + s
                    people = [r for r in people if r is not q]
                elif p["parts"][pb] != gb:
                    p["parts"][pb] = gb
                    p["score"] += all_peaks[gb, 2] + s
            elif k < sk.num_limbs - sk.never_start:
                parts = np.full(sk.num_parts, -1)
                parts[pa], parts[pb] = ga, gb
                people.append(dict(parts=parts, score=all_peaks[ga, 2] + all_peaks[gb, 2] + s))
    out = []
    for p in people:
        count = int((p["parts"] >= 0).sum())
        if count >= MIN_PARTS and p["score"] / count >= MIN_PERSON_SCORE:
            kp = np.zeros((sk.num_parts, 3), np.float32)
            kp[p["parts"] >= 0] = all_peaks[p["parts"][p["parts"] >= 0]]
            out.append((kp, float(p["score"] / count)))
    return out


def decode_maps(maps: torch.Tensor, base: float, sk: Skeleton) -> list[tuple[np.ndarray, float]]:
    """Base-scale maps (PAF + heat, H, W) -> people in original image pixels: (J, 3) dataset
    joints x, y, score (0 where not found)."""
    peaks = find_peaks(maps[sk.num_paf:sk.num_paf + sk.num_parts])
    people = group_people(peaks, maps[:sk.num_paf].cpu().numpy(), maps.shape[1], sk)
    out = []
    for kp, score in people:
        joints = sk.to_joints(kp)
        found = joints[:, 2] > 0
        joints[found, :2] = (joints[found, :2] + 0.5) / base - 0.5  # cv2.resize keeps pixel centres
        out.append((joints, score))
    return out


def coco_results(image_id: int, people: list[tuple[np.ndarray, float]],
                 scores: bool = False) -> list[dict]:
    """COCO results of one image's people; each keypoint's third value is 1 where found (COCOeval
    reads only x, y), or with scores its peak score (0 where not found),
    as --mode predict writes."""
    results = []
    for kp, score in people:
        k = kp.copy()
        k[:, 2] = k[:, 2] if scores else (k[:, 2] > 0).astype(np.float32)
        values = k.flatten().round(2)
        # the same float32 values, written as their 2 decimals rather than 360.67999267578125
        if scores:
            values = values.astype(np.float64).round(2)
        results.append(dict(image_id=int(image_id), category_id=1, keypoints=values.tolist(),
                            score=round(score, 5)))
    return results


# ----------------------------------------------------------------------------------------------
# Evaluation: COCO keypoint AP on whole images
# ----------------------------------------------------------------------------------------------

STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


# [ours] A person's occlusion index: the largest IoU of its box with another person's box in the
# image (0 when alone). The bins were fixed from the ground truth of the crowded demo val split,
# before any result (README, "The claims protocol").
OCCLUSION_BINS = {"none": (0.0, 0.05), "partial": (0.05, 0.3), "heavy": (0.3, 1.01)}


BOOTSTRAP_SAMPLES = 200  # [ours] resamples of the val images for the AP's spread


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) and (M, 4) x, y, w, h boxes -> (N, M) IoU."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, :2] + a[:, None, 2:], b[None, :, :2] + b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), -1)
    union = a[:, None, 2:].prod(-1) + b[None, :, 2:].prod(-1) - inter
    return inter / np.maximum(union, 1e-9)


def occlusion_index(boxes: np.ndarray) -> np.ndarray:
    """(P, 4) boxes of one image's people -> (P,) the largest IoU with any other of them."""
    iou = box_iou(boxes, boxes)
    np.fill_diagonal(iou, 0.0)
    return iou.max(1) if len(boxes) > 1 else np.zeros(len(boxes))


def coco_evaluator(gt, results: list[dict], image_ids: list[int]):
    """COCOeval keypoints of results against a COCO object, restricted to the images, evaluated."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), "keypoints")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def coco_ap(ev, image_counts: np.ndarray | None = None) -> float:
    """AP (OKS 0.50:0.95, area all) from an evaluated COCOeval, each image counted image_counts[i]
    times (a bootstrap resample); COCOeval.accumulate's rule: 101 recall points, precision made
    monotone, mean over the OKS thresholds."""
    p = ev.params
    max_det, n_images = p.maxDets[-1], len(p.imgIds)
    counts = np.ones(n_images, np.int64) if image_counts is None else image_counts
    images = [(e, c) for e, c in zip(ev.evalImgs[:n_images], counts) if e is not None and c > 0]
    if not images:
        return 0.0
    scores = np.concatenate([np.tile(e["dtScores"][:max_det], c) for e, c in images])
    matched = np.concatenate([np.tile(e["dtMatches"][:, :max_det], c) for e, c in images], 1)
    ignored = np.concatenate([np.tile(e["dtIgnore"][:, :max_det], c) for e, c in images], 1)
    positives = sum(int((e["gtIgnore"] == 0).sum()) * c for e, c in images)
    if positives == 0 or not len(scores):  # a resample of only images without detections has AP 0
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum((matched[:, order] > 0) & ~ignored[:, order].astype(bool), 1)
    fp = np.cumsum((matched[:, order] == 0) & ~ignored[:, order].astype(bool), 1)
    aps = []
    for t in range(len(p.iouThrs)):
        recall = tp[t] / positives
        precision = np.maximum.accumulate((tp[t] / np.maximum(tp[t] + fp[t], 1e-12))[::-1])[::-1]
        at = np.searchsorted(recall, p.recThrs, side="left")
        aps.append(np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)],
                            0.0).mean())
    return float(np.mean(aps))


def coco_eval(json_path: Path, results: list[dict], image_ids: list[int],
              detail: bool = False) -> dict[str, float]:
    """COCOeval keypoints restricted to the evaluated images. With detail: also the AP per
    occlusion bin (people outside the bin become crowd regions, which no detection is charged
    for; unmatched detections count in every bin) and the AP's bootstrap spread over images."""
    from pycocotools.coco import COCO

    if not results:
        return {k: 0.0 for k in STAT_NAMES} | (
            dict(ap_by_occlusion={k: 0.0 for k in OCCLUSION_BINS}, ap_sd=0.0) if detail else {})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(json_path))
    ev = coco_evaluator(gt, results, image_ids)
    stats = {k: float(max(v, 0.0)) for k, v in zip(STAT_NAMES, ev.stats)}
    if detail:
        stats["ap_by_occlusion"] = {
            name: coco_ap(coco_evaluator(occlusion_subset(gt, lo, hi), results, image_ids))
            for name, (lo, hi) in OCCLUSION_BINS.items()}
        stats["ap_sd"] = float(np.std(bootstrap_aps(ev)))
    return stats


def bootstrap_aps(ev, draws: int = BOOTSTRAP_SAMPLES) -> np.ndarray:
    """AP on `draws` bootstrap resamples of the evaluated images; seed 0, so sets of one size share
    the resamples and the differences of two sets' arrays are a paired bootstrap."""
    n, rng = len(ev.params.imgIds), np.random.default_rng(0)
    return np.array([coco_ap(ev, np.bincount(rng.integers(n, size=n), minlength=n))
                     for _ in range(draws)])


def resampled_aps(kset: KeypointSet, results: list[dict],
                  draws: int = BOOTSTRAP_SAMPLES) -> np.ndarray:
    """bootstrap_aps of `results` on every image of `kset` (zeros without results)."""
    from pycocotools.coco import COCO

    if not results:
        return np.zeros(draws)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(kset.json_path))
    return bootstrap_aps(coco_evaluator(gt, results, [r.image_id for r in kset.records]), draws)


def person_occlusion(dataset: dict) -> dict[int, float]:
    """Annotation id -> occlusion index, over the people with keypoints (crowds left out)."""
    people: dict[int, list] = {}
    for a in dataset["annotations"]:
        if not a.get("iscrowd", 0) and a.get("num_keypoints", 0) > 0:
            people.setdefault(a["image_id"], []).append(a)
    index = {}
    for anns in people.values():
        for a, o in zip(anns, occlusion_index(np.array([a["bbox"] for a in anns],
                                                       np.float64).reshape(-1, 4))):
            index[a["id"]] = float(o)
    return index


def occlusion_subset(gt, lo: float, hi: float):
    """A copy of a COCO object in which the people outside [lo, hi) are crowd regions (ignored)."""
    from pycocotools.coco import COCO

    index = person_occlusion(gt.dataset)
    dataset = dict(gt.dataset, annotations=[
        a | dict(iscrowd=1) if a["id"] in index and not lo <= index[a["id"]] < hi else a
        for a in gt.dataset["annotations"]])
    subset = COCO()
    subset.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        subset.createIndex()
    return subset


def evaluate(model: nn.Module, kset: KeypointSet, cfg: Config, device, max_images: int = 0,
             progress: bool = True) -> tuple[dict[str, float], list]:
    """The set's benchmark (its skeleton's: COCO keypoint AP, or MPII multi-person mAP) on whole
    images, plus the peak-hit rate at the base scale. Also returns the benchmark's predictions."""
    sk = kset.skeleton
    model.eval()
    n = len(kset.records) if max_images <= 0 else min(max_images, len(kset.records))
    people, hits, labelled = [], 0, 0
    bar = rh.progress(total=n, unit="img", desc="evaluating", enabled=progress, stream=sys.stdout)
    for i in range(n):
        rec = kset.records[i]
        maps, base = network_maps(model, kset.image(i), cfg, device,
                                  sk.benchmark.base_scale(rec, cfg))
        people.append(decode_maps(maps, base, sk))
        kp = torch.as_tensor(rec.keypoints).clone()
        kp[..., :2] = (kp[..., :2] + 0.5) * base - 0.5
        h, m = peak_hits(maps[None, sk.num_paf:], kp[None].to(maps.device), stride=1,
                         radius=cfg.stride)
        hits, labelled = hits + h, labelled + m
        bar.update()
    bar.close()
    stats, predictions = sk.benchmark.score(kset, people)
    stats["peak_hit"] = hits / max(labelled, 1)
    stats["images"] = n
    model.train()
    return stats, predictions


class CocoBenchmark:
    """What differs between benchmarks, as COCO has it. Each skeleton names its benchmark
    (Skeleton.benchmark; MPII's is in Part II and answers the same calls), so the shared path never
    asks which one it is."""

    def load_val(self, json_path: str | Path, images: str | Path, sk: Skeleton) -> KeypointSet:
        return load_keypoint_set(json_path, images, sk)

    def base_scale(self, rec: ImageRecord, cfg: Config) -> float | None:
        """The inference base scale (resized / original) of a val record; None: --eval-height's."""
        return None

    def score(self, kset: KeypointSet,
              people: list[list[tuple[np.ndarray, float]]]) -> tuple[dict, list]:
        """(stats, predictions) of the people decoded from the first len(people) records."""
        n = len(people)
        predictions = [r for rec, found in zip(kset.records, people)
                       for r in coco_results(rec.image_id, found)]
        return coco_eval(kset.json_path, predictions, [r.image_id for r in kset.records[:n]],
                         detail=True), predictions

    def table(self, stats: dict, label: str) -> str:
        """The printed table of an evaluation on the set labelled `label`."""
        keys = ("AP", "AP50", "AP75", "APm", "APl", "AR", "peak_hit")
        return (f"\nCOCO keypoint metrics on the {label}, {stats.get('images', '?')} images\n"
                + "  ".join(f"{k:>8}" for k in keys) + "\n"
                + "  ".join(f"{stats.get(k, float('nan')):8.3f}" for k in keys))

    def headline(self, stats: dict) -> str:
        return f"AP {stats['AP']:.3f} (AP50 {stats['AP50']:.3f})"

    def write_predictions(self, out: Path, predictions: list) -> None:
        """A run's val predictions, beside its metrics."""
        write_json(predictions, out / "val_predictions.json")

    def image_predictions(self, name: str, people: list[tuple[np.ndarray, float]]) -> list:
        """--mode predict: what the benchmark's own format keeps of one image's people (COCO: its
        results json is written for every skeleton, nothing more)."""
        return []

    def write_image_predictions(self, out: Path, predictions: list) -> list[str]:
        return []



# ==============================================================================================
# Part II: the tooling around the method (file formats, figures, bench, predict, runs, command line)
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# MPII Human Pose: annotation lists (.mat / .json), the RELEASE split, the multi-person AP
# ----------------------------------------------------------------------------------------------

def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image file's header."""
    from PIL import Image

    if not path.is_file():
        raise ReproError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.size
    except OSError:
        raise ReproError(f"cannot decode image {path}: "
                         "the file is corrupt or not an image") from None


def mpii_records(groups: list[Group], images: Path, first_id: int = 1) -> list[ImageRecord]:
    """MPII groups -> records: parts from the 16 joints, and a box from each person's objpos and
    scale (paper code: person height = 200 x scale px; the crop centres on objpos). MPII has no
    masks of its unannotated people: [ours] they count as background (README, deviations)."""
    records = []
    for i, g in enumerate(groups):
        height = 200 * g.scales
        boxes = np.stack([g.objpos[:, 0] - height / 4, g.objpos[:, 1] - height / 2, height / 2,
                          height], 1)
        fallback = np.array([keypoint_box(j) for j in g.joints], np.float32).reshape(-1, 4)
        # people without objpos
        boxes = np.where(np.isfinite(boxes).all(1, keepdims=True), boxes, fallback)
        width, tall = image_size(images / g.image)
        records.append(ImageRecord(first_id + i, images / g.image, width, tall,
                                   MPII.to_parts(g.joints), boxes.astype(np.float32), {}))
    return records


def load_mpii_annolist(mat: Path, images: Path) -> KeypointSet:
    """An evaluation set given as an MPII annotation list (.mat, e.g. multi-person groups),
    with images."""
    groups = read_annolist(mat)
    if any(not g.image for g in groups):
        raise ReproError(f"{mat} names no images (annolist(i).image.name): "
                         "evaluating it needs them")
    return KeypointSet(None, mpii_records(groups, images), MPII, groups=groups)


def load_mpii(root: Path) -> tuple[KeypointSet, KeypointSet]:
    """The official release in root: mpii_human_pose_v1_u12_1.mat and images/ (and, if present, the
    toolkit's groups_v12.mat): training people, and the held-out multi-person validation groups."""
    mat = root / MPII_RELEASE
    if not mat.is_file():
        raise ReproError(f"--mpii-root {root}: no mpii_human_pose_v1_u12_1.mat inside "
                         "(the official release)")
    groups_mat = root / "groups_v12.mat"
    train, val = load_release(mat, root / "images",
                              groups_mat=groups_mat if groups_mat.is_file() else None)
    if not val:
        raise ReproError(f"{mat}: no multi-person validation group was held out")
    return (KeypointSet(None, mpii_records(train, root / "images"), MPII),
            KeypointSet(None, mpii_records(val, root / "images"), MPII, groups=val))


MPII_JOINTS = ("r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax",
               "upper_neck", "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder",
               "l_elbow", "l_wrist")  # MPII joint ids 0-15


MPII_NUM_JOINTS = len(MPII_JOINTS)  # 16


# official toolkit: assignGTmulti's jidxMap (LSP order); pelvis (6) and thorax (7) are not scored
MPII_SCORED = np.array([0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 8, 9])


# official toolkit: genTableAP's columns, each the mean AP of two joints;
# Total is the mean of all 14
MPII_TABLE = (("Head", (9, 8)), ("Shoulder", (12, 13)), ("Elbow", (11, 14)), ("Wrist", (10, 15)),
              ("Hip", (2, 3)), ("Knee", (1, 4)), ("Ankle", (0, 5)))


MPII_HEAD_SIZE = 0.6  # official toolkit: util_get_head_size, SC_BIAS x head-box diagonal


MPII_PCKH = 0.5  # official toolkit: evaluateAP, thresh (PCKh 0.5)


MPII_VARS = ("annolist_test_multi", "pred", "annolist")  # variables read_annolist looks for


# [ours] default held-out share: multi-person training images with crc32(name) % 10 == 0
MPII_VAL_MODULUS = 10


@dataclass
class Group:
    """One MPII evaluation unit (a multi-person group) or one image's annotated people."""
    image: str  # image file name ("" where the list has none, as in annolist_test_multi)
    # (P, 16, 3) float32 x, y, v: 0 absent, 1 annotated as not visible, 2 visible or visibility
    # not given (MPII leaves it empty for head top and upper neck; predicted joints have none)
    joints: np.ndarray
    head_boxes: np.ndarray  # (P, 4) float32 x1, y1, x2, y2 (NaN where absent, e.g. predictions)
    scales: np.ndarray  # (P,) float32 person height / 200 px (NaN where absent)
    objpos: np.ndarray  # (P, 2) float32 rough person centre (NaN where absent)
    scores: np.ndarray | None = None  # (P, 16) float32 per-joint prediction scores, 0 where absent
    rects: np.ndarray | None = None  # (P,) int64 index of each person in the image's annorect


def empty_group(image: str = "", with_scores: bool = False) -> Group:
    return Group(image, np.zeros((0, MPII_NUM_JOINTS, 3), np.float32), np.zeros((0, 4), np.float32),
                 np.zeros(0, np.float32), np.zeros((0, 2), np.float32),
                 np.zeros((0, MPII_NUM_JOINTS), np.float32) if with_scores else None,
                 np.zeros(0, np.int64))


# -- reading: loadmat(struct_as_record=False, squeeze_me=True) squeezes a one-element struct array
# to the bare struct and an empty one to an empty numeric array; json objects read as namespaces.
def _items(x) -> list:
    """A struct array / cell / list as a Python list, whatever squeezing did to it."""
    if x is None:
        return []
    if isinstance(x, list):
        return x
    if isinstance(x, np.ndarray):
        return list(x.ravel()) if x.dtype == object else []  # numeric: an empty [] in Matlab
    return [x]


def _field(s, name: str):
    return getattr(s, name, None)


def _num(x, default: float = np.nan) -> float:
    """First number in x (a scalar, a 1-element array, a string such as '1'); default if none."""
    a = np.asarray(x if x is not None else []).ravel()
    if a.size == 0:
        return default
    try:
        return float(a[0])
    except (TypeError, ValueError):
        return default


def _name(image) -> str:
    """annolist(i).image.name, or "" where the list has no image field."""
    name = (_field(image, "name")
            if image is not None and not isinstance(image, (str, np.ndarray)) else image)
    if isinstance(name, np.ndarray):
        name = name.item() if name.size == 1 else ""
    return str(name) if name is not None else ""


def _parse_rects(rects: list, where: str) -> Group:
    """annorect(k): head box x1 y1 x2 y2, scale, objpos, annopoints.point(j) x y id [is_visible]
    [score] -> a Group.  A joint is missing when its id is absent from point (MPII never writes
    (0, 0) for one); the first point of a repeated id counts, as in util_get_annopoint_by_id."""
    n = len(rects)
    joints = np.zeros((n, MPII_NUM_JOINTS, 3), np.float32)
    scores = np.zeros((n, MPII_NUM_JOINTS), np.float32)
    boxes = np.full((n, 4), np.nan, np.float32)
    scales = np.full(n, np.nan, np.float32)
    objpos = np.full((n, 2), np.nan, np.float32)
    has_score = False
    for k, r in enumerate(rects):
        boxes[k] = [_num(_field(r, f)) for f in ("x1", "y1", "x2", "y2")]
        scales[k] = _num(_field(r, "scale"))
        pos = _field(r, "objpos")
        if pos is not None and not isinstance(pos, np.ndarray):
            objpos[k] = _num(_field(pos, "x")), _num(_field(pos, "y"))
        ap = _field(r, "annopoints")
        points = ([] if ap is None or isinstance(ap, (np.ndarray, list))
                  else _items(_field(ap, "point")))
        for p in points:
            jid = _num(_field(p, "id"))
            if not (np.isfinite(jid) and jid == int(jid) and 0 <= jid < MPII_NUM_JOINTS):
                raise ReproError(f"{where}, person {k + 1}: joint id {_field(p, 'id')} is outside "
                                 "MPII's 0-15")
            j = int(jid)
            if joints[k, j, 2] > 0:
                continue
            visible = _num(_field(p, "is_visible"))  # empty for head top / upper neck: unknown
            joints[k, j] = _num(_field(p, "x")), _num(_field(p, "y")), 1.0 if visible == 0 else 2.0
            s = _field(p, "score")
            if s is not None:
                scores[k, j], has_score = _num(s, 0.0), True
    return Group("", joints, boxes, scales, objpos, scores if has_score else None, np.arange(n))


def _loadmat(path: Path) -> dict:
    import scipy.io
    from scipy.io.matlab import MatReadError

    if not path.is_file():
        raise ReproError(f"MPII file not found: {path}")
    try:
        return scipy.io.loadmat(str(path), struct_as_record=False, squeeze_me=True)
    except (MatReadError, ValueError, TypeError, OSError, IndexError, NotImplementedError,
            zlib.error) as e:  # junk bytes (zlib: inside a compressed variable)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        # v7.3 = HDF5
        hint = "; re-save it in Matlab with save -v7" if isinstance(e, NotImplementedError) else ""
        raise ReproError(f"{path} is not a readable Matlab .mat file ({reason}){hint}") from None


def _annolist_of(data: dict, path: Path, var: str | None):
    """The annotation list in a loaded .mat/.json: var, else RELEASE.annolist or a known name."""
    keys = [k for k in data if not k.startswith("__")]
    if var is not None:
        if var not in data:
            raise ReproError(f"{path} has no variable {var!r} "
                             f"(it has: {', '.join(keys) or 'nothing'})")
        return data[var]
    if "RELEASE" in data and _field(data["RELEASE"], "annolist") is not None:
        return data["RELEASE"].annolist
    for k in MPII_VARS:
        if k in data:
            return data[k]
    raise ReproError(f"{path} has no MPII annotation list: expected RELEASE, "
                     f"{', '.join(MPII_VARS)} (it has: {', '.join(keys) or 'nothing'})")


def read_annolist(path: str | Path, var: str | None = None,
                  image_names: list[str] | None = None) -> list[Group]:
    """An MPII annotation or prediction list (.mat from the toolkit, or our .json) -> one Group per
    entry, in file order (the toolkit pairs ground truth and predictions by position).
    image_names: names for lists without image fields (annolist_test_multi),
    e.g. read_image_list."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise ReproError(f"MPII file not found: {path}")
        try:
            data = json.loads(path.read_text(), object_hook=lambda d: types.SimpleNamespace(**d))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReproError(f"{path} is not valid json ({e})") from None
        data = vars(data) if isinstance(data, types.SimpleNamespace) else {}
    else:
        data = _loadmat(path)
    entries = _items(_annolist_of(data, path, var))
    if image_names is not None and len(image_names) != len(entries):
        raise ReproError(f"{path}: {len(entries)} entries but {len(image_names)} image names")
    groups = []
    for i, e in enumerate(entries):
        g = _parse_rects(_items(_field(e, "annorect")), f"{path}: entry {i + 1}")
        g.image = image_names[i] if image_names is not None else _name(_field(e, "image"))
        groups.append(g)
    return groups


def read_image_list(json_path: str | Path) -> list[str]:
    """Image names of a multi-person list json ({"root": [{"im_name": ...}, ...]}, as published
    with the validation groups of NieXC/pytorch-ppn), in its order."""
    json_path = Path(json_path)
    try:
        return [str(r["im_name"]) for r in json.loads(json_path.read_text())["root"]]
    except FileNotFoundError:
        raise ReproError(f"image list not found: {json_path}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ReproError(f"{json_path} is not an MPII image list "
                         f"(expected root[].im_name; {e!r})") from None


def _subset(g: Group, keep: np.ndarray) -> Group:
    return Group(g.image, g.joints[keep], g.head_boxes[keep], g.scales[keep], g.objpos[keep],
                 None if g.scores is None else g.scores[keep],
                 None if g.rects is None else g.rects[keep])


def _indices(x) -> np.ndarray:
    """A Matlab index list (scalar, vector or []) -> 0-based int64 array."""
    return np.atleast_1d(np.asarray(x if x is not None else [],
                                    np.float64)).ravel().astype(np.int64) - 1


def _multi_person_groups(annotated: np.ndarray, singles: np.ndarray,
                         groups: list | None) -> list[np.ndarray]:
    """One image's multi-person groups as arrays of person indices (official toolkit:
    getMultiPersonGroups): its groups (groups_v12.mat) holding no single person, or else its
    annotated people that are not single persons, as one group."""
    if groups is not None:
        rect_sets = [_indices(g) for g in groups]
        rect_sets = [r for r in rect_sets if len(r) and not np.isin(r, singles).any()]
    else:
        multi = np.nonzero(annotated & ~np.isin(np.arange(len(annotated)), singles))[0]
        rect_sets = [multi] if len(multi) else []
    return [r[(r >= 0) & (r < len(annotated))] for r in rect_sets]


def _release_arrays(mat_path: Path) -> tuple[list, np.ndarray, list]:
    """RELEASE's annolist, img_train flags and single_person lists, checked to match."""
    data = _loadmat(mat_path)
    rel = data.get("RELEASE")
    if rel is None or _field(rel, "annolist") is None:
        keys = ", ".join(k for k in data if not k.startswith("__")) or "nothing"
        raise ReproError(f"{mat_path} has no RELEASE.annolist (it has: {keys}): expected the "
                         "official mpii_human_pose_v1_u12_1.mat")
    annolist = _items(rel.annolist)
    train_flag = np.atleast_1d(np.asarray(_field(rel, "img_train"), np.float64)).astype(np.int64)
    single = _items(_field(rel, "single_person"))
    if not len(annolist) == len(train_flag) == len(single):
        raise ReproError(f"{mat_path}: RELEASE has {len(annolist)} images, "
                         f"{len(train_flag)} img_train flags and {len(single)} single_person "
                         "entries; they must match")
    return annolist, train_flag, single


def _release_groups(groups_mat: Path, images: int) -> list:
    """The toolkit's groups_v12.mat: per RELEASE image, its groups of people."""
    gdata = _loadmat(groups_mat)
    if "groups" not in gdata:
        raise ReproError(f"{groups_mat} has no variable 'groups' "
                         "(expected the toolkit's groups_v12.mat)")
    groups_of = _items(gdata["groups"])
    if len(groups_of) != images:
        raise ReproError(f"{groups_mat}: {len(groups_of)} entries for {images} RELEASE images")
    return groups_of


def load_release(mat_path: str | Path, images_dir: str | Path | None = None,
                 val_images: list[str] | None = None, groups_mat: str | Path | None = None
                 ) -> tuple[list[Group], list[Group]]:
    """The official mpii_human_pose_v1_u12_1.mat -> (train, val): train holds one Group per
    training image (RELEASE.img_train == 1) with its annotated people (one training sample per
    person); val the held-out multi-person groups.  The test set's labels are not public, so the
    groups come from training images, as in the toolkit's getMultiPersonGroups(groups, RELEASE,
    bTrain=true): a group counts when none of its people is in RELEASE.single_person.  With the
    toolkit's groups_v12.mat (groups_mat) an image may hold several groups; without it the
    annotated people of the image not in single_person form its one group.  Held-out images are
    val_images (e.g. read_image_list of a published split) or, by default, the multi-person
    training images with crc32(name) % 10 == 0 ([ours]); a held-out image gives nothing to train."""
    mat_path = Path(mat_path)
    annolist, train_flag, single = _release_arrays(mat_path)
    groups_of = None if groups_mat is None else _release_groups(Path(groups_mat), len(annolist))
    wanted = None if val_images is None else set(val_images)
    train, val, found = [], [], set()
    for i, e in enumerate(annolist):
        if train_flag[i] != 1:
            continue
        name = _name(_field(e, "image"))
        people = _parse_rects(_items(_field(e, "annorect")),
                              f"{mat_path}: RELEASE.annolist({i + 1})")
        people.image = name
        annotated = (people.joints[..., 2] > 0).any(1)
        rect_sets = _multi_person_groups(annotated, _indices(single[i]),
                                         None if groups_of is None else _items(groups_of[i]))
        held_out = name in wanted if wanted is not None else (
            bool(rect_sets) and zlib.crc32(name.encode()) % MPII_VAL_MODULUS == 0)
        if held_out:
            found.add(name)
            val += [_subset(people, r) for r in rect_sets if len(r)]
        elif annotated.any():
            train.append(_subset(people, annotated))
    if wanted is not None and wanted - found:
        missing = sorted(wanted - found)
        raise ReproError(f"{len(missing)} validation images are not MPII training images in "
                         f"{mat_path}: {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}")
    if images_dir is not None:
        images_dir = Path(images_dir)
        for g in train + val:
            if not (images_dir / g.image).is_file():
                raise ReproError(f"image not found: {images_dir / g.image} (the MPII images folder "
                                 "must hold every image of RELEASE's training set)")
    return train, val


# -- scoring: the official toolkit's evaluateAP / assignGTmulti / getRPC / VOCap
def head_sizes(boxes: np.ndarray) -> np.ndarray:
    """(P, 4) head boxes x1 y1 x2 y2 -> (P,) PCKh reference lengths
    (official toolkit: util_get_head_size)."""
    return MPII_HEAD_SIZE * np.hypot(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def assign_group(gt: Group, pred: Group,
                 thresh: float = MPII_PCKH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The toolkit's assignGTmulti for one group -> labels (Q, 14) bool (true positive), has (Q, 14)
    bool (joint predicted), n_gt (14,) annotated joints, columns in MPII_SCORED order.
    A pair's score is the share of the GT person's annotated joints predicted within thresh head
    sizes; each prediction keeps its best person, each person then its best prediction (first on
    ties).  A matched prediction's joints are TP within thresh, all its other joints FP; an
    unmatched prediction (a duplicate, a person outside the group) is all FP; joints it lacks count
    nowhere, while every annotated joint counts in the recall's denominator."""
    has_gt = gt.joints[:, MPII_SCORED, 2] > 0  # (P, 14)
    has = pred.joints[:, MPII_SCORED, 2] > 0  # (Q, 14)
    q, p = len(has), len(has_gt)
    labels = np.zeros((q, len(MPII_SCORED)), bool)
    if q and p:
        d = np.linalg.norm(pred.joints[:, None, MPII_SCORED, :2]
                           - gt.joints[None, :, MPII_SCORED, :2], axis=-1)
        d = d / head_sizes(gt.head_boxes)[None, :, None]  # (Q, P, 14)
        match = (d <= thresh) & has[:, None] & has_gt[None]  # NaN (no head box) never matches
        n_annot = has_gt.sum(1)
        # a person without annotated joints (0/0 in Matlab, which max() skips) is nobody's best
        pck = np.where(n_annot > 0, match.sum(2) / np.maximum(n_annot, 1), 0.0)  # (Q, P)
        best = pck.argmax(1)
        kept = np.zeros_like(pck)
        kept[np.arange(q), best] = pck[np.arange(q), best]
        winner = kept.argmax(0)  # (P,) per person its best prediction
        won = kept[winner, np.arange(p)] > 0
        labels[winner[won]] = match[winner[won], np.nonzero(won)[0]]
    return labels & has, has, has_gt.sum(0)


def average_precision(scores: np.ndarray, labels: np.ndarray, n_positive: int) -> float:
    """(N,) scores, (N,) bool labels, positives in the set -> AP in [0, 1]: precision/recall in
    descending score order, stable on ties and NaN first like Matlab's sort (official toolkit:
    getRPC), area under the monotone envelope over all points (VOCap).  NaN without positives."""
    if n_positive == 0:
        return float("nan")
    key = np.where(np.isnan(scores), np.inf, scores)
    tp = np.cumsum(labels[np.argsort(-key, kind="stable")])
    precision = np.concatenate([[0.0], tp / np.arange(1, len(tp) + 1), [0.0]])
    recall = np.concatenate([[0.0], tp / n_positive, [1.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    step = np.nonzero(recall[1:] != recall[:-1])[0] + 1
    return float(((recall[step] - recall[step - 1]) * precision[step]).sum())


def evaluate_mpii(gt: list[Group], pred: list[Group], thresh: float = MPII_PCKH) -> dict:
    """Multi-person AP (official toolkit: evaluateAP) of pred against gt, paired by position ->
    {"joints": {name: AP %} for the 14 scored joints, "table": {Head .. Ankle, Total: AP %},
    "mAP": Total, "groups", "people"}.  Per joint every predicted joint of the set is pooled and
    ranked by its own score."""
    if len(gt) != len(pred):
        raise ReproError(f"{len(pred)} predicted groups for {len(gt)} ground-truth groups: the "
                         "toolkit pairs them by position, so both lists must come from the same "
                         "group list")
    scores, labels, n_gt = [], [], np.zeros(len(MPII_SCORED), np.int64)
    for i, (g, p) in enumerate(zip(gt, pred)):
        if g.image and p.image and g.image != p.image:
            raise ReproError(f"group {i + 1}: prediction for {p.image} "
                             f"but ground truth for {g.image}")
        lab, has, n = assign_group(g, p, thresh)
        s = p.scores[:, MPII_SCORED] if p.scores is not None else np.ones(has.shape, np.float32)
        scores.append(np.where(has, s, np.nan)), labels.append(
            np.where(has, lab, -1).astype(np.int8))
        n_gt += n
    scores = np.concatenate(scores + [np.zeros((0, len(MPII_SCORED)))])
    labels = np.concatenate(labels + [np.zeros((0, len(MPII_SCORED)), np.int8)])
    ap = {}
    for c, j in enumerate(MPII_SCORED):  # per joint, only the predictions that have it
        present = labels[:, c] >= 0
        ap[MPII_JOINTS[j]] = 100 * average_precision(scores[present, c], labels[present, c] == 1,
                                                     int(n_gt[c]))
    table = {row: (ap[MPII_JOINTS[a]] + ap[MPII_JOINTS[b]]) / 2 for row, (a, b) in MPII_TABLE}
    table["Total"] = float(np.mean(list(ap.values())))
    return dict(joints=ap, table=table, mAP=table["Total"], groups=len(gt),
                people=sum(len(g.joints) for g in gt))


def format_mpii_table(result: dict) -> str:
    """The toolkit's table: Head Shoulder Elbow Wrist Hip Knee Ankle Total, AP in % to 1 decimal."""
    names = [row for row, _ in MPII_TABLE] + ["Total"]
    width = max(map(len, names)) + 1
    return ("".join(f"{n:>{width}}" for n in names) + "\n"
            + "".join(f"{result['table'][n]:>{width}.1f}" for n in names))


def check_mpii_inputs(gt: list[Group], pred: list[Group], gt_path: Path, pred_path: Path) -> None:
    """What would score silently wrong: swapped files (ground truth has head boxes, predictions have
    scores) and NaN in predicted joints (the toolkit would count them as false positives)."""
    def boxed(groups):
        return any(np.isfinite(g.head_boxes).all(1).any() for g in groups)

    def scored(groups):
        return any(g.scores is not None for g in groups)
    if not boxed(gt) and any(len(g.joints) for g in gt):
        if boxed(pred) or scored(gt):
            raise ReproError(f"the arguments look swapped: {gt_path} has scores and no head "
                             f"boxes, {pred_path} has head boxes: "
                             "the order is --score-mpii PRED GT")
        raise ReproError(f"{gt_path} has no head boxes (x1 y1 x2 y2), which PCKh needs: "
                         "not a ground-truth list")
    present = np.concatenate([g.joints[..., 2] > 0 for g in pred]
                             + [np.zeros((0, MPII_NUM_JOINTS), bool)])
    xy = np.concatenate([g.joints[..., :2] for g in pred]
                        + [np.zeros((0, MPII_NUM_JOINTS, 2), np.float32)])
    bad_xy = int((present & ~np.isfinite(xy).all(-1)).sum())
    bad_score = sum(int((g.joints[..., 2] > 0)[~np.isfinite(g.scores)].sum())
                    for g in pred if g.scores is not None)
    if bad_xy or bad_score:
        raise ReproError(f"{pred_path}: {bad_xy} of {int(present.sum())} predicted joints have NaN "
                         f"or infinite coordinates and {bad_score} a NaN score: leave a joint out "
                         "of annopoints.point instead")


def score_mpii_files(pred_path: str | Path, gt_path: str | Path) -> dict:
    """Scores a prediction list (.mat with pred, or our .json) against a ground-truth list; prints
    the table and a last line "mAP <AP %, 1 decimal as in the toolkit's table>"."""
    import filecmp

    with contextlib.suppress(OSError):  # a missing file is named by read_annolist
        if filecmp.cmp(pred_path, gt_path, shallow=False):
            raise ReproError(f"{pred_path} and {gt_path} are identical: the ground truth scored "
                             "against itself gives 100; give the predictions, then the truth")
    gt, pred = read_annolist(gt_path), read_annolist(pred_path)
    check_mpii_inputs(gt, pred, Path(gt_path), Path(pred_path))
    result = evaluate_mpii(gt, pred)
    print(f"MPII multi-person AP (PCKh {MPII_PCKH}), {result['groups']} groups, "
          f"{result['people']} people")
    print(format_mpii_table(result))
    print(f"mAP {result['mAP']:.1f}")
    return result


# -- writing predictions in the toolkit's pred layout
def _pred_entries(groups: list[Group]) -> list[dict]:
    """pred(i).image.name, pred(i).annorect(k).annopoints.point(j) x y id score as plain dicts.
    Only joints with v > 0 are written (absent ids are the toolkit's missing joints); people with
    none are left out (they can match nobody); scores default to 1 where a Group has none."""
    out = []
    for g in groups:
        rects = []
        for k in range(len(g.joints)):
            ids = np.nonzero(g.joints[k, :, 2] > 0)[0]
            if len(ids) == 0:
                continue
            s = g.scores[k, ids] if g.scores is not None else np.ones(len(ids))
            rects.append([dict(x=float(g.joints[k, j, 0]), y=float(g.joints[k, j, 1]), id=float(j),
                               score=float(sc)) for j, sc in zip(ids, s)])
        out.append(dict(name=g.image, rects=rects))
    return out


def _struct_array(rows: list[dict], fields: tuple[str, ...]) -> np.ndarray:
    """A list of dicts -> a numpy record array that savemat writes as a 1 x N struct array."""
    arr = np.empty(len(rows), dtype=[(f, object) for f in fields])
    for i, r in enumerate(rows):
        arr[i] = tuple(r[f] for f in fields)
    return arr


def write_pred_mat(path: str | Path, groups: list[Group]) -> None:
    """Predictions as the toolkit's `pred` (evaluateAP loads pred_keypoints_mpii_multi.mat),
    atomically."""
    import scipy.io

    path = Path(path)
    pred = _struct_array([dict(image=dict(name=e["name"]), annorect=_struct_array(
        [dict(annopoints=dict(point=_struct_array(pts, ("x", "y", "id", "score"))))
         for pts in e["rects"]],
        ("annopoints",))) for e in _pred_entries(groups)], ("image", "annorect"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savemat would append .mat
        scipy.io.savemat(f, {"pred": pred}, do_compression=True)


def write_pred_json(path: str | Path, groups: list[Group]) -> None:
    """The same `pred` layout as json (read back by read_annolist), atomically."""
    path = Path(path)
    pred = [dict(image=dict(name=e["name"]),
                 annorect=[dict(annopoints=dict(point=pts)) for pts in e["rects"]])
            for e in _pred_entries(groups)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"pred": pred}))


MPII_BASE = 41 / 35  # paper code: the inference scale of a group is (41/35) / its mean MPII scale


def groups_of_records(kset: KeypointSet) -> list[Group]:
    """MPII ground truth of a COCO-format set with MPII joints (the demo): one group per image.
    [ours] Rendered people have no head box: a square with the head top - upper neck distance as
    its side, centred between them, stands in (MPII's boxes frame the head similarly)."""
    groups = []
    for rec in kset.records:
        joints = MPII.to_joints(rec.keypoints)
        top, neck = joints[:, 9, :2], joints[:, 8, :2]
        half = np.linalg.norm(top - neck, axis=1, keepdims=True) / 2
        middle = (top + neck) / 2
        labelled = (joints[:, 9, 2] > 0) & (joints[:, 8, 2] > 0)
        boxes = np.where(labelled[:, None], np.concatenate([middle - half, middle + half], 1),
                         np.nan)
        centre = rec.boxes[:, :2] + rec.boxes[:, 2:] / 2
        groups.append(Group(rec.path.name, joints, boxes.astype(np.float32), rec.boxes[:, 3] / 200,
                            centre.astype(np.float32)))
    return groups


# -- the stand-in benchmark in MPII's own layout: a rehearsal of --mpii-root before the real data
MPII_RELEASE = "mpii_human_pose_v1_u12_1.mat"  # official release: the annotation file's name


# [ours] every 10th rehearsal image is a test image (img_train 0, no joints), as in the release
MPII_TEST_EVERY = 10


MPII_NO_VISIBILITY = (8, 9)  # official release: is_visible is empty for upper neck and head top


# [ours] the rehearsal set: 640 px scenes of 2+ stand-in people (about 4), MPII's 16 joints
MPII_REHEARSAL = dict(kind="scenes", num_images=300, seed=5000, style="standin", image_size=640,
                      mean_people=4.0, min_people=2, camera_distance=(8.0, 1.0), skeleton="mpii")


def single_people(boxes: np.ndarray) -> np.ndarray:
    """(P, 4) person boxes x, y, w, h -> 1-based ids of the people whose box, grown by half its
    height on every side, meets no other person's box: [ours] MPII's single_person lists
    sufficiently separated people, and its multi-person groups are the others."""
    margin = boxes[:, 3:] / 2
    lo, hi = boxes[:, :2] - margin, boxes[:, :2] + boxes[:, 2:] + margin
    meets = ((lo[:, None] <= (boxes[:, :2] + boxes[:, 2:])[None])
             & (hi[:, None] >= boxes[None, :, :2])).all(-1)
    meets |= meets.T
    np.fill_diagonal(meets, False)
    return np.nonzero(~meets.any(1))[0] + 1


def _release_rect(g: Group, k: int, test: bool) -> dict:
    """One person as RELEASE.annolist(i).annorect(k);
    a test image's people have only scale and objpos."""
    rect = dict(scale=float(g.scales[k]),
                objpos=dict(x=float(g.objpos[k, 0]), y=float(g.objpos[k, 1])))
    if test:
        return rect
    points = [dict(x=float(x), y=float(y), id=float(j),
                   is_visible=np.zeros((0, 0)) if j in MPII_NO_VISIBILITY else float(v == 2))
              for j, (x, y, v) in enumerate(g.joints[k]) if v > 0]
    x1, y1, x2, y2 = (float(c) for c in g.head_boxes[k])
    return rect | dict(x1=x1, y1=y1, x2=x2, y2=y2, annopoints=dict(
        point=_struct_array(points, ("x", "y", "id", "is_visible")))
        if points else np.zeros((0, 0)))


def write_release(path: str | Path, kset: KeypointSet) -> None:
    """A COCO-format set with MPII joints -> the official RELEASE struct (annolist, img_train,
    single_person), atomically: head boxes, scales and centres as groups_of_records makes them."""
    import scipy.io

    annolist, img_train, single = [], [], np.empty(len(kset.records), dtype=object)
    for i, (rec, g) in enumerate(zip(kset.records, groups_of_records(kset))):
        test = i % MPII_TEST_EVERY == MPII_TEST_EVERY - 1
        # a training person needs a head box to be scored
        keep = np.isfinite(g.head_boxes).all(1) | test
        g = _subset(g, keep)
        rects = [_release_rect(g, k, test) for k in range(len(g.joints))]
        fields = (("scale", "objpos") if test
                  else ("x1", "y1", "x2", "y2", "scale", "objpos", "annopoints"))
        annolist.append(dict(image=dict(name=g.image),
                             annorect=_struct_array(rects, fields) if rects
                             else np.zeros((0, 0))))
        img_train.append(0.0 if test else 1.0)
        single[i] = (np.zeros((0, 1)) if test
                     else single_people(rec.boxes[keep]).astype(np.float64)[:, None])
    release = dict(annolist=_struct_array(annolist, ("image", "annorect")),
                   img_train=np.array(img_train), single_person=single, version="12")
    # a file object: savemat would append .mat
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        scipy.io.savemat(f, {"RELEASE": release}, do_compression=True)


def write_mpii_rehearsal(out: Path, source: KeypointSet | None = None) -> Path:
    """The MPII root `--mpii-root out` reads: out/mpii_human_pose_v1_u12_1.mat and out/images/. By
    default MPII_REHEARSAL is rendered into out first (render_humans.py; its annotations.json and
    parts/ stay beside); a given source set's images are copied in."""
    out = Path(out)
    if source is None:
        json_path = Path(rh.render_dataset(out, progress=True, **MPII_REHEARSAL))
        source = load_keypoint_set(json_path, out / "images", MPII)
    else:
        (out / "images").mkdir(parents=True, exist_ok=True)
        for rec in source.records:
            if rec.path.resolve() != (out / "images" / rec.path.name).resolve():
                shutil.copy2(rec.path, out / "images" / rec.path.name)
    write_release(out / MPII_RELEASE, source)
    return out


def predicted_group(truth: Group, people: list[tuple[np.ndarray, float]]) -> Group:
    """Decoded people -> an MPII prediction for one group; each joint is scored by its own peak.
    [ours] Official groups are parts of an image: a predicted person counts for the group when the
    mean of its joints lies in the group's region, the union of squares 200 x scale px around each
    person's objpos (the toolkit would count every other prediction as a false positive)."""
    joints = np.array([kp for kp, _ in people], np.float32).reshape(-1, MPII.num_joints, 3)
    found = joints[..., 2] > 0
    if len(joints) and np.isfinite(truth.objpos).all() and len(truth.objpos):
        half = 100 * truth.scales[:, None]
        lo, hi = (truth.objpos - half).min(0), (truth.objpos + half).max(0)
        centre = ((joints[..., :2] * found[..., None]).sum(1)
                  / np.maximum(found.sum(1, keepdims=True), 1))
        inside = ((centre >= lo) & (centre <= hi)).all(1)
        joints, found = joints[inside], found[inside]
    scores = np.where(found, joints[..., 2], 0).astype(np.float32)
    joints[..., 2] = np.where(found, 2, 0)
    n = len(joints)
    return Group(truth.image, joints, np.full((n, 4), np.nan, np.float32),
                 np.full(n, np.nan, np.float32), np.full((n, 2), np.nan, np.float32), scores)


class MpiiBenchmark(CocoBenchmark):
    """MPII multi-person: the official RELEASE and annotation lists, the toolkit's AP,
    its pred files."""

    def load_val(self, json_path: str | Path, images: str | Path, sk: Skeleton) -> KeypointSet:
        if str(json_path).endswith(".mat"):
            return load_mpii_annolist(Path(json_path), Path(images))
        return load_keypoint_set(json_path, images, sk)

    def load_root(self, root: Path) -> tuple[KeypointSet, KeypointSet]:
        """--mpii-root (which check_config allows with --skeleton mpii only)."""
        return load_mpii(root)

    def base_scale(self, rec: ImageRecord, cfg: Config) -> float | None:
        if not len(rec.boxes):
            return None
        # paper code: (41/35) / the group's mean MPII scale (person height / 200 px), for a
        # 368 input; [ours] times input_size / 368, so that people come out as tall as in the
        # training crops
        return MPII_BASE / float(np.mean(rec.boxes[:, 3] / 200)) * cfg.input_size / 368

    def score(self, kset: KeypointSet,
              people: list[list[tuple[np.ndarray, float]]]) -> tuple[dict, list]:
        truth = (kset.groups or groups_of_records(kset))[:len(people)]
        predictions = [predicted_group(g, found) for g, found in zip(truth, people)]
        result = evaluate_mpii(truth, predictions)
        return dict(mAP=result["mAP"],
                    **{k: v for k, v in result["table"].items() if k != "Total"}), predictions

    def table(self, stats: dict, label: str) -> str:
        return (f"\nMPII multi-person AP (PCKh {MPII_PCKH}) on the {label}, "
                f"{stats.get('images', '?')} groups\n"
                + format_mpii_table(dict(table=stats | dict(Total=stats["mAP"])))
                + f"\npeak_hit {stats['peak_hit']:.3f}")

    def headline(self, stats: dict) -> str:
        return f"MPII mAP {stats['mAP']:.1f}"

    def write_predictions(self, out: Path, predictions: list) -> None:
        # the toolkit's Matlab code scores these too
        write_pred_mat(out / "val_predictions.mat", predictions)
        write_pred_json(out / "val_predictions.json", predictions)

    def image_predictions(self, name: str, people: list[tuple[np.ndarray, float]]) -> list:
        return [predicted_group(empty_group(name), people)]

    def write_image_predictions(self, out: Path, predictions: list) -> list[str]:
        write_pred_mat(out / "predictions.mat", predictions)
        return ["predictions.mat"]



def mpii_release_job(cfg: Config, args: argparse.Namespace) -> None:
    out = write_mpii_rehearsal(Path(args.write_mpii_release))
    print(f"MPII-layout rehearsal set: {out / MPII_RELEASE} and {out / 'images'}; train on it with "
          f"python repro.py --preset paper --mpii-root {out}")


def score_mpii_job(cfg: Config, args: argparse.Namespace) -> None:
    score_mpii_files(*args.score_mpii)


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints, the shipped student
# ----------------------------------------------------------------------------------------------

# the renderer's atomic writer (a temporary file renamed into place), failing as one ReproError line
atomic_path = functools.partial(rh.atomic_path, error=ReproError)


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) checkpoint: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return sum(tensor_bytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


# how torch.save reports a full disk, besides ENOSPC: its zip writer's own messages
DISK_FULL_WORDS = ("unexpected pos", "file write failed", "No space left")


def save_atomic(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except (OSError, RuntimeError) as e:
            full = getattr(e, "errno", None) == errno.ENOSPC
            if not full and not any(w in str(e) for w in DISK_FULL_WORDS):
                raise
            needed, free = tensor_bytes(obj), shutil.disk_usage(path.parent).free
            raise OSError(errno.ENOSPC, f"no space left on the device: {needed / 1e6:.1f} MB "
                          f"needed, {free / 1e6:.1f} MB free") from None


def write_json(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


ARCH_KEYS = ("arch", "stages", "width", "input_size", "stride", "skeleton")


# The demo's initial student: the claims protocol's full-regime real-only student in half
# precision, made by `python repro.py --export-student runs/protocol/full/student/ckpt.pt --out
# results/student-demo.pt`.
SHIPPED_STUDENT = Path(__file__).resolve().parent / "results" / "student-demo.pt"


def tracked_name(path: Path) -> str:
    """A tracked file's path from the repository root, as commands and records write it on any
    machine."""
    return str(path.relative_to(SHIPPED_STUDENT.parents[1]))


# A demo fine-tune that names none of these settings: paper code: the real-only student is
# fine-tuned with Adam at 5e-5, first lowered after 20k steps, so constant over any fine-tune here.
# The protocol's fine-tunes name their own 3e-4 cosine (PROTOCOL_FINETUNE in
# results/protocol/claims.py).
FINETUNE = dict(lr=5e-5, lr_schedule="constant")


def shipped_student_fits(cfg: Config) -> bool:
    try:
        saved = load_checkpoint(SHIPPED_STUDENT).get("config", {})
    except ReproError:  # absent or unreadable: train from scratch
        return False
    return isinstance(saved, dict) and all(saved.get(k) == getattr(cfg, k) for k in ARCH_KEYS)


def export_student(ckpt_path: str, out: Path = SHIPPED_STUDENT, replace: bool = False) -> None:
    """A training checkpoint -> a student: weights in float16, config and step, nothing else. An
    existing `out` is replaced only when asked to (the protocol does; the command line's --out)."""
    ckpt = load_checkpoint(ckpt_path)
    model = checked_weights(ckpt, ckpt_path)
    checkpoint_arch(ckpt.get("config"), Config(), ckpt_path)
    if not isinstance(ckpt.get("step"), int):
        raise ReproError(f"{ckpt_path} has no 'step' of a repro.py training checkpoint")
    out = Path(out)
    if out.exists() and not replace:
        raise ReproError(f"{out} exists and is not replaced unless named: pass --out {out} to "
                         "replace it, or --out PATH for a new file")
    if out.is_dir():
        raise ReproError(f"--out {out} is a folder: name the file to write, e.g. "
                         f"{out / 'student.pt'}")
    weights = {k: v.half() if v.is_floating_point() else v for k, v in model.items()}
    save_atomic(dict(model=weights, config=ckpt["config"], step=ckpt["step"],
                     source=str(ckpt_path)), out)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, step {ckpt['step']}")


def export_student_job(cfg: Config, args: argparse.Namespace) -> None:
    # an --out the user names is theirs to replace; the default never is
    export_student(args.export_student, Path(cfg.out or SHIPPED_STUDENT), replace=bool(cfg.out))


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's dict, read with torch's safe loader: tensors and plain values only, so a
    crafted file cannot run code. Checkpoints of repro.py before weights_only (numpy arrays in a
    teacher's state) are refused with what to do."""
    path = Path(path)
    if not path.is_file():
        raise ReproError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip, or its older pickle
            raise ReproError(f"{path} is not a checkpoint (a file written by torch.save)")
        with warnings.catch_warnings():  # a raw pickle's protocol note, said before our own line
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except ReproError:
        raise
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if not found:
            raise ReproError(f"cannot read checkpoint {path} (UnpicklingError): corrupt or not a "
                             "repro.py checkpoint") from None
        what = found.group(1)
        raise ReproError(f"refused checkpoint {path}: it holds {what}, which only an unsafe load "
                         "(one that can run code) reads; older repro.py versions wrote numpy "
                         "arrays into student-teacher checkpoints: such a run must be trained "
                         "again with this version") from None
    except Exception as e:
        raise ReproError(f"cannot read checkpoint {path} ({type(e).__name__}): corrupt or not a "
                         "repro.py checkpoint") from None
    if not isinstance(ckpt, dict):
        raise ReproError(f"{path} holds a {type(ckpt).__name__}, not a repro.py checkpoint (a dict "
                         "with 'model')")
    return ckpt


def valid_setting(name: str, value) -> bool:
    """Whether a value read from a file could have been given as the Config field's flag: its type
    and choices, as argparse checks them."""
    default = getattr(Config(), name)
    choices = Config.__dataclass_fields__[name].metadata["choices"]
    if isinstance(default, bool) or default is None or isinstance(default, str):
        kinds = (bool,) if isinstance(default, bool) else (str,)
    else:
        kinds = (int, float) if isinstance(default, float) else (type(default),)
    plain = isinstance(value, kinds) and (isinstance(default, bool) or not isinstance(value, bool))
    return plain and (choices is None or value in choices)


def checkpoint_arch(saved, cfg: Config, path) -> Config:
    """cfg with the network a checkpoint's (or an ONNX model's) config describes, checked as the
    command line's flags are (types, choices, check_config): a stranger's file is an input too."""
    if not isinstance(saved, dict):
        raise ReproError(f"{path} has a 'config' that is a {type(saved).__name__}, not a dict: "
                         "not a repro.py checkpoint")
    bad = [k for k in ARCH_KEYS if k in saved and not valid_setting(k, saved[k])]
    if bad:
        values = ", ".join(f"{config_flag(k)} {saved[k]!r}" for k in bad)
        raise ReproError(f"{path} has a config that cannot run: {values}")
    arch = dataclasses.replace(cfg, **{k: saved[k] for k in ARCH_KEYS if k in saved})
    try:
        check_config(arch)
    except ReproError as e:
        raise ReproError(f"{path} has a config that cannot run: {e}") from None
    return arch


def checked_weights(ckpt: dict, path) -> dict:
    """A checkpoint's 'model', refused unless a dict of named tensors."""
    model = ckpt.get("model")
    named = isinstance(model, dict) and all(isinstance(k, str) for k in model)
    if not named or not model or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise ReproError(f"{path} holds no network weights ('model': a dict of tensors): not a "
                         "repro.py training checkpoint")
    return model


def load_weights(model: nn.Module, ckpt: dict, cfg: Config, path) -> None:
    saved = ckpt.get("config", {})
    checkpoint_arch(saved, cfg, path)
    weights = checked_weights(ckpt, path)
    differ = [f"{config_flag(k)} {saved[k]} (this run: {getattr(cfg, k)})"
              for k in ARCH_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if differ:
        raise ReproError(f"checkpoint {path} is of another architecture: it has "
                         + ", ".join(differ))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ReproError(f"checkpoint {path} does not fit this network: "
                         f"{str(e).splitlines()[0]}") from None


def model_from_checkpoint(cfg: Config, path: str | Path, device) -> tuple[nn.Module, Config, dict]:
    """A checkpoint's network with its weights (--mode eval, predict, --export-onnx), cfg with the
    checkpoint's architecture, and the checkpoint."""
    ckpt = load_checkpoint(path)
    cfg = checkpoint_arch(ckpt.get("config", {}), cfg, path)
    checked_weights(ckpt, path)
    model = build_model(cfg).to(device).to(memory_format=torch.channels_last)
    load_weights(model, ckpt, cfg, path)
    return model, cfg, ckpt


def read_jsonl(path: Path) -> list[dict]:
    """A metrics log's records. A cut last line, what a killed run or a full disk leaves, is read
    past and said; a bad line before it is refused in one line."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] \
        if path.is_file() else []
    records = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif i == len(lines):
            print(f"{path}: its last line is cut off (a killed run or a full disk): read up to "
                  "the one before")
        else:
            raise ReproError(f"{path}: line {i} is not a metrics record ({line[:40]!r}): not "
                             "written by repro.py")
    return records


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        # one write per line: a cut run loses whole lines
        f.write(json.dumps(record, default=float) + "\n")


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib on its headless backend, imported only when a figure is drawn
    (it is slow to import)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    """A finished figure laid out, written atomically (a cut-off write keeps the previous file) and
    closed: every figure of the project ends here."""
    fig.tight_layout()
    with atomic_path(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, dpi=110)
    pyplot().close(fig)


def save_predictions_figure(model: nn.Module, kset: KeypointSet, cfg: Config, device, path: Path,
                            n: int = 8) -> None:
    model.eval()
    tiles = []
    for i in range(min(n, len(kset.records))):
        image = kset.image(i)
        maps, base = network_maps(model, image, cfg, device,
                                  kset.skeleton.benchmark.base_scale(kset.records[i], cfg))
        tile = draw_people(image, decode_maps(maps, base, kset.skeleton))
        tiles.append(cv2.resize(tile, (256, round(256 * tile.shape[0] / tile.shape[1]))))
    model.train()
    write_image(path, tile_grid(tiles))


def tile_grid(tiles: list[np.ndarray], columns: int = 4) -> np.ndarray:
    """Tiles of one width in rows of `columns`, padded with black to the tallest."""
    h = max(t.shape[0] for t in tiles)
    tiles = [cv2.copyMakeBorder(t, 0, h - t.shape[0], 0, 0, cv2.BORDER_CONSTANT) for t in tiles]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % columns)
    return np.vstack([np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)])


def save_curves(metrics_path: Path, path: Path, title: str) -> None:
    plt = pyplot()

    rows = read_jsonl(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(xlabel="step", ylabel="training loss (all stages)", yscale="log", title=title)
    axes[1].plot([r["minutes"] for r in train], [r["peak_hit"] for r in train],
                 label="train peak-hit")
    for key, marker in (("AP", "o-"), ("AP50", "s-"), ("mAP", "o-")):  # COCO, or MPII's mAP in %
        points = [(r["minutes"], r["eval"][key] / (100 if key == "mAP" else 1))
                  for r in evals if key in r["eval"]]
        if points:
            axes[1].plot(*zip(*points), marker,
                         label=f"val {key}" + (" / 100" if key == "mAP" else ""))
    axes[1].set(xlabel="training minutes", ylim=(0, 1))
    axes[1].legend()
    save_figure(fig, path)


def bin_colours(bins: int) -> np.ndarray:
    """One colour per teacher bin, the same in every figure."""
    return pyplot().cm.viridis(np.linspace(0, 1, bins))


def plot_bin_probabilities(ax, steps, probs: np.ndarray, labels: list[str]) -> None:
    """A teacher's output over training, stacked: (updates, bins) probabilities,
    one band per bin."""
    ax.stackplot(steps, probs.T, colors=bin_colours(probs.shape[1]), labels=labels)
    ax.set(ylim=(0, 1), xlim=(0, steps[-1]))


def save_teacher_plot(teacher: Teacher, path: Path) -> None:
    """The paper's "informative samples change over training" figure:
    bin probabilities over steps."""
    plt = pyplot()

    records = teacher.records
    if not records or not teacher.learns:
        return
    steps = [r["step"] for r in records]
    probs = np.array([r["probs"] for r in records])
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True,
                             gridspec_kw=dict(height_ratios=[3, 1]))
    plot_bin_probabilities(axes[0], steps, probs, [f"{e:.0f}" for e in teacher.edges()])
    axes[0].set(ylabel="teacher bin probability",
                title=f"teacher's bins of {teacher.cfg.teacher_attribute} over training")
    axes[0].legend(title="bin lower edge", fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[1].plot(steps, [r["bin"] for r in records], ".", ms=4)
    axes[1].set(xlabel="student step", ylabel="picked bin", ylim=(-0.5, teacher.bins - 0.5))
    save_figure(fig, path)


def check_out(out: Path, folder: bool) -> None:
    """Refuses, before any work, an --out that cannot be written: a file where a folder is meant
    or the other way round, a path under a file, a read-only folder. Creates nothing. Its writers
    make their output beside `out` and rename it onto it: out's folder is the one written."""
    if out.exists() and out.is_dir() != folder:
        raise ReproError(f"--out {out} is a file" if folder else f"--out {out} is a folder: name "
                         f"the file to write, e.g. {out / 'compare.png'}")
    there = next(p for p in out.absolute().parents if p.exists())
    if not there.is_dir():
        raise ReproError(f"--out {out} is under {there}, a file")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ReproError(f"--out {out}: {there} is not writable")


def compared_run(run: Path) -> tuple[list[dict], str]:
    """A run folder's evaluations and command, for --compare; refused in one line where they are
    missing or not a run's."""
    if not (run / "metrics.jsonl").is_file():
        raise ReproError(f"{run} is not a run folder (no metrics.jsonl)")
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval" in r]
    if not evals:
        raise ReproError(f"{run} holds no evaluation yet")
    if any(not isinstance(e.get("minutes"), (int, float)) or not isinstance(e.get("step"), int)
           or not isinstance(e["eval"], dict) for e in evals):
        raise ReproError(f"{run / 'metrics.jsonl'} has an evaluation without its minutes, step or "
                         "numbers: not written by repro.py")
    try:
        argv = json.loads((run / "config.json").read_text()).get("argv", [])
    except (OSError, ValueError, AttributeError) as e:
        raise ReproError(f"{run} has no readable config.json ({type(e).__name__}): not a run "
                         "folder of repro.py") from None
    return evals, "python repro.py " + " ".join(map(str, argv[1:]))


def compare_runs(run_dirs: list[str], out: Path) -> str:
    """Figure (val AP, AP50, peak-hit against training minutes) and markdown table of runs."""
    runs = {run: compared_run(run) for run in map(Path, run_dirs)}
    check_out(out, folder=False)
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    lines = ["| run | command | minutes | steps | AP | AP50 | AP75 | AR | val peak-hit |",
             "|---" * 9 + "|"]
    for run, (evals, command) in runs.items():
        minutes = [e["minutes"] for e in evals]
        for ax, key in zip(axes, ("AP", "AP50", "peak_hit")):  # MPII runs have none of COCO's APs
            ax.plot(minutes, [e["eval"].get(key, np.nan) for e in evals], "o-", label=run.name)
            ax.set(xlabel="training minutes", title=f"val {key}")
        last = evals[-1]  # the final evaluation, or the last one of a run that was stopped
        e = {k: last["eval"].get(k, np.nan) for k in ("AP", "AP50", "AP75", "AR", "peak_hit")}
        lines.append(f"| {run.name} | `{command}` | {last['minutes']:.1f} | {last['step']} | "
                     f"{e['AP']:.4f} | {e['AP50']:.4f} | {e['AP75']:.4f} | {e['AR']:.4f} | "
                     f"{e['peak_hit']:.3f} |")
    axes[-1].legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out)
    table = "\n".join(lines) + "\n"
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(table)
    print(table)
    return table


def compare_job(cfg: Config, args: argparse.Namespace) -> None:
    compare_runs(args.compare, Path(cfg.out or "runs/compare.png"))


# ----------------------------------------------------------------------------------------------
# Benchmark: is the data pipeline ever the bottleneck? is grouping cheaper than the network?
# ----------------------------------------------------------------------------------------------

def seconds_per_call(fn, n: int, warmup: int = 0) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as in a loader worker, then back to the caller's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def loader_samples_per_second(maker: BatchMaker, cfg: Config, workers: int,
                              rounds: int = 3) -> float:
    """Samples per second that `workers` loader processes deliver, as training draws them
    (Trainer.batches). Timed from the end of the first round, one batch per worker, which holds
    the workers' start, to the end of `rounds` more."""
    steps = StepBatches(maker, cfg.batch_size, cfg.seed, 0, (rounds + 1) * workers)
    loader = torch.utils.data.DataLoader(steps, batch_size=None, num_workers=workers,
                                         prefetch_factor=2, worker_init_fn=quiet_worker)
    t = 0.0
    for i, _ in enumerate(loader):
        if i == workers - 1:
            t = time.perf_counter()
    return rounds * workers * cfg.batch_size / (time.perf_counter() - t)


def bench_pipeline(cfg: Config, maker: BatchMaker) -> dict:
    """The data pipeline alone, per sample at cfg's geometry: crops and pasting, targets and masks
    (on one thread, as a loader worker makes them), and the samples per second of 1, 2, ... N loader
    workers (N: the cores this process may use)."""
    rng = np.random.default_rng(0)
    specs = maker.plan(cfg.batch_size, rng)
    _, keypoints, pasted, ignore = map(torch.as_tensor,
                                       collate([maker.sample(spec, rng) for spec in specs]))
    with one_thread():  # a loader worker's share of the machine
        crop_s = seconds_per_call(lambda: collate([maker.sample(spec, rng) for spec in specs]), 5)
        target_s = seconds_per_call(lambda: make_targets(keypoints, pasted, ignore, cfg), 10,
                                    warmup=1)
    figures = dict(crop_and_paste_ms_per_sample=crop_s / cfg.batch_size * 1e3,
                   target_ms_per_sample=target_s / cfg.batch_size * 1e3)
    for workers in range(1, len(os.sched_getaffinity(0)) + 1):
        figures[f"loader_samples_s_{workers}_workers"] = loader_samples_per_second(maker, cfg,
                                                                                   workers)
    return figures


def bench(cfg: Config, data: Data, device: torch.device, steps: int = 20) -> dict:
    cfg = dataclasses.replace(cfg, mode="augmented", steps=steps + 3)
    header = (f"\nbench on {device} ({torch.get_num_threads()} threads), preset {cfg.preset}, "
              f"arch {cfg.arch}, batch {cfg.batch_size}, input {cfg.input_size}, "
              f"eval scales {cfg.eval_scales}, {precision(device, cfg)}")
    pipeline = bench_pipeline(cfg, BatchMaker(data, cfg))
    if device.type == "cpu" and cfg.arch == "openpose":
        # A step of the paper's VGG-19 network at 368 px takes tens of seconds on a few cores.
        print(header + "\n  the network is not timed: the paper's VGG-19 student is timed on a GPU "
              "(--device cuda)")
        for k, v in pipeline.items():
            print(f"  {k:32s} {v:10.2f}")
        return pipeline
    # with --init: grouping is timed on a trained net's maps
    trainer = Trainer(cfg, data, device, Path("."))
    maker, model = trainer.maker, trainer.model
    rng = np.random.default_rng(0)
    specs = maker.plan(cfg.batch_size, rng)
    fixed = maker.batch(specs, rng)  # pre-made: crops, targets and masks all ready
    # with --compile: compiling
    first_s = seconds_per_call(lambda: trainer.train_step(fixed, cfg.lr), 1)
    premade_s = seconds_per_call(lambda: trainer.train_step(fixed, cfg.lr), steps, warmup=2)
    stream = (b for _, b in trainer.batches())
    streamed_s = seconds_per_call(lambda: trainer.train_step(next(stream), cfg.lr), steps, warmup=3)
    premade, end_to_end = cfg.batch_size / premade_s, cfg.batch_size / streamed_s

    model.eval()
    forward_s = group_s = 0.0
    n = min(20, len(data.val.records))
    for i in range(n):
        image = data.val.image(i)
        t = time.perf_counter()
        maps, base = network_maps(model, image, cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        decode_maps(maps, base, skeleton(cfg))
        forward_s, group_s = forward_s + t2 - t, group_s + time.perf_counter() - t2
    figures = dict(first_step_s=first_s, **pipeline,
                   train_img_s_end_to_end=end_to_end, train_img_s_premade=premade,
                   pipeline_ratio=end_to_end / premade, forward_ms_per_image=forward_s / n * 1e3,
                   grouping_ms_per_image=group_s / n * 1e3)
    print(header)
    for k, v in figures.items():
        print(f"  {k:32s} {v:10.2f}")
    return figures


def bench_job(cfg: Config, args: argparse.Namespace) -> None:
    device = start_job(cfg)[2]
    bench(cfg, load_data(cfg), device)


# ----------------------------------------------------------------------------------------------
# Predict: a trained student on your own images and videos; its network as an ONNX model
# ----------------------------------------------------------------------------------------------

# [ours] what cv2.imread decodes
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# [ours] cv2's ffmpeg reads
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


# [ours] video frames per forward pass: on the 2-core machine the demo network ran about 1.4x faster
# per image in bf16 with batches of 4 than one by one (and no faster with 8, nor in float32)
PREDICT_BATCH = 4


VIDEO_FALLBACK_FPS = 30.0  # [ours] where a video does not say its frame rate


ONNX_OPSET = 17  # [ours] the legacy exporter's well-tested opset; onnxruntime 1.31 runs it


# [ours] largest max abs difference of the maps (heat in [0, 1]) accepted from onnxruntime
ONNX_TOLERANCE = 1e-3


# [ours] overview.png: the first 8 images in 176 x 132 (under 300 KB)
OVERVIEW_IMAGES, OVERVIEW_BOX = 8, (176, 132)


# what predict writes beside the images
PREDICT_FILES = ("predictions.json", "predictions.mat", "overview.png")


def decoded_image(path: Path) -> np.ndarray | None:
    """An image file's pixels, or None where it does not decode whole: cv2 decodes the part of a
    cut-off JPEG it has and says so only on stderr. A JPEG that does not end with its end marker
    (some phones append data after it) is decoded first by PIL, which refuses a cut one."""
    if path.suffix.lower() in (".jpg", ".jpeg"):
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 2))
                ended = f.read() == b"\xff\xd9"
            if not ended:
                from PIL import Image
                with Image.open(path) as im:
                    im.load()
        except Exception:  # PIL's many ways of refusing a file, and an unreadable one
            return None
    return cv2.imread(str(path), cv2.IMREAD_COLOR)


def predict_inputs(path: Path) -> list[Path]:
    """--input -> the images of a folder (name order; broken links among them, to be listed as
    skipped), or the one image or video; refused in one line, before anything is written, when
    there is nothing to predict on."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink()))
        if not files:
            raise ReproError(f"--input {path}: no images in this folder "
                             f"(looked for {' '.join(IMAGE_SUFFIXES)})")
        return files
    if not path.is_file():
        raise ReproError(f"--input {path} does not exist")
    if path.suffix.lower() not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise ReproError(f"--input {path} is not an image ({' '.join(IMAGE_SUFFIXES)}) or a video "
                         f"({' '.join(VIDEO_SUFFIXES)})")
    if path.suffix.lower() in IMAGE_SUFFIXES and decoded_image(path) is None:
        raise ReproError(f"cannot decode image {path}: the file is corrupt, cut off or not an "
                         "image")
    if path.suffix.lower() in VIDEO_SUFFIXES and cv2.haveImageReader(str(path)):
        raise ReproError(f"--input {path} is an image named as a video: rename it to its image "
                         "suffix")
    return [path]


def image_ids(files: list[Path]) -> list[int]:
    """COCO image ids: the file names' numbers where every name is one (COCO's 000000000785.jpg is
    image 785, so results load against COCO's own json), else 1, 2, ... in name order."""
    stems = [p.stem for p in files]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(files) + 1))


def onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ReproError("--export-onnx and --onnx need onnx and onnxruntime: "
                         "pip install onnx==1.23.2 onnxruntime==1.31.1 "
                         "(both are in requirements.txt)") from None
    return onnx, onnxruntime


class OnnxMaps(nn.Module):
    """An --export-onnx model run by onnxruntime, called like PoseNet (it returns [last stage's
    maps]), so that network_maps and everything after it run unchanged. `config` is the exported
    checkpoint's architecture."""

    def __init__(self, path: str | Path):
        super().__init__()
        _, ort = onnx_modules()
        if not Path(path).is_file():
            raise ReproError(f"ONNX model not found: {path}")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        self.path = path
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
            self.config = json.loads(
                self.session.get_modelmeta().custom_metadata_map["repro_config"])
        except Exception as e:
            raise ReproError(f"cannot read ONNX model {path} ({type(e).__name__}): "
                             "corrupt or not made by --export-onnx") from None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The model's maps, refused where they are not the shape its metadata (checked by
        checkpoint_arch) promises: another model may carry a copy of an exported one's."""
        image = x.detach().float().cpu().contiguous().numpy()
        try:
            maps = self.session.run(["maps"], {"image": image})[0]
        except Exception as e:
            raise ReproError(f"ONNX model {self.path} does not run on an image batch "
                             f"({type(e).__name__}): not made by --export-onnx") from None
        sk, stride = SKELETONS[self.config["skeleton"]], self.config["stride"]
        n, _, height, width = x.shape
        expected = (n, sk.num_paf + sk.num_heat, height // stride, width // stride)
        if maps.shape != expected:
            raise ReproError(f"ONNX model {self.path} gives maps of shape {maps.shape}, not the "
                             f"{expected} its metadata describes: not made by --export-onnx")
        return [torch.from_numpy(maps).to(x.device)]


def predictor(cfg: Config, device) -> tuple[nn.Module, Config]:
    """--mode predict's network: --onnx in onnxruntime, else --ckpt (default: the shipped student)
    in torch; and cfg with its architecture. Its skeleton must be the one asked (--skeleton)."""
    if cfg.onnx:
        model, source = OnnxMaps(cfg.onnx), cfg.onnx
        arch = checkpoint_arch(model.config, cfg, source)
        model(torch.zeros(1, 3, 8 * arch.stride, 8 * arch.stride))  # refused before any output
    else:
        source = cfg.ckpt or str(SHIPPED_STUDENT)
        model, arch, _ = model_from_checkpoint(cfg, source, device)
    if arch.skeleton != cfg.skeleton:
        raise ReproError(f"{source} predicts the {arch.skeleton} skeleton, not {cfg.skeleton}: "
                         f"pass --skeleton {arch.skeleton} or a {cfg.skeleton} checkpoint")
    return model.eval(), arch


def draw_people(image: np.ndarray, people: list[tuple[np.ndarray, float]],
                scale: float = 1.0) -> np.ndarray:
    """Decoded people's skeletons (found joints only) drawn on a copy of the image, their
    coordinates times scale (the image is that much smaller than the one they were found on)."""
    return rh.draw_keypoints(image, [dict(keypoints=np.concatenate([kp[:, :2],
                                                                    2.0 * (kp[:, 2:] > 0)], 1))
                                     for kp, _ in people], scale)


def overview_tile(image: np.ndarray, people: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """An image fitted into OVERVIEW_BOX (black margins), its skeletons drawn at that size so that
    their lines stay visible."""
    (w, h), (height, width) = OVERVIEW_BOX, image.shape[:2]
    scale = min(w / width, h / height)
    small = cv2.resize(image, (round(width * scale), round(height * scale)),
                       interpolation=cv2.INTER_AREA)
    top, left = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    drawn = draw_people(small, people, scale)
    return cv2.copyMakeBorder(drawn, top, h - small.shape[0] - top, left, w - small.shape[1] - left,
                              cv2.BORDER_CONSTANT)


def write_image(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(path.suffix, image,
                            [cv2.IMWRITE_PNG_COMPRESSION, 9] if path.suffix == ".png" else [])
    if not ok:
        raise ReproError(f"cannot encode {path} as {path.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def predict_images(model: nn.Module, files: list[Path], cfg: Config, device,
                   out: Path) -> tuple[list[dict], list[Group], list[Path]]:
    """Each image with its skeletons drawn into out/ (same name), the first few in overview.png; its
    COCO results (with file_name and keypoint scores) and MPII groups; the images that did not
    decode, skipped."""
    sk = skeleton(cfg)
    results, groups, broken, tiles = [], [], [], []
    bar = rh.progress(total=len(files), unit="img", desc="predicting", stream=sys.stdout)
    for path, image_id in zip(files, image_ids(files)):
        image = decoded_image(path)
        if image is None:
            broken.append(path)
        else:
            maps, base = network_maps(model, image, cfg, device)  # the base scale as evaluation's
            people = decode_maps(maps, base, sk)
            results += [r | dict(file_name=path.name)
                        for r in coco_results(image_id, people, scores=True)]
            groups += sk.benchmark.image_predictions(path.name, people)
            write_image(out / path.name, draw_people(image, people))
            tiles += [overview_tile(image, people)] if len(tiles) < OVERVIEW_IMAGES else []
        bar.update()
    bar.close()
    if tiles:
        write_image(out / "overview.png", tile_grid(tiles))
    return results, groups, broken


def open_video(path: Path) -> tuple[cv2.VideoCapture, np.ndarray, float]:
    """A readable video, its first frame and its frame rate; one line where it cannot be read."""
    # [ours] ffmpeg's own lines would bury ours
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    capture = cv2.VideoCapture(str(path))
    ok, first = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        capture.release()
        raise ReproError(f"cannot read video {path}: the file is corrupt, empty or in a format "
                         "cv2 cannot decode")
    fps = capture.get(cv2.CAP_PROP_FPS)
    if not fps > 0:
        print(f"{path} does not say its frame rate: the output is written at "
              f"{VIDEO_FALLBACK_FPS:g} fps")
    return capture, first, fps if fps > 0 else VIDEO_FALLBACK_FPS


def frame_batches(capture: cv2.VideoCapture, first: np.ndarray, n: int):
    """(B, H, W, 3) batches of up to n frames, starting with the first frame (already read)."""
    batch = [first]
    while True:
        ok, frame = capture.read()
        if ok:  # a frame of another size (rare) is fitted to the first's: the writer needs one size
            batch.append(frame if frame.shape == first.shape
                         else cv2.resize(frame, first.shape[1::-1]))
        if len(batch) == n or (not ok and batch):
            yield np.stack(batch)
            batch = []
        if not ok:
            return


def predict_video(model: nn.Module, path: Path, cfg: Config, device,
                  out: Path) -> tuple[list[dict], list[Group], int]:
    """The video with its skeletons drawn (out/<name>.mp4, the input's frame rate), its COCO
    results with a frame index per person, its MPII groups (one per frame) and its frame count."""
    capture, first, fps = open_video(path)
    sk, results, groups, n = skeleton(cfg), [], [], 0
    target = out / f"{path.stem}.mp4"
    out.mkdir(parents=True, exist_ok=True)
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    total = total if total > 0 else None  # unknown: some containers say 0 or a huge negative number
    bar = rh.progress(total=total, unit="frame", desc="predicting", stream=sys.stdout)
    try:
        with atomic_path(target, keep_suffix=True) as tmp:
            writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                     first.shape[1::-1])
            if not writer.isOpened():
                raise ReproError(f"cannot write video {target} (cv2 has no mp4v encoder here)")
            for frames in frame_batches(capture, first, PREDICT_BATCH):
                maps, base = batch_maps(model, frames, cfg, device)
                for frame, frame_maps in zip(frames, maps):
                    people = decode_maps(frame_maps, base, sk)
                    results += [r | dict(file_name=path.name, frame=n)
                                for r in coco_results(n, people, scores=True)]
                    groups += sk.benchmark.image_predictions(f"{path.name}#{n}", people)
                    writer.write(draw_people(frame, people))
                    n += 1
                bar.update(len(frames))
            writer.release()
    finally:
        capture.release()
        bar.close()
    return results, groups, n


def predict_out(cfg: Config, source: Path, files: list[Path]) -> tuple[Path, bool]:
    """predict's --out (default runs/predict-<input>) and whether it holds an earlier prediction,
    which is replaced whole; refused before any work where the set cannot be written there: the
    input's own folder, a file or under one, read-only, or a folder holding other files."""
    out = Path(cfg.out) if cfg.out else Path("runs") / f"predict-{source.stem}"
    if out.resolve() == (source if source.is_dir() else source.parent).resolve():
        raise ReproError(f"--out {out} is the input's own folder: the drawn copies would replace "
                         "the originals")
    if clash := set(PREDICT_FILES) & {p.name for p in files}:
        raise ReproError(f"--input has an image named {clash.pop()}, "
                         "as a file predict writes: rename it")
    check_out(out, folder=True)
    held = sorted(out.iterdir()) if out.is_dir() else []
    drawn = IMAGE_SUFFIXES + (".mp4",) if (out / "predictions.json").is_file() else ()
    foreign = [p.name for p in held
               if not p.is_file() or p.name not in PREDICT_FILES and p.suffix.lower() not in drawn]
    if foreign:
        raise ReproError(f"--out {out} holds files predict did not write ({', '.join(foreign[:3])})"
                         ": give a new or empty folder, or one of an earlier prediction (replaced)")
    return out, bool(held)


@contextlib.contextmanager
def fresh_folder(out: Path):
    """A temporary folder beside `out` that becomes `out` when the block ends well (what `out` held
    is replaced whole) and is removed when it does not: an interrupted prediction leaves nothing,
    and `out` never mixes two."""
    tmp, old = (out.with_name(f".{out.name}.{os.getpid()}.{end}") for end in ("tmp", "old"))
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def run_predict(cfg: Config, device: torch.device) -> list[dict]:
    """--mode predict: drawn images or video and predictions.json (COCO results) in --out; for the
    MPII skeleton also predictions.mat (the toolkit's pred struct)."""
    source = Path(cfg.input)
    files = predict_inputs(source)
    out, replaced = predict_out(cfg, source, files)
    model, cfg = predictor(cfg, device)
    with fresh_folder(out.resolve()) as tmp:  # a link's folder is written, not the link replaced
        if files[0].suffix.lower() in VIDEO_SUFFIXES:
            results, groups, n = predict_video(model, files[0], cfg, device, tmp)
            what = f"{n} frames"
        else:
            results, groups, broken = predict_images(model, files, cfg, device, tmp)
            if broken:
                print(f"skipped {len(broken)} of {len(files)} images that do not decode: "
                      + ", ".join(p.name for p in broken))
            if len(broken) == len(files):
                raise ReproError(f"none of the {len(files)} images in {source} decodes")
            what = f"{len(files) - len(broken)} images"
        write_json(results, tmp / "predictions.json")
        also = skeleton(cfg).benchmark.write_image_predictions(tmp, groups)
    if replaced:
        print(f"{out} held an earlier prediction: replaced whole by this one")
    print(f"{len(results)} people in {what} ({'onnxruntime' if cfg.onnx else device}): "
          f"{out}/predictions.json"
          + "".join(f" and {name}" for name in also))
    return results


class LastStage(nn.Module):
    """PoseNet's last stage only: what inference reads and what --export-onnx exports."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[-1]


def onnx_differences(net: nn.Module, path: Path, cfg: Config) -> list[float]:
    """Max abs difference of the maps, onnxruntime against torch in float32, on a few normalised
    inputs of other batch sizes and shapes than the exported example."""
    _, ort = onnx_modules()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator, s = torch.Generator().manual_seed(0), cfg.stride
    diffs = []
    for shape in ((1, 3, 24 * s, 32 * s), (2, 3, 16 * s, 16 * s), (1, 3, 40 * s, 24 * s)):
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = net(x).numpy()
        diffs.append(float(np.abs(session.run(["maps"], {"image": x.numpy()})[0] - expected).max()))
    return diffs


def export_onnx(cfg: Config, path: Path) -> list[float]:
    """--export-onnx: the network of --ckpt (default: the shipped student) as an ONNX model with a
    dynamic batch and input size (H and W multiples of --stride), kept only when onnxruntime's
    maps match torch's on a few inputs. Input "image": float32 (B, 3, H, W), BGR, (pixel - mean)
    / std; output "maps": (B, PAF + heat, H / stride, W / stride), as PoseNet's last stage."""
    onnx, _ = onnx_modules()
    if path.suffix != ".onnx" or not path.parent.is_dir():
        raise ReproError(f"--export-onnx {path}: give a .onnx file in an existing folder")
    source = cfg.ckpt or tracked_name(SHIPPED_STUDENT)
    model, cfg, _ = model_from_checkpoint(cfg, cfg.ckpt or SHIPPED_STUDENT, torch.device("cpu"))
    # eval: the exporter restores the wrapper's mode onto the net
    net = LastStage(model.float()).eval()
    meta = dict(repro_config=json.dumps({k: getattr(cfg, k) for k in ARCH_KEYS}),
                source=str(source),
                mean_bgr=json.dumps(IMAGE_MEAN.tolist()), std_bgr=json.dumps(IMAGE_STD.tolist()))
    with atomic_path(path, keep_suffix=True) as tmp:
        example = torch.zeros(1, 3, cfg.input_size, cfg.input_size)
        # the legacy exporter's deprecation note; dynamo needs onnxscript
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image"], output_names=["maps"],
                              dynamic_axes=dict(image={0: "batch", 2: "height", 3: "width"},
                                                maps={0: "batch", 2: "grid_height",
                                                      3: "grid_width"}))
        exported = onnx.load(str(tmp))
        onnx.helper.set_model_props(exported, meta)
        onnx.save(exported, str(tmp))
        diffs = onnx_differences(net, tmp, cfg)
        if max(diffs) > ONNX_TOLERANCE:
            raise ReproError(f"onnxruntime's maps differ from torch's by up to {max(diffs):.2g} "
                             f"(> {ONNX_TOLERANCE:g}): {path} not written")
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB from {source}, dynamic batch and input "
          f"size (multiples of {cfg.stride} px); max abs difference of the maps, onnxruntime vs "
          f"torch, on {len(diffs)} inputs: "
          + ", ".join(f"{d:.2g}" for d in diffs))
    return diffs


def export_onnx_job(cfg: Config, args: argparse.Namespace) -> None:
    export_onnx(cfg, Path(args.export_onnx))


# ----------------------------------------------------------------------------------------------
# Runs: main, a training run's start, its folder's lock and signals, its finish
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None, jobs: dict | None = None) -> int:
    """The command line (of repro.py's JOBS, or a script's own); SIGTERM ends it as Ctrl-C does
    (the handler is put back after, for callers)."""
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    watch_parent()
    try:
        return run_main(argv, jobs)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_main(argv: list[str] | None = None, jobs: dict | None = None) -> int:
    jobs = JOBS if jobs is None else jobs
    name = Path(command_name(jobs)).name
    try:
        cfg, args = parse_args(argv, jobs)
    except SystemExit as e:  # --help (0), or the parser refused the command line in one line (2)
        return int(e.code or 0)
    try:
        check_config(cfg)
        jobs[args.job].run(cfg, args)
    except (ReproError, rh.RenderError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder: one line, no half-files (atomic writes)
        print(f"{name}: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        training = args.job != TRAIN or cfg.mode not in ("eval", "predict")
        kept = jobs[args.job].kept if training else None
        print(f"{name}: interrupted" + (f"; {kept}" if kept else ""), file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    return 0


def command_name(jobs: dict) -> str:
    """The file whose jobs these are, as its help and errors name it (repro.py or a script)."""
    return next(iter(jobs.values())).prog


def command_line(jobs: dict) -> tuple:
    """A script's parse_args and main (results/*/*.py): repro.py's, over the script's own jobs;
    run from a folder inside the repository (its paths are the root's), refused in one line."""
    def script_main(argv: list[str] | None = None) -> int:
        root = Path(__file__).resolve().parent
        if root in Path.cwd().resolve().parents:
            print(f"{Path(command_name(jobs)).name}: error: run it from the repository's root "
                  f"({root}): its paths (results/, runs/, data/) are relative to it",
                  file=sys.stderr)
            return 2
        return main(argv, jobs)
    return functools.partial(parse_args, jobs=jobs), script_main


def train_job(cfg: Config, args: argparse.Namespace) -> None:
    """A --mode run: training, --mode eval or --mode predict."""
    rank, world, device = start_job(cfg)
    if cfg.mode == "predict":  # no dataset: the user's own images
        run_predict(cfg, device)
        return
    data = load_data(cfg)
    if cfg.mode == "eval":
        run_eval(cfg, data, device)
    else:
        run_training(cfg, data, device, rank, world)


def start_job(cfg: Config) -> tuple[int, int, torch.device]:
    """Threads, the device (and torchrun's ranks), the seeds: for the jobs that compute."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = setup_distributed(cfg)
    seed_everything(cfg.seed + rank)
    return rank, world, device


def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python repro.py` is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg)
    if world == 1:
        return 0, 1, device
    if cfg.batch_size % world:
        raise ReproError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} "
                         "processes: each trains an equal share of every step's batch")
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def run_training(cfg: Config, data: Data, device: torch.device, rank: int, world: int) -> dict:
    out = Path(cfg.out) if cfg.out else default_run_dir(cfg, data.name)
    trainer = start_run(cfg, data, device, out, rank, world)
    if rank != 0:
        trainer.fit()
        return {}
    lock = hold_run_dir(out)
    try:
        if cfg.resume:
            print(f"resumed {out} at step {trainer.step}")
        prepare_metrics(out, cfg, trainer.step)
        write_json(dict(config=dataclasses.asdict(cfg), benchmark=benchmark_label(data.name),
                        device=str(device), device_name=device_name(device),
                        device_key=this_device_key(device, cfg), torch=torch.__version__,
                        threads=torch.get_num_threads(), precision=precision(device, cfg),
                        argv=sys.argv), out / "config.json")
        if cfg.init and cfg.eval_init and trainer.step == 0 and cfg.steps > 0:
            label = f"{benchmark_label(data.name)}, before training (--init)"
            print(data.val.skeleton.benchmark.table(trainer.evaluate_now(), label))
        trainer.fit()
        return finish_run(trainer, data, out)
    finally:
        lock.unlink(missing_ok=True)


def default_run_dir(cfg: Config, data_name: str) -> Path:
    return Path("runs") / f"{cfg.mode}-{data_name}-s{cfg.seed}"


def start_run(cfg: Config, data: Data, device: torch.device, out: Path, rank: int,
              world: int) -> Trainer:
    """Everything that can refuse a run happens before the run folder is touched."""
    ckpt_path = out / "ckpt.pt"
    if ckpt_path.exists() and not cfg.resume:
        raise ReproError(f"{out} already holds a run: pass --resume to continue it, or --out DIR "
                         "for a new one")
    if cfg.resume and not ckpt_path.exists():
        raise ReproError(f"--resume: no checkpoint in {out}; start the run without --resume")
    trainer = Trainer(cfg, data, device, out, rank, world)
    if cfg.resume:
        try:
            trainer.restore(load_checkpoint(ckpt_path), ckpt_path)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a file put there by hand
            what = str(e).splitlines()[0] if str(e) else "bad content"
            raise ReproError(f"--resume: {ckpt_path} is not a training checkpoint of this run "
                             f"({type(e).__name__}: {what})") from None
        if trainer.step >= cfg.steps and (out / "metrics.json").is_file():
            raise ReproError(f"--resume: {out} is finished (step {trainer.step} of --steps "
                             f"{cfg.steps}, results in {out / 'metrics.json'}); raise --steps to "
                             f"train on, or --mode eval --ckpt {ckpt_path}")
    if cfg.steps == 0:
        print("--steps 0: no training; the starting weights are evaluated (untrained unless "
              "--init)")
    return trainer


LOCK_NAME = "run.lock"


def hold_run_dir(out: Path) -> Path:
    """Creates the run folder and holds it with a lock file naming this process (pid, start time,
    host). A folder held by a live process is refused; a lock left by a dead one is stale and
    taken over."""
    lock = out / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = lock_holder(out)
                if holder is not None:
                    raise ReproError(f"{out} is in use by another run (pid {holder}); wait for it "
                                     "to finish, or use another --out") from None
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(lock_text())
            return lock
    except OSError as e:
        raise ReproError(f"cannot write the run folder {out} ({e.strerror})") from None


def lock_holder(out: Path) -> int | None:
    """The pid of the live run holding `out`, or None when it is free or its lock is stale (its
    process is gone, or its pid now names another process). A lock of another host counts as held.
    Older locks hold the pid alone."""
    try:
        text = (out / LOCK_NAME).read_text().strip()
    except OSError:
        return None
    try:
        lock = json.loads(text)
        lock = lock if isinstance(lock, dict) else dict(pid=lock)
    except ValueError:
        return None
    pid = lock.get("pid")
    # 0 and -1 would signal a process group, and a pid beyond C's int overflows os.kill
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2 ** 31:
        return None
    if lock.get("host", os.uname().nodename) != os.uname().nodename:
        return pid
    started = lock.get("started")
    reused = started is not None and process_started(pid) not in (started, None)
    if not process_alive(pid) or reused:
        return None
    return pid


def lock_text() -> str:
    return json.dumps(dict(pid=os.getpid(), started=process_started(os.getpid()),
                           host=os.uname().nodename))


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def process_started(pid: int) -> str | None:
    """When a process started (clock ticks since boot, /proc/PID/stat field 22): with the pid it
    names one process, so a lock whose pid was reused by another program is told from a live one."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def prepare_metrics(out: Path, cfg: Config, step: int) -> None:
    """A new run starts an empty metrics.jsonl; a resumed one drops what was logged after its
    checkpoint."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    if cfg.resume:  # a final evaluation is redone at the end: one cut off after it is dropped too
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step and not r.get("final")]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in kept))


def finish_run(trainer: Trainer, data: Data, out: Path) -> dict:
    """Final evaluation, metrics, predictions and figures of a finished run."""
    cfg, device = trainer.cfg, trainer.device
    stats, results = evaluate(trainer.model, data.val, cfg, device, cfg.max_val_images)
    minutes = round(trainer.seconds / 60, 3)
    append_jsonl(out / "metrics.jsonl", dict(step=trainer.step, minutes=minutes, eval=stats,
                                             final=True))
    write_json(dict(benchmark=benchmark_label(data.name), mode=cfg.mode, steps=trainer.step,
                    train_minutes=trainer.seconds / 60, **stats), out / "metrics.json")
    data.val.skeleton.benchmark.write_predictions(out, results)
    save_predictions_figure(trainer.model, data.val, cfg, device, out / "predictions.png")
    save_curves(out / "metrics.jsonl", out / "curves.png", f"{cfg.mode} ({data.name})")
    if trainer.teacher is not None:
        save_teacher_plot(trainer.teacher, out / "teacher_bins.png")
    benchmark = data.val.skeleton.benchmark
    print(benchmark.table(stats, benchmark_label(data.name)))
    start = [r["eval"] for r in read_jsonl(out / "metrics.jsonl")
             if "eval" in r and r["step"] == 0]
    if start and trainer.step > 0:
        print(f"from --init to the end of training: {benchmark.headline(start[0])} -> "
              f"{benchmark.headline(stats)}")
        if data.name.startswith("demo") and Path(cfg.init or "").name == SHIPPED_STUDENT.name:
            # a first run's change depends on the mode (the purely synthetic half costs AP at first)
            print("the values to expect from the first runs, per precision: README.md, "
                  "'The first run: what you should see'")
    print(f"run folder: {out}")
    return stats


def benchmark_label(data_name: str) -> str:
    if data_name.startswith("demo"):
        labels = "MPII joints, " if data_name == "demo-mpii" else ""
        return (f"built-in demo benchmark, stand-in val split ({labels}rendered stand-in people, "
                "NOT real data)")
    return f"{data_name} val"


def run_eval(cfg: Config, data: Data, device: torch.device) -> dict:
    if not cfg.ckpt:
        raise ReproError("--mode eval needs --ckpt PATH (a checkpoint written by a training run)")
    model, cfg, ckpt = model_from_checkpoint(cfg, cfg.ckpt, device)
    if cfg.skeleton != data.val.skeleton.name:
        raise ReproError(f"checkpoint {cfg.ckpt} predicts the {cfg.skeleton} skeleton but the val "
                         f"data is {data.val.skeleton.name}: evaluate it on {cfg.skeleton} data "
                         f"(--skeleton {cfg.skeleton})")
    stats, results = evaluate(model, data.val, cfg, device, cfg.max_val_images)
    # never beside a tracked checkpoint
    out = Path(cfg.out) if cfg.out else Path("runs") / f"eval-{data.name}"
    out.mkdir(parents=True, exist_ok=True)
    write_json(dict(benchmark=benchmark_label(data.name), checkpoint=str(cfg.ckpt),
                    step=ckpt.get("step"), **stats), out / f"eval-{data.name}.json")
    print(data.val.skeleton.benchmark.table(stats, benchmark_label(data.name)))
    return stats


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it ends like Ctrl-C: checkpoint kept, lock
    released, loader workers and protocol runs ended."""


def on_sigterm(signum, frame):
    raise Terminated


PARENT_ENV = "REPRO_PARENT_PID"  # set by the protocol runner: its runs end when it is gone


def watch_parent(every: float = 1.0) -> None:
    """When $REPRO_PARENT_PID is set, a daemon thread sends this process SIGTERM once that parent
    is gone (killed with -9 too: this process is then reparented), so no run trains on unowned."""
    import threading

    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit():
        return

    def watch():
        while os.getppid() == int(parent):
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def device_name(device: torch.device) -> str:
    """What a record calls the device: the GPU's name, or cpu."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@functools.cache
def code_version() -> str | None:
    """The commit the runner's code came from (pairs of runs are compared within one), if it is a
    git checkout; read once, when a job starts, so a commit made while it runs is not credited
    with its runs."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse",
                              "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def instruction_set(amx: bool, avx512_bf16: bool, capability: str) -> str:
    """The CPU's instruction set that sets a run's speed: AMX or AVX-512 BF16 (native bf16, see
    cpu_has_native_bf16), else the vector set torch's kernels dispatch to (AVX-512, AVX2, ...)."""
    if amx or avx512_bf16:
        return "AMX" if amx else "AVX-512 BF16"
    names = {"AVX512": "AVX-512", "NO AVX": "no AVX", "DEFAULT": "scalar"}
    return names.get(capability, capability)


def cpu_model() -> str:
    """/proc/cpuinfo's 'model name' (Linux), else what the platform module says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    import platform
    return platform.processor() or platform.machine() or "unknown CPU"


def device_key(model: str, isa: str, precision: str, threads: int | str, torch_version: str) -> str:
    """Where a run trained, as one key: the CPU's model or the GPU's name, the instruction set that
    sets its speed (a GPU's: its compute capability), the precision used, torch's threads and
    version. Runs are compared in pairs only within one key (the claims protocol's seed_pairs)."""
    return f"{model} ({isa}), {precision}, {threads} threads, torch {torch_version}"


def this_device_key(device: torch.device, cfg: Config) -> str:
    """The device key of a run of `cfg` on `device` here, now."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        model, isa = torch.cuda.get_device_name(device), f"sm_{major}{minor}"
    else:
        capability = torch.backends.cpu.get_cpu_capability()
        model, isa = cpu_model(), instruction_set(*cpu_bf16_units(), capability)
    threads, version = torch.get_num_threads(), torch.__version__
    return device_key(model, isa, precision(device, cfg), threads, version)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

TRAIN = ""  # the job of a --mode run (training, --mode eval, --mode predict): every Config flag


def parse_args(argv: list[str] | None = None,
               jobs: dict | None = None) -> tuple[Config, argparse.Namespace]:
    """The job argv names, then that job's parser; args.job is the job's flag (TRAIN: a --mode
    run), args.argv the command line. `jobs`: repro.py's JOBS, or a script's own (claims.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    jobs = JOBS if jobs is None else jobs
    flag = pick_job(argv, jobs)
    parser = build_parser(flag, jobs)
    elsewhere = [f for flags in ELSEWHERE.values() for f in flags] if jobs is JOBS else []
    moved = [w for w in argv if w in elsewhere]
    if moved:  # before --help: `python repro.py --report --help` says where --report went
        refuse_flags(parser, flag, moved, jobs)
    if {"-h", "--help"} & set(argv):  # before the job's flag wants its value: `--compare --help`
        parser.print_help()
        parser.exit()
    args, extra = parser.parse_known_args(argv)
    if extra:
        refuse_flags(parser, flag, extra, jobs)
    unread = [config_flag(k) for k, v in vars(args).items()
              if v is not None and k not in PREDICT_FIELDS]
    if flag == TRAIN and args.mode == "predict" and unread:
        parser.error(f"--mode predict does not take {' '.join(unread)}: it takes "
                     + fields_in_words(PREDICT_FIELDS))
    args.job, args.argv = flag, argv
    return job_config(jobs[flag], args), args


def pick_job(argv: list[str], jobs: dict) -> str:
    """The job whose flag argv gives (TRAIN for none; a script has no --mode run); argparse refuses
    two jobs at once. What the job's flag is given is left to the job's own parser."""
    prog = command_name(jobs)
    picker = OneLineParser(prog=prog, add_help=False, allow_abbrev=False)
    group = picker.add_mutually_exclusive_group()
    for flag in filter(None, jobs):
        group.add_argument(flag, nargs="*", dest=flag)
    picked = vars(picker.parse_known_args(argv)[0])
    flag = next((flag for flag, given in picked.items() if given is not None), TRAIN)
    if flag in jobs:
        return flag
    if {"-h", "--help"} & set(argv):  # a script's --help without a job: its jobs
        print(f"usage: {prog} JOB [its flags]\n\n{jobs_epilog(jobs)}")
        picker.exit(0)
    own = [f"{w} is a flag of {job.flag}" for w in dict.fromkeys(argv) for job in jobs.values()
           if w in (name for name, _ in job.own[1:])]
    picker.error(f"give one of {', '.join(jobs)}" + (f" ({'; '.join(own)})" if own else ""))


def build_parser(flag: str = TRAIN, jobs: dict | None = None) -> argparse.ArgumentParser:
    """A job's parser: its own flags and the Config flags it reads. A --mode run's (the default)
    takes every Config flag, and its --help ends with the other jobs."""
    job = (JOBS if jobs is None else jobs)[flag]
    if flag:
        usage = f"{job.prog} {own_usage(job)}" + (" [its flags below]" if job.fields else "")
        p = OneLineParser(prog=f"{job.prog} {flag}", usage=usage, description=job.help)
    else:
        p = OneLineParser(prog="repro.py", usage="repro.py [--mode MODE] [its flags below]\n       "
                          "repro.py JOB [its flags] (the jobs are listed at the end)",
                          description=__doc__.split("\n\n")[0], epilog=jobs_epilog(),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, kwargs in job.own:
        p.add_argument(name, **kwargs)
    demo, paper = Config(), PRESETS["paper"]
    meta = {f.name: f.metadata for f in dataclasses.fields(Config)}
    for title, names in FLAG_GROUPS.items():  # each Config field's flag, its defaults in its help
        group = p.add_argument_group(title) if set(names) & set(job.fields) else None
        for name in (n for n in names if n in job.fields):
            value, choices = getattr(demo, name), meta[name]["choices"]
            kind = (dict(action=argparse.BooleanOptionalAction) if isinstance(value, bool) else
                    dict(type=float, nargs="*") if isinstance(value, tuple) else
                    dict(type=str if value is None else type(value), choices=choices))
            defaults = f"demo: {shown(value)}"
            if paper.get(name, value) != value:
                defaults += f", paper: {shown(paper[name])}"
            group.add_argument(config_flag(name), default=None,
                               help=f"{meta[name]['help']} [{defaults}]", **kind)
    return p


def shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def job_config(job: Job, args: argparse.Namespace) -> Config:
    """Config defaults, then the preset, then the flags given; --init resolved for the jobs that
    read it."""
    fields = job.fields
    given = {k: v for k, v in vars(args).items() if v is not None and k in fields}
    values = dataclasses.asdict(Config()) | PRESETS[given.get("preset", "demo")] | given
    values |= {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
    if given.get("mpii_root") and "skeleton" not in given:
        values["skeleton"] = "mpii"
    cfg = Config(**values)
    finetune_given = bool(set(FINETUNE) & set(given))
    return resolve_init(cfg, finetune_given) if {"init", "lr"} & set(fields) else cfg


def resolve_init(cfg: Config, finetune_given: bool) -> Config:
    """--init auto -> the shipped student where it fits (the demo data, its network), else none;
    --init none -> from scratch. A demo-preset fine-tune that names none of FINETUNE's settings
    runs it."""
    init = cfg.init
    if init == "auto":
        paths = (cfg.coco_root, cfg.train_json, cfg.val_json, cfg.mpii_root)
        demo = cfg.data != "coco" and not any(paths)
        init = str(SHIPPED_STUDENT) if demo and shipped_student_fits(cfg) else None
    init = None if init == "none" else init
    finetune = FINETUNE if init and cfg.preset == "demo" and not finetune_given else {}
    return dataclasses.replace(cfg, init=init, **finetune)


def refuse_flags(parser: argparse.ArgumentParser, flag: str, extra: list[str], jobs: dict) -> None:
    """argparse's refusal of what a job does not take, naming the jobs whose flags those are: this
    command's, else another file's (a script's, ELSEWHERE; from a script, repro.py's)."""
    def flags_of(table: dict) -> dict[str, set]:
        return {f: {s for a in build_parser(f, table)._actions for s in a.option_strings}
                for f in table}

    takes, theirs = flags_of(jobs), flags_of(JOBS) if jobs is not JOBS else {}
    notes: dict[str, list[str]] = {}  # whose flags -> the words given
    for word in dict.fromkeys(w.split("=", 1)[0] for w in extra if w.startswith("--")):
        owners = [f or "the --mode runs" for f in jobs if word in takes[f]]
        owners = owners or [f"repro.py's {f or '--mode runs'}" for f in theirs if word in theirs[f]]
        owners = owners or [f"python {script}" for script, flags in ELSEWHERE.items()
                            if word in flags]
        if owners:
            notes.setdefault(", ".join(owners), []).append(word)
    said = [f"{' '.join(words)} {'is a flag' if len(words) == 1 else 'are flags'} of {owners}"
            for owners, words in notes.items()]
    parser.error(f"{flag or 'a --mode run'} does not take {' '.join(extra)}"
                 + (f" ({'; '.join(said)})" if said else ""))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a refused command line is one line on stderr (exit status 2), as repro.py's
    other input errors are, saying where the job's flags are listed."""

    def error(self, message: str):
        name = Path(self.prog.split()[0]).name
        self.exit(2, f"{name}: error: {message}; `python {self.prog} --help` lists its flags\n")


def own_usage(job: Job) -> str:
    """A job's own flags as argparse writes a usage: `--reproduce [--jobs N] [--only GLOB ...]`."""
    wide = functools.partial(argparse.HelpFormatter, width=1000)  # one line, whatever $COLUMNS
    p = argparse.ArgumentParser(prog=job.prog, add_help=False, formatter_class=wide)
    for i, (name, kwargs) in enumerate(job.own):
        p.add_argument(name, required=i == 0, **kwargs)
    return p.format_usage().removeprefix(f"usage: {job.prog} ").strip()


def jobs_epilog(jobs: dict | None = None) -> str:
    """The other jobs that a --mode run's --help ends with (a script's --help: its jobs), each
    with the Config flags it takes."""
    jobs = JOBS if jobs is None else jobs
    prog = command_name(jobs)
    lines = [f"the {'other ' if TRAIN in jobs else ''}jobs, one per call, each taking only its own "
             f"flags (python {prog} JOB --help):"]
    for job in [job for job in jobs.values() if job.flag]:
        takes = f"; takes {fields_in_words(job.fields)}" if job.fields else ""
        lines += ["  " + own_usage(job), *textwrap.wrap(
            job.help + takes, 96, initial_indent=" " * 6, subsequent_indent=" " * 6,
            break_on_hyphens=False)]
    if jobs is JOBS:
        lines += ["the experiments behind results/ are scripts of their own (python SCRIPT --help):"]
        lines += [f"  {script}: {' '.join(flags)}" for script, flags in ELSEWHERE.items()]
    return "\n".join(lines)


def fields_in_words(fields: tuple[str, ...]) -> str:
    """A job's Config flags: whole groups by name, the others flag by flag."""
    groups = [g for g, names in FLAG_GROUPS.items() if names and set(names) <= set(fields)]
    whole = {n for g in groups for n in FLAG_GROUPS[g]}
    single = " ".join(config_flag(n) for n in fields if n not in whole)
    named = f"the flags of {', '.join(groups)}" if groups else ""
    return " and ".join(filter(None, [named, single]))


# Config's flags in --help's groups, from the fields' own metadata; those --mode predict reads
FLAG_GROUPS = {g.title: tuple(f.name for f in dataclasses.fields(Config)
                              if f.metadata["group"] == g.title) for g in HELP_GROUPS}


def reader_fields(job: str) -> tuple[str, ...]:
    """The Config fields a job reads, in --help's order: all of them for a --mode run (TRAIN),
    else those whose metadata names the job ("predict": --mode predict)."""
    readers = {f.name: f.metadata["jobs"] for f in dataclasses.fields(Config)}
    return tuple(n for names in FLAG_GROUPS.values() for n in names
                 if job == TRAIN or job in readers[n])


PREDICT_FIELDS = reader_fields("predict")


class Job:
    """A job of the command line: its flag (TRAIN: a --mode run, which has none), what it runs,
    the flag's help and argparse keywords, more flags of its own, and what it keeps when
    interrupted (None: nothing half-written). Its parser takes its own flags and those of the
    Config fields it reads (its fields), no other."""

    def __init__(self, flag: str, run, help: str = "", *more: tuple[str, dict],
                 kept: str | None = None, prog: str = "repro.py", **kwargs):
        self.flag, self.run, self.help, self.kept, self.prog = flag, run, help, kept, prog
        self.own = ((flag, dict(help=help, **kwargs)), *more) if flag else ()
        self.fields = reader_fields(flag or TRAIN)


# The scripts beside results/ and their jobs' flags, which repro.py's refusal names.
ELSEWHERE = {"results/protocol/claims.py": ("--reproduce", "--report", "--probe", "--jobs",
                                            "--only"),
             "results/domain-gap/domain_gap.py": ("--domain-gap",),
             "results/speed/speed.py": ("--bench-targets", "--gpu-report")}

JOBS = {job.flag: job for job in (
    Job(TRAIN, train_job, kept="the last checkpoint is kept: rerun with --resume"),
    Job("--bench", bench_job, "print speed figures and exit", action="store_true"),
    Job("--compare", compare_job, "plot val metrics of these run folders against minutes into "
        "--out (png + md table)", nargs="+", metavar="RUN"),
    Job("--export-student", export_student_job, "write CKPT's weights in half precision to --out "
        "(default results/student-demo.pt, the shipped student, which is replaced only when --out "
        "names it)", metavar="CKPT"),
    Job("--export-onnx", export_onnx_job, "write the network of --ckpt (default: the shipped "
        "student) as an ONNX model to PATH, checked against torch (dynamic batch and input size); "
        "run it with --mode predict --onnx", metavar="PATH"),
    Job("--write-mpii-release", mpii_release_job, "render the stand-in benchmark at paper size "
        "into DIR in MPII's own layout (mpii_human_pose_v1_u12_1.mat + images/), a rehearsal of "
        "--mpii-root before the real data", metavar="DIR"),
    Job("--score-mpii", score_mpii_job, "score MPII multi-person predictions (.mat pred struct or "
        ".json) against a ground-truth annotation list with the official rules; prints the table "
        "and 'mAP <value>'", nargs=2, metavar=("PRED", "GT")),
)}

if __name__ == "__main__":
    sys.exit(main())
