"""render_humans.py: render synthetic people and write COCO-format keypoint datasets.

The data side of a reproduction of "Learning to Train with Synthetic Humans" (Hoffmann,
Tzionas, Black, Tang; GCPR 2019). It renders

- purely synthetic scenes (the paper's dataset 1): a background photo or a procedural
  background, Poisson(10) people (at least 2) on a ground plane, the paper's camera;
- a person bank: single people as RGBA crops that a training script composites onto real
  photos (the paper's "augmented" dataset),

and writes COCO person-keypoint json (exact visibility from depth and instance buffers, RLE
masks, plus the per-person attributes the paper's teacher bins on: min_dist, camera_angle).
Labels follow COCO's 17 keypoints, or with `--skeleton mpii` MPII's 16 joints (the paper's
MPII benchmark).

Bodies come from `anny` (open, CC0 data, built-in COCO-17 regressor) or, with
`--body-model smpl|smplh|smplx --model-path DIR`, from the official SMPL-family files through
`smplx`. Poses come from a built-in sampler or from BVH mocap (`--poses DIR`, CMU or MakeHuman
joint names), retargeted through a small canonical skeleton. Rendering is one OpenGL pass
(EGL, else OSMesa) of all people merged into one vertex-coloured mesh whose alpha channel is
the instance id; lighting (spherical harmonics as in the paper, or a warm key light) is done
per vertex on the CPU.

    python render_humans.py data/synth --num-images 1000 --workers 2
    python render_humans.py data/bank --kind bank --num-images 5000
    python render_humans.py data/mpii-synth --skeleton mpii
    python render_humans.py --bench        # scenes/s and bank people/s on this machine
    python render_humans.py --grid         # results/render-grid.png

Library use (what repro.py calls): `render_dataset(out_dir, kind=..., num_images=...)`, with
any RenderConfig field as a keyword; `progress(...)` for progress that suits a terminal or a
log.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------
# Configuration and constants
# ----------------------------------------------------------------------------------------------
COCO_KEYPOINT_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
]
COCO_SKELETON = [  # COCO's 19 limbs, 1-based (as in person_keypoints_*.json)
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
    [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]


def _category(names: list, limbs: list) -> dict:
    return {"id": 1, "name": "person", "supercategory": "person", "keypoints": names,
            "skeleton": limbs}


CATEGORIES = [_category(COCO_KEYPOINT_NAMES, COCO_SKELETON)]
# MPII's joint ids 0-15, named as in its annotations ("_" for " ")
MPII_KEYPOINT_NAMES = [
    "r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax", "upper_neck",
    "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist",
]
# MPII's 15 limbs, 1-based: legs to the pelvis, spine to the head top, arms to the thorax
MPII_SKELETON = [
    [1, 2], [2, 3], [3, 7], [7, 4], [4, 5], [5, 6], [7, 8], [8, 9], [9, 10], [11, 12], [12, 13],
    [13, 8], [8, 14], [14, 15], [15, 16],
]
# Points every body model can compute: COCO's 17, then these MPII joints that COCO lacks
# (paper code: SMPL-H head_top = vertex 411, upper_neck = "head" joint, thorax = "neck"
# joint, pelvis = root; see EXTRA_CANON).
EXTRA_POINTS = ["head_top", "upper_neck", "thorax", "pelvis"]
MPII_FROM_COCO = {"r_ankle": "right_ankle", "r_knee": "right_knee", "r_hip": "right_hip",
                  "l_hip": "left_hip", "l_knee": "left_knee", "l_ankle": "left_ankle",
                  "r_wrist": "right_wrist", "r_elbow": "right_elbow",
                  "r_shoulder": "right_shoulder", "l_shoulder": "left_shoulder",
                  "l_elbow": "left_elbow", "l_wrist": "left_wrist"}


@dataclass(frozen=True)
class LabelSet:
    """A label set (--skeleton): keypoint names, limbs (1-based) and where each keypoint comes from
    (repro.py's Skeleton is the network's side of the same names: parts, limbs, flips)."""
    names: list
    limbs: list
    source: tuple   # per keypoint: index into COCO_KEYPOINT_NAMES + EXTRA_POINTS

    @property
    def extended(self) -> bool:
        """Whether the body models must compute EXTRA_POINTS too."""
        return max(self.source) >= len(COCO_KEYPOINT_NAMES)

    def labels(self, points: np.ndarray) -> np.ndarray:
        """(n, P, 3) labels of the computed points -> (n, K, 3) in this skeleton's order."""
        return points[:, list(self.source)]


def _mpii_source() -> tuple:
    points = COCO_KEYPOINT_NAMES + EXTRA_POINTS
    return tuple(points.index(MPII_FROM_COCO.get(n, n)) for n in MPII_KEYPOINT_NAMES)


LABEL_SETS = {
    "coco": LabelSet(COCO_KEYPOINT_NAMES, COCO_SKELETON, tuple(range(len(COCO_KEYPOINT_NAMES)))),
    "mpii": LabelSet(MPII_KEYPOINT_NAMES, MPII_SKELETON, _mpii_source()),
}

CAMERA_DISTANCE = (9.0, 0.1)   # paper code: camera distance N(9.0, 0.1) m
PITCH_MAX_DEG = 37.0           # paper code: camera pitch from 0 to about 37 deg
FOCAL_MM, SENSOR_MM = 60.0, 32.0  # paper code: 60 mm lens on a 32 mm sensor
MEAN_PEOPLE, MIN_PEOPLE = 10.0, 2  # paper code: Poisson(10) people, at least 2
PLACE_WIDTH = 0.75             # paper code: people inside 3/4 of the visible width
MAX_PEOPLE = 60                # instance ids live in one byte; ann ids use image_id*100 + k
LOOK_HEIGHT = 1.0              # [ours] the camera aims at 1 m above the scene centre
GROUND_DEPTH = 0.35            # [ours] people stand within +-0.35*distance of the aim point
SH_DC = (0.5, 0.9)             # paper code: sh0 = 0.5 + 0.9 U(0,1)
SH_1 = -0.7                    # paper code: sh1 = -0.7 U(0,1)
SH_REST = 0.7                  # paper code: sh2..8 = 0.7 U(-1,1)
BLUR_SIGMA = (0.03, 0.03)      # paper code: motion blur ~N(0.03, 0.03) (fraction of a step)
VIS_MARGIN = 0.04              # [ours] metres of slack beyond a keypoint's depth under the skin
JPEG_QUALITY = 92
PNG_COMPRESSION = 1            # higher levels cost more than the whole render of a bank person
CHUNK = {"scenes": 16, "bank": 64}  # images per resumable unit of work
NEAR, FAR = 0.3, 60.0
STYLES = ("synthetic", "standin")
# The style's factors: every place the renderer reads the style belongs to exactly one of them, and
# style_factors switches a factor alone to the other style's value. The style also picks the random
# stream (_rng), which is no factor: it makes a style's scenes another sample, not another look.
STYLE_FACTORS = {
    "bodies": "the age mix: 8% (standin) or 4% (synthetic) teenage bodies (_anny_shape; SMPL "
              "shapes have no style)",
    "poses": "the archetype mix STYLE_MIX and the angle noise, 3 (standin) or 6 deg (sample_poses)",
    "yaw": "75% of people facing the camera, yaw ~ N(0, 45 deg) (standin), or all U(0, 360 deg) "
           "(sample_yaw)",
    "clothing": "the share of patterned garments, 0.75 (standin) or 0.3 (_dress)",
    "lighting": "a warm key light and a fill (standin), or the paper's random SH (sample_lighting)",
    "background": "photos only (standin), or half photos, half procedural (sample_background)",
    "pitch": "camera pitch U(0, 0.6 * 37 deg) (standin) or U(0, 37 deg) (sample_pitch)",
    "blur": "sensor noise (standin), or the paper's pixel and motion blur (post_process)",
}
# a bank crop has no scene camera or backdrop
BANK_FACTORS = ("bodies", "poses", "yaw", "clothing", "lighting")
STANDIN_FACING_SHARE = 0.75    # [ours] stand-in people turned towards the camera ...
STANDIN_FACING_STD_DEG = 45.0  # [ours] ... with yaw ~ N(0, 45 deg); the rest U(0, 360 deg)
KINDS = ("scenes", "bank")
BODY_MODELS = ("anny", "smpl", "smplh", "smplx")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class RenderError(Exception):
    """Bad input or an unusable environment; main() prints it as one line."""


def _optional_str(value) -> str | None:
    return str(value) if value else None


def _two_floats(value) -> tuple:
    return tuple(float(x) for x in value)


def _setting(default, help: str, convert=None, choices=None, new: bool = False, **cli):
    """A RenderConfig field. help and choices serve --help; convert normalises library input; new:
    added after renderer_version 2, so parts/config.json omits it at its default and caches
    rendered before it existed stay valid; cli: extra argparse keywords."""
    meta = dict(help=help, convert=convert, choices=choices, new=new, cli=cli)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RenderConfig:
    """Every setting that determines the output bytes (workers and sharding do not).

    The single list of settings: the CLI flags, render_dataset's keywords and parts/config.json
    all come from these fields.
    """
    kind: str = _setting("scenes", "scenes: full images with many people; bank: one person per "
                         "RGBA crop", choices=KINDS)
    num_images: int = _setting(100, "number of images (bank: people)", int)
    style: str = _setting("synthetic", "synthetic: paper-like SH lighting, blur, procedural+photo "
                          "backgrounds, varied poses; standin: photo backgrounds, patterned "
                          "clothes, warm key light, everyday poses", choices=STYLES)
    image_size: int = _setting(640, "scene width=height in px; "
                               "bank: approximate person height in px", int)
    mean_people: float = _setting(MEAN_PEOPLE, "Poisson mean of people per scene", float)
    min_people: int = _setting(MIN_PEOPLE, "at least this many people per scene", int)
    camera_distance: tuple = _setting(CAMERA_DISTANCE, "camera distance ~ N(MEAN, STD) metres",
                                      _two_floats, type=float, nargs=2, metavar=("MEAN", "STD"))
    seed: int = _setting(0, "same seed and settings give byte-identical output", int)
    backgrounds: str | None = _setting(None, "folder of background photos (e.g. SUN397); default: "
                                       "people-free photos shipped with scikit-image and "
                                       "scikit-learn", _optional_str)
    poses: str | None = _setting(None, "folder of BVH mocap (CMU or MakeHuman joint names); 75%% "
                                 "of people then take a mocap frame, the rest a sampled pose",
                                 _optional_str)
    body_model: str = _setting("anny", "anny (built in) or an SMPL-family model (needs "
                               "--model-path)", choices=BODY_MODELS)
    model_path: str | None = _setting(None, "folder with the SMPL-family files: "
                                      "DIR/smpl/SMPL_NEUTRAL.pkl, DIR/smplh/SMPLH_MALE.pkl, "
                                      "DIR/smplx/SMPLX_NEUTRAL.npz, ...", _optional_str)
    skeleton: str = _setting("coco", "keypoint labels: coco (17 keypoints) or mpii (16 joints, "
                             "MPII order)", choices=tuple(LABEL_SETS), new=True)
    style_factors: tuple = _setting((), "FACTOR=STYLE: these factors of the style take the other "
                                    "style's value, the rest follow --style (e.g. "
                                    "lighting=standin); factors: "
                                    + ", ".join(STYLE_FACTORS), lambda v: _factor_list(v), new=True,
                                    nargs="*", metavar="FACTOR=STYLE")

    def __post_init__(self):
        for f in fields(self):
            convert, value = f.metadata["convert"], getattr(self, f.name)
            if convert is None:
                continue
            try:
                object.__setattr__(self, f.name, convert(value))
            except (TypeError, ValueError):
                raise RenderError(f"{f.name} cannot be {value!r}") from None


SETTINGS = tuple(f.name for f in fields(RenderConfig))


def _factor_list(value) -> tuple:
    """"a=x,b=y", {"a": "x"} or ["a=x", ...] -> ("a=x", "b=y") sorted: one spelling per setting."""
    if isinstance(value, str):
        value = value.split(",")
    items = ([f"{k}={v}" for k, v in value.items()] if isinstance(value, dict)
             # the CLI's words may hold commas too
             else [y for x in value for y in str(x).split(",")])
    pairs = [tuple(p.strip() for p in x.partition("=")[::2]) for x in items if x.strip()]
    for name, style in pairs:
        if name not in STYLE_FACTORS or style not in STYLES:
            raise RenderError(f"style_factors: {name}={style} is not FACTOR=STYLE with a factor of "
                              f"{', '.join(STYLE_FACTORS)} and a style of {', '.join(STYLES)}")
    names = [name for name, _ in pairs]
    if len(set(names)) < len(names):
        raise RenderError(f"style_factors names a factor twice: {', '.join(items)}")
    return tuple(sorted(f"{name}={style}" for name, style in pairs))


def make_config(settings: dict) -> RenderConfig:
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise RenderError(f"unknown render setting {', '.join(unknown)}; known: "
                          f"{', '.join(SETTINGS)}")
    return RenderConfig(**settings)


def _rng(cfg: RenderConfig, index: int, stream: int = 0) -> np.random.Generator:
    # One stream per image: output is independent of chunking, sharding and worker count.
    return np.random.default_rng([cfg.seed, KINDS.index(cfg.kind), STYLES.index(cfg.style),
                                  index, stream])


def factor_style(cfg: RenderConfig, factor: str) -> str:
    """The style whose value one factor of the style takes:
    cfg.style unless style_factors names it."""
    return dict(f.split("=") for f in cfg.style_factors).get(factor, cfg.style)


def styled(cfg: RenderConfig, rng: np.random.Generator, factor: str, draw):
    """draw(rng, style) for one factor of the style. A switched factor still makes cfg.style's draws
    on rng and drops them, then draws its own value from a child stream, so that every other factor
    takes the random numbers it takes without the switch (people, lights, backdrops stay paired).
    Only the geometric factors (bodies, poses, yaw, pitch) also move where people stand,
    and so the draws after."""
    value = draw(rng, cfg.style)
    style = factor_style(cfg, factor)
    return value if style == cfg.style else draw(rng.spawn(1)[0], style)


# ----------------------------------------------------------------------------------------------
# Rotations (numpy, batched). scipy's Rotation gives matrices that differ from these in the last
# bit (it goes through quaternions), which could change rendered bytes; these stay.
# ----------------------------------------------------------------------------------------------
def _cos_sin_one_zero(a):
    a = np.asarray(a, dtype=np.float64)
    return a.shape, np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)


def rot_x(a):
    shape, c, s, o, z = _cos_sin_one_zero(a)
    return np.stack([o, z, z, z, c, -s, z, s, c], -1).reshape(shape + (3, 3))


def rot_y(a):
    shape, c, s, o, z = _cos_sin_one_zero(a)
    return np.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(shape + (3, 3))


def rot_z(a):
    shape, c, s, o, z = _cos_sin_one_zero(a)
    return np.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(shape + (3, 3))


def align(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest rotation taking unit direction a onto unit direction b."""
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(a @ b)
    if c < -0.999999:  # opposite: any perpendicular axis
        axis = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k / (1 + c)


def frame_from(up: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Rows: canonical axes (x=person's left, y=up, z=forward) in a model's coordinates."""
    y = up / np.linalg.norm(up)
    x = left - (left @ y) * y
    x /= np.linalg.norm(x)
    return np.stack([x, y, np.cross(x, y)])


# ----------------------------------------------------------------------------------------------
# Canonical skeleton: the common ground of the pose sampler, BVH mocap and every body model.
# World axes x = person's left, y = up, z = forward; the rest pose is a T-pose, and a pose is
# one world rotation per joint (D_j maps the joint's T-pose segment direction onto the posed one).
# ----------------------------------------------------------------------------------------------
CANON = ["pelvis", "spine", "chest", "neck", "head",
         "l_hip", "l_knee", "l_ankle", "r_hip", "r_knee", "r_ankle",
         "l_collar", "l_shoulder", "l_elbow", "l_wrist",
         "r_collar", "r_shoulder", "r_elbow", "r_wrist"]
CANON_PARENT = [-1, 0, 1, 2, 3, 0, 5, 6, 0, 8, 9, 2, 11, 12, 13, 2, 15, 16, 17]
J = {n: i for i, n in enumerate(CANON)}
# Child whose position ends each limb segment; torso joints keep their orientation (no end).
CANON_END = {"l_hip": "l_knee", "l_knee": "l_ankle", "l_ankle": "toe", "r_hip": "r_knee",
             "r_knee": "r_ankle", "r_ankle": "toe", "l_collar": "l_shoulder",
             "l_shoulder": "l_elbow", "l_elbow": "l_wrist", "r_collar": "r_shoulder",
             "r_shoulder": "r_elbow", "r_elbow": "r_wrist"}
_FOOT = np.array([0.0, -0.35, 1.0]) / np.linalg.norm([0.0, -0.35, 1.0])
CANON_TDIR = {"l_hip": [0, -1, 0], "l_knee": [0, -1, 0], "l_ankle": _FOOT, "r_hip": [0, -1, 0],
              "r_knee": [0, -1, 0], "r_ankle": _FOOT, "l_collar": [1, 0, 0],
              "l_shoulder": [1, 0, 0], "l_elbow": [1, 0, 0], "r_collar": [-1, 0, 0],
              "r_shoulder": [-1, 0, 0], "r_elbow": [-1, 0, 0]}


def limb_alignments(pos: dict, M: np.ndarray, toe: dict) -> dict:
    """Per canonical limb joint: rotation taking its T-pose direction onto a rest skeleton's.

    pos: canonical joint name -> rest position (model coordinates); toe: side -> toe position.
    """
    out = {}
    for j, end in CANON_END.items():
        end_p = toe[j[0]] if end == "toe" else pos[end]
        out[j] = align(np.asarray(CANON_TDIR[j], float), M @ (end_p - pos[j]))
    out["l_wrist"], out["r_wrist"] = out["l_elbow"], out["r_elbow"]
    return out


def canonical_fk(local: np.ndarray) -> np.ndarray:
    """(n, J, 3, 3) local rotations in world-aligned rest frames -> world rotations."""
    world = np.empty_like(local)
    for j, p in enumerate(CANON_PARENT):
        world[:, j] = local[:, j] if p < 0 else world[:, p] @ local[:, j]
    return world


# ----------------------------------------------------------------------------------------------
# Body models
# ----------------------------------------------------------------------------------------------
PART = {n: i for i, n in enumerate(["head", "eye", "neck", "torso", "upperarm", "lowerarm", "hand",
                                     "pelvis", "upperleg", "lowerleg", "foot"])}


# MPII joints COCO lacks, as canonical skeleton joints (paper code: upper_neck = SMPL's "head"
# joint, thorax = its "neck" joint, pelvis = its root); every rig maps these through its CANON.
EXTRA_CANON = {"upper_neck": "head", "thorax": "neck", "pelvis": "pelvis"}


@dataclass(eq=False)  # hashed by identity: caches keyed by a body (merged faces, landmarks)
class BodyModel:
    """A posable body in canonical axes. `run(shape, world_rot)` -> vertices, keypoints (metres).

    world_rot are canonical-skeleton world rotations (n, J, 3, 3); each model bone takes the
    rotation of the canonical joint it follows (bone_src) times that joint's rest alignment.
    """
    name: str
    faces: np.ndarray          # (F, 3) int32
    rest: np.ndarray           # (V, 3) canonical rest vertices, feet at y=0, for appearance rules
    rest_kp: np.ndarray        # (17, 3) canonical rest keypoints (same frame as rest)
    part: np.ndarray           # (V,) int8 body part of each vertex
    # (17 + 4,) how far under the skin each keypoint, then EXTRA_POINTS, sits (m)
    kp_depth: np.ndarray
    bone_parent: np.ndarray    # (B,) parent bone, -1 for the root
    bone_src: np.ndarray       # (B,) canonical joint whose rotation the bone follows
    bone_align: np.ndarray     # (B, 3, 3) rest alignment of that joint (canonical axes)
    M: np.ndarray              # model -> canonical axes
    forward: object            # (shape (n, S), local rotations in model axes (n, B, 3, 3))
    #                            -> (verts, COCO keypoints (n, 17, 3), EXTRA_POINTS (n, 4, 3))
    sample_shape: object       # (rng, n, style) -> (n, S) shape parameters

    def run(self, shape: np.ndarray, world_rot: np.ndarray, extended: bool = False):
        """-> vertices (n, V, 3), keypoints (n, 17, 3), or
        (n, 21, 3) with EXTRA_POINTS when extended."""
        w = world_rot[:, self.bone_src] @ self.bone_align[None]
        parent = np.where(self.bone_parent < 0, 0, self.bone_parent)
        local = np.swapaxes(w[:, parent], -1, -2) @ w
        local[:, self.bone_parent < 0] = w[:, self.bone_parent < 0]
        local = self.M.T @ local @ self.M
        verts, kps, extra = self.forward(shape, local)
        to_canon = self.M.T.astype(np.float32)
        kps = kps @ to_canon  # the COCO points alone: their bytes do not depend on `extended`
        if extended:
            kps = np.concatenate([kps, extra @ to_canon], 1)
        return verts @ to_canon, kps


def _depth_under_skin(points: np.ndarray, rest: np.ndarray) -> np.ndarray:
    return np.sqrt(((points[:, None] - rest[None, ::3]) ** 2).sum(-1)).min(1)


def _retarget_tables(bone_parent, bone_names, bone_pos, canon_bone, toe, M):
    """Per model bone: the canonical joint it follows and that joint's rest alignment."""
    pos = {c: bone_pos[bone_names.index(b)] for c, b in canon_bone.items()}
    al = limb_alignments(pos, M, toe)
    B = len(bone_names)
    src, bone_align = np.zeros(B, int), np.tile(np.eye(3), (B, 1, 1))
    mapped = {bone_names.index(b): J[c] for c, b in canon_bone.items()}
    for b in range(B):  # parents come first in every rig used here
        if b in mapped:
            src[b] = mapped[b]
            bone_align[b] = al.get(CANON[mapped[b]], np.eye(3)).T  # rest direction -> T-pose
        elif bone_parent[b] >= 0:
            src[b], bone_align[b] = src[bone_parent[b]], bone_align[bone_parent[b]]
    return src, bone_align


def _finish_model(name, faces, verts0, kps0, extra0, part, bone_parent, bone_names, bone_pos,
                  canon_bone, toe, forward, sample_shape, M) -> BodyModel:
    """Shared set-up: rest frame, keypoint depths and the canonical->bone retarget tables."""
    rest, rest_kp, rest_extra = verts0 @ M.T, kps0 @ M.T, extra0 @ M.T
    floor = rest[:, 1].min()
    rest, rest_kp, rest_extra = (rest - [0, floor, 0], rest_kp - [0, floor, 0],
                                 rest_extra - [0, floor, 0])
    d = np.concatenate([_depth_under_skin(rest_kp, rest), _depth_under_skin(rest_extra, rest)])
    src, bone_align = _retarget_tables(bone_parent, bone_names, bone_pos, canon_bone, toe, M)
    return BodyModel(name, faces.astype(np.int32), rest.astype(np.float32),
                     rest_kp.astype(np.float32), part.astype(np.int8), d.astype(np.float32),
                     np.asarray(bone_parent), src, bone_align, M, forward, sample_shape)


ANNY_CANON = {"pelvis": "root", "spine": "spine05", "chest": "spine03", "neck": "neck01",
              "head": "head", "l_hip": "upperleg01.L", "l_knee": "lowerleg01.L",
              "l_ankle": "foot.L", "r_hip": "upperleg01.R", "r_knee": "lowerleg01.R",
              "r_ankle": "foot.R", "l_collar": "clavicle.L", "l_shoulder": "upperarm01.L",
              "l_elbow": "lowerarm01.L", "l_wrist": "wrist.L", "r_collar": "clavicle.R",
              "r_shoulder": "upperarm01.R", "r_elbow": "lowerarm01.R", "r_wrist": "wrist.R"}


def _anny_part(label: str) -> int:
    for key, part in [("eye", "eye"), ("head", "head"), ("neck", "neck"), ("upperarm", "upperarm"),
                      ("lowerarm", "lowerarm"), ("wrist", "hand"), ("finger", "hand"),
                      ("metacarpal", "hand"), ("upperleg", "upperleg"), ("lowerleg", "lowerleg"),
                      ("foot", "foot"), ("toe", "foot"), ("pelvis", "pelvis"), ("root", "pelvis")]:
        if label.startswith(key):
            return PART[part]
    return PART["torso"]  # spine, clavicle, shoulder01, breast


def _anny_shape(rng: np.random.Generator, n: int, style: str) -> np.ndarray:
    """anny phenotype [gender, age, muscle, weight, height, proportions] in [0, 1]."""
    gender = np.where(rng.random(n) < 0.5, rng.uniform(0.0, 0.3, n), rng.uniform(0.7, 1.0, n))
    # age anchors: newborn -1/3, baby 0, child 1/3, young 2/3, old 1; mostly adults
    age = np.where(rng.random(n) < (0.08 if style == "standin" else 0.04),
                   rng.uniform(0.42, 0.6, n), rng.uniform(0.62, 0.95, n))
    return np.stack([gender, age, rng.uniform(0.2, 0.8, n), rng.uniform(0.15, 0.85, n),
                     rng.uniform(0.2, 0.9, n), rng.uniform(0.3, 0.7, n)], 1)


# [ours] MPII head_top: anny's topmost vertex in the rest pose (all phenotypes 0.5)
ANNY_HEAD_TOP = 881


def load_anny() -> BodyModel:
    import torch
    import anny
    # plain torch skinning: warp's is a little faster but optional, chatty and not pinned here
    model = anny.Anny(skinning_method="lbs").to(torch.float32)
    regressor = anny.KeypointsRegressor.coco(model)
    w17 = regressor.regression_weights[:17].clone()
    labels = list(model.bone_labels)
    faces = model.get_triangular_faces().numpy()
    # a bone's head, posed, is its pose's translation (anny's rest bone frames sit at their heads)
    extra_bones = [labels.index(ANNY_CANON[EXTRA_CANON[p]]) for p in EXTRA_POINTS[1:]]

    def forward(shape, local):
        n = len(shape)
        pose = torch.eye(4).repeat(n, len(labels), 1, 1)
        pose[:, :, :3, :3] = torch.from_numpy(local.astype(np.float32))
        with torch.no_grad():
            out = model(pose_parameters=pose,
                        phenotype_kwargs=torch.from_numpy(shape.astype(np.float32)))
            v = out["vertices"]
            k = torch.einsum("kv,bvd->bkd", w17, v)
            e = torch.cat([v[:, [ANNY_HEAD_TOP]], out["bone_poses"][:, extra_bones, :3, 3]], 1)
        return v.numpy(), k.numpy(), e.numpy()

    with torch.no_grad():
        coeffs = model._get_phenotype_blendshape_coefficients(
            torch.full((1, len(model.phenotype_labels)), 0.5), torch.zeros(1, 0), torch.zeros(1, 0))
        heads = model.get_rest_model(coeffs)["rest_bone_heads"][0].numpy().astype(np.float64)
    v0, k0, e0 = (a[0].astype(np.float64) for a in
                  forward(np.full((1, 6), 0.5), np.tile(np.eye(3), (1, len(labels), 1, 1))))
    M = frame_from(k0[5:7].mean(0) - k0[11:13].mean(0), k0[11] - k0[12])
    dominant = model.vertex_bone_indices.gather(
        1, model.vertex_bone_weights.argmax(1, keepdim=True))[:, 0]
    part = np.array([_anny_part(labels[i]) for i in dominant.numpy()])
    toe = {"l": heads[labels.index("toe3-1.L")], "r": heads[labels.index("toe3-1.R")]}
    parents = np.array([int(p) for p in model.bone_parents])
    return _finish_model("anny", faces, v0, k0, e0, part, parents, labels, heads, ANNY_CANON, toe,
                         forward, lambda rng, n, style: _anny_shape(rng, n, style), M)


# SMPL family (body joints shared by SMPL, SMPL-H and SMPL-X)
SMPL_CANON = {"pelvis": 0, "spine": 3, "chest": 6, "neck": 12, "head": 15, "l_hip": 1,
              "l_knee": 4, "l_ankle": 7, "r_hip": 2, "r_knee": 5, "r_ankle": 8, "l_collar": 13,
              "l_shoulder": 16, "l_elbow": 18, "l_wrist": 20, "r_collar": 14, "r_shoulder": 17,
              "r_elbow": 19, "r_wrist": 21}
# COCO shoulders..ankles from SMPL's limb joints
# (paper code labels MPII's limbs with the same joints)
SMPL_BODY_KP = [16, 17, 18, 19, 20, 21, 1, 2, 4, 5, 7, 8]
SMPL_HEAD_TOP = 411  # paper code: MPII head_top = SMPL(-H) vertex 411, the top of the head
SMPL_PART = {0: "pelvis", 1: "upperleg", 2: "upperleg", 3: "torso", 4: "lowerleg", 5: "lowerleg",
             6: "torso", 7: "foot", 8: "foot", 9: "torso", 10: "foot", 11: "foot", 12: "neck",
             13: "torso", 14: "torso", 15: "head", 16: "upperarm", 17: "upperarm",
             18: "lowerarm", 19: "lowerarm"}
MODEL_FILES = {"smpl": ("smpl", "SMPL", ("pkl", "npz")),
               "smplh": ("smplh", "SMPLH", ("pkl", "npz")),
               "smplx": ("smplx", "SMPLX", ("npz", "pkl"))}


class _ChumpyStub:
    """Stands in for chumpy objects in official SMPL pickles; its state holds the array."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"x": state})


def _model_pickle_classes() -> dict:
    """(module, name) -> object: all that an official SMPL/SMPL-H/SMPL-X pickle may name (numpy
    arrays, scipy's sparse J_regressor, chumpy's Ch, whose stand-in takes its place, and the set
    inside a Ch's state), under every module path numpy and scipy have used. Loading a model file
    never runs code."""
    import codecs

    import scipy.sparse

    from numpy._core import multiarray
    allowed = {}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed |= {(core, "_reconstruct"): multiarray._reconstruct,
                    (core, "scalar"): multiarray.scalar}
    allowed |= {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                ("__builtin__", "set"): set, ("builtins", "set"): set,
                # how Python 3 writes bytes in a protocol-2 pickle
                ("_codecs", "encode"): codecs.encode}
    for kind in ("csc", "csr"):
        cls = getattr(scipy.sparse, f"{kind}_matrix")
        for module in ("scipy.sparse", f"scipy.sparse.{kind}", f"scipy.sparse._{kind}"):
            allowed[(module, f"{kind}_matrix")] = cls
    return allowed


# SMPL-X .npz: name tables as pickled dicts, unused here
MODEL_PICKLED_KEYS = ("joint2num", "part2num")


def load_model_arrays(path: Path) -> dict:
    """SMPL-family .pkl (chumpy inside, no chumpy needed) or .npz -> dict of numpy arrays. Only the
    classes such a file needs are let through; anything else is refused in one line naming it."""
    import pickle

    if path.suffix == ".npz":
        data = {}
        with np.load(path, allow_pickle=False) as z:
            for k in z.files:
                try:
                    data[k] = z[k]
                except ValueError:  # an object array: reading it would unpickle
                    if k not in MODEL_PICKLED_KEYS:
                        raise RenderError(f"refused {path}: its array {k!r} holds pickled "
                                          "Python objects, which an official model file "
                                          "does not") from None
    else:
        allowed = _model_pickle_classes()

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if module.split(".")[0] == "chumpy":
                    return _ChumpyStub
                if (module, name) not in allowed:
                    raise RenderError(f"refused {path}: it names {module}.{name}, which an "
                                      "official SMPL model file does not hold (loading it could "
                                      "run code)")
                return allowed[(module, name)]

        try:
            with open(path, "rb") as f:
                data = Unpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise RenderError(f"cannot read {path} ({type(e).__name__}): corrupt or not a SMPL "
                              "model file") from None
        if not isinstance(data, dict):
            raise RenderError(f"{path} holds a {type(data).__name__}, "
                              "not a SMPL model's dict of arrays")
    out = {}
    for k, v in data.items():
        if isinstance(v, _ChumpyStub):
            v = v.__dict__.get("x", v.__dict__.get("a"))
        if hasattr(v, "toarray"):  # scipy sparse J_regressor
            v = v.toarray()
        try:
            out[k] = np.asarray(v)
        except Exception:
            pass
    return out


def find_model_files(kind: str, model_path: str | None) -> dict:
    """gender -> file for a SMPL-family model, or a RenderError naming the expected layout."""
    sub, stem, exts = MODEL_FILES[kind]
    layout = (f"--model-path DIR must hold DIR/{sub}/{stem}_NEUTRAL.{exts[0]} (or {stem}_MALE/"
              f"{stem}_FEMALE, .{exts[0]} or .{exts[1]}; the files may also sit in DIR itself), "
              f"as downloaded from the {stem} website")
    if not model_path:
        raise RenderError(f"--body-model {kind} needs {layout}")
    root = Path(model_path)
    if not root.is_dir():
        raise RenderError(f"model path {root} is not a directory; {layout}")
    found = {}
    for gender in ("NEUTRAL", "MALE", "FEMALE"):
        for d in (root / sub, root):
            for ext in exts:
                old_name = f"basicModel_{gender[0].lower()}_lbs_10_207_0_v1.0.0.pkl"
                for name in (f"{stem}_{gender}.{ext}", old_name):
                    if (d / name).is_file() and gender.lower() not in found:
                        found[gender.lower()] = d / name
    if not found:
        raise RenderError(f"no {stem} model files under {root}; {layout}")
    return found


def _load_smpl_gender(kind: str, gender: str, path: Path):
    """One official SMPL-family file -> an smplx model (eval mode), or a one-line RenderError."""
    import contextlib
    import io
    import smplx
    from smplx.utils import Struct

    try:
        arrays = load_model_arrays(path)
        cls = {"smpl": smplx.SMPL, "smplh": smplx.SMPLH, "smplx": smplx.SMPLX}[kind]
        kw = dict(gender=gender, num_betas=10)
        quiet = contextlib.redirect_stdout(io.StringIO())  # smplx prints notices
        if kind == "smplx":  # SMPL-X takes a file, not arrays
            tmp = Path(tempfile.mkdtemp()) / f"SMPLX_{gender.upper()}.npz"
            np.savez(tmp, **arrays)
            with quiet:
                m = cls(str(tmp), ext="npz", use_pca=False, flat_hand_mean=True, **kw)
        else:
            if kind == "smplh":
                kw.update(use_pca=False, flat_hand_mean=True)
            with quiet:
                m = cls("", data_struct=Struct(**arrays), **kw)
    except RenderError:
        raise
    except Exception as e:
        raise RenderError(f"cannot load {path}: {type(e).__name__}: {e}") from None
    return m.eval()


def _smpl_call(kind: str, m, rotvecs, betas):
    """Run one gendered smplx model on axis-angle rotations (b, joints, 3); hands, face neutral."""
    import torch
    b = len(betas)
    n_body = 23 if kind == "smpl" else 21
    kw = dict(betas=torch.from_numpy(betas.astype(np.float32)), global_orient=rotvecs[:, 0],
              body_pose=rotvecs[:, 1:1 + n_body].reshape(b, -1))
    if kind != "smpl":
        kw.update(left_hand_pose=torch.zeros(b, 45), right_hand_pose=torch.zeros(b, 45))
    if kind == "smplx":
        kw.update(jaw_pose=torch.zeros(b, 3), leye_pose=torch.zeros(b, 3),
                  reye_pose=torch.zeros(b, 3), expression=torch.zeros(b, 10))
    with torch.no_grad():
        return m(**kw)


def _smpl_forward(kind: str, models: dict, face_v: list, head_top: int):
    """BodyModel.forward for SMPL-family models; shape[:, 10] in [0, 1) picks the gender."""
    genders = sorted(models)
    n_verts = next(iter(models.values())).v_template.shape[0]
    extra_joints = [SMPL_CANON[EXTRA_CANON[p]] for p in EXTRA_POINTS[1:]]

    def forward(shape, local):
        import torch
        from scipy.spatial.transform import Rotation
        n = len(shape)
        verts = np.zeros((n, n_verts, 3), np.float32)
        kps = np.zeros((n, 17, 3), np.float32)
        extra = np.zeros((n, len(EXTRA_POINTS), 3), np.float32)
        aa = torch.from_numpy(Rotation.from_matrix(local.reshape(-1, 3, 3)).as_rotvec()
                              .reshape(n, -1, 3).astype(np.float32))
        g_idx = np.clip((shape[:, 10] * len(genders)).astype(int), 0, len(genders) - 1)
        for gi, g in enumerate(genders):
            sel = np.nonzero(g_idx == gi)[0]
            if len(sel) == 0:
                continue
            out = _smpl_call(kind, models[g], aa[sel], shape[sel, :10])
            v, joints = out.vertices.numpy(), out.joints.numpy()
            verts[sel] = v
            kps[sel, :5] = v[:, face_v]
            kps[sel, 5:] = joints[:, SMPL_BODY_KP]
            extra[sel] = np.concatenate([v[:, [head_top]], joints[:, extra_joints]], 1)
        return verts, kps, extra

    return forward


def _smpl_parts(kind: str, lbs_weights: np.ndarray) -> np.ndarray:
    """Body part per vertex from its dominant joint (SMPL-X's jaw and eyes count as head)."""
    w = lbs_weights.argmax(1)
    return np.array([PART[SMPL_PART[j]] if j in SMPL_PART else
                     (PART["head"] if kind == "smplx" and j in (22, 23, 24) else PART["hand"])
                     for j in w])


def _smpl_sample_shape(rng, n, style):
    return np.concatenate([rng.normal(0, 1.0, (n, 10)).clip(-2.5, 2.5), rng.random((n, 1))], 1)


def load_smpl(kind: str, model_path: str | None) -> BodyModel:
    import torch
    from smplx.vertex_ids import vertex_ids as VIDS

    models = {g: _load_smpl_gender(kind, g, f)
              for g, f in find_model_files(kind, model_path).items()}
    base = models.get("neutral") or next(iter(models.values()))
    vid = VIDS["smplx" if kind == "smplx" else "smplh"]
    face_v = [vid["nose"], vid["leye"], vid["reye"], vid["lear"], vid["rear"]]
    parents = base.parents.numpy().astype(int)
    parents[0] = -1
    nj = len(parents)
    part = _smpl_parts(kind, base.lbs_weights.numpy())
    head_top = SMPL_HEAD_TOP
    if kind == "smplx":  # [ours] another topology: its topmost head vertex in the rest pose (y up)
        template = base.v_template.numpy()
        head_top = int(np.argmax(np.where(part == PART["head"], template[:, 1], -np.inf)))
    forward = _smpl_forward(kind, models, face_v, head_top)
    with torch.no_grad():
        joints0 = base().joints[0].numpy().astype(np.float64)
    rest_pose = forward(np.zeros((1, 11)), np.tile(np.eye(3), (1, nj, 1, 1)))
    v0, k0, e0 = (a[0].astype(np.float64) for a in rest_pose)
    M = frame_from(k0[5:7].mean(0) - k0[11:13].mean(0), k0[11] - k0[12])
    names = [str(i) for i in range(nj)]
    canon = {c: str(j) for c, j in SMPL_CANON.items()}
    toe = {"l": joints0[10], "r": joints0[11]}
    return _finish_model(kind, base.faces.astype(np.int64), v0, k0, e0, part, parents, names,
                         joints0[:nj], canon, toe, forward, _smpl_sample_shape, M)


@functools.cache
def get_body_model(name: str, model_path: str | None) -> BodyModel:
    if name == "anny":
        return load_anny()
    if name in MODEL_FILES:
        return load_smpl(name, model_path)
    raise RenderError(f"unknown body model {name!r}; choose from {', '.join(BODY_MODELS)}")


# ----------------------------------------------------------------------------------------------
# Poses: the built-in sampler and BVH mocap, both as canonical world rotations
# ----------------------------------------------------------------------------------------------
DEG = math.pi / 180
# Joint limits in degrees for the sampler, as (x, z, y) = (flexion, abduction, twist) of the
# left side (the right side mirrors z and y). x<0 swings a limb forward; knees bend with x>0.
LIMITS = {
    "pelvis": ((-15, 70), (-15, 15), (-30, 30)), "spine": ((-20, 45), (-20, 20), (-30, 30)),
    "chest": ((-15, 35), (-15, 15), (-25, 25)), "neck": ((-20, 30), (-15, 15), (-35, 35)),
    "head": ((-25, 30), (-15, 15), (-40, 40)), "l_hip": ((-115, 35), (-10, 45), (-30, 30)),
    "l_knee": ((0, 135), (0, 0), (-5, 5)), "l_ankle": ((-25, 40), (-10, 10), (-10, 10)),
    "l_collar": ((-10, 10), (-10, 25), (-5, 5)), "l_shoulder": ((-150, 50), (-82, 85), (-45, 45)),
    "l_elbow": ((0, 0), (0, 0), (-140, 0)), "l_wrist": ((-40, 40), (-30, 30), (-20, 20)),
}
LIMITS.update({k.replace("l_", "r_"): v for k, v in LIMITS.items() if k.startswith("l_")})
ARCHETYPES = ["stand", "walk", "reach", "bend", "sit", "arms_up", "squat", "floor_sit"]
STYLE_MIX = {  # [ours] synthetic: varied, mocap-like; standin: an everyday mix
    "synthetic": [0.16, 0.16, 0.14, 0.12, 0.12, 0.12, 0.10, 0.08],
    "standin": [0.36, 0.34, 0.10, 0.04, 0.10, 0.04, 0.01, 0.01],
}


# The sampler's archetypes write (x, z, y) degree angles into A (J, 3); u is rng.uniform. The
# order of the random draws is part of the output: keep it when editing.
def _arm(A, u, side, x, z, elbow):
    A[J[side + "_shoulder"]] = [x, z, u(-20, 20)]
    A[J[side + "_elbow"]] = [0, 0, -elbow]


def _leg(A, u, side, hip_x, knee, hip_z=None):
    A[J[side + "_hip"]] = [hip_x, u(0, 8) if hip_z is None else hip_z, u(-10, 10)]
    A[J[side + "_knee"]] = [knee, 0, 0]


def _stand(A, u, rng):
    A[J["head"]] = [u(-10, 20), u(-8, 8), u(-35, 35)]
    A[J["spine"]] = [u(-5, 8), u(-5, 5), u(-8, 8)]
    for s in "lr":
        _arm(A, u, s, u(-20, 15), u(-80, -62), u(0, 35))
        _leg(A, u, s, u(-8, 8), u(0, 10))
        A[J[s + "_collar"]] = [0, u(-5, 8), 0]
        A[J[s + "_ankle"]] = [u(-10, 10), 0, 0]


def _walk(A, u, rng):
    phase, amp = u(0, 2 * math.pi), u(15, 32)
    sw = math.sin(phase)
    _leg(A, u, "l", -amp * sw, u(5, 15) + 40 * max(0.0, math.cos(phase)))
    _leg(A, u, "r", amp * sw, u(5, 15) + 40 * max(0.0, -math.cos(phase)))
    _arm(A, u, "l", 0.8 * amp * sw, u(-80, -68), u(10, 45))
    _arm(A, u, "r", -0.8 * amp * sw, u(-80, -68), u(10, 45))
    A[J["chest"], 2] = -0.3 * amp * sw


def _reach(A, u, rng):
    s = "l" if rng.random() < 0.5 else "r"
    _arm(A, u, s, u(-130, -40), u(-30, 60), u(0, 30))
    if rng.random() < 0.4:
        _arm(A, u, "r" if s == "l" else "l", u(-110, -40), u(-40, 30), u(0, 40))
    A[J["chest"]] = [u(-5, 15), u(-15, 15), u(-25, 25)]
    if rng.random() < 0.5:
        _leg(A, u, "l", u(-30, 0), u(0, 25))


def _bend(A, u, rng):
    tilt = [u(25, 60), u(5, 20), u(0, 15)]
    A[J["pelvis"], 0], A[J["spine"], 0], A[J["chest"], 0] = tilt
    for s in "lr":
        _leg(A, u, s, -tilt[0] + u(-8, 5), u(0, 25))
        _arm(A, u, s, -sum(tilt) + u(-25, 15), u(-85, -65), u(0, 40))
    A[J["head"], 0] = u(-30, 0)


def _sit(A, u, rng):
    for s in "lr":
        _leg(A, u, s, u(-100, -78), u(75, 100), u(0, 15))
        _arm(A, u, s, u(-55, -20), u(-80, -65), u(40, 90))
    A[J["spine"], 0] = u(-5, 15)


def _arms_up(A, u, rng):
    for s in "lr" if rng.random() < 0.7 else ("l" if rng.random() < 0.5 else "r"):
        _arm(A, u, s, u(-40, 10), u(30, 82), u(0, 50))
    A[J["chest"], 0] = u(-12, 5)


def _squat(A, u, rng):
    A[J["pelvis"], 0] = u(15, 40)
    for s in "lr":
        _leg(A, u, s, -A[J["pelvis"], 0] + u(-100, -75), u(100, 130), u(10, 25))
        _arm(A, u, s, -A[J["pelvis"], 0] + u(-80, -30), u(-60, -30), u(0, 60))
        A[J[s + "_ankle"], 0] = u(-25, -10)


def _floor_sit(A, u, rng):
    for s in "lr":
        _leg(A, u, s, u(-95, -75), u(0, 35), u(5, 20))
        _arm(A, u, s, u(10, 35), u(-82, -70), u(0, 20))
    A[J["spine"], 0] = u(-10, 10)


ARCHETYPE_POSES = {"walk": _walk, "reach": _reach, "bend": _bend, "sit": _sit, "arms_up": _arms_up,
                   "squat": _squat, "floor_sit": _floor_sit}  # on top of _stand


def _pose_angles(rng: np.random.Generator, archetype: str) -> np.ndarray:
    """(J, 3) angles in degrees (x, z, y) for one person, left-side convention for both sides."""
    A = np.zeros((len(CANON), 3))
    _stand(A, rng.uniform, rng)
    if archetype in ARCHETYPE_POSES:
        ARCHETYPE_POSES[archetype](A, rng.uniform, rng)
    return A


def angles_to_local(A: np.ndarray) -> np.ndarray:
    """(n, J, 3) (x, z, y) degrees -> (n, J, 3, 3) local rotations Rx @ Rz @ Ry
    (right side mirrored)."""
    A = A.copy()
    right = np.array([c.startswith("r_") for c in CANON])
    for j, c in enumerate(CANON):  # joint limits respected
        lim = np.array(LIMITS[c.replace("r_", "l_")], float)
        A[:, j] = A[:, j].clip(lim[:, 0], lim[:, 1])
    A[:, right, 1:] *= -1
    A *= DEG
    return rot_x(A[..., 0]) @ rot_z(A[..., 1]) @ rot_y(A[..., 2])


def sample_poses(rng: np.random.Generator, n: int, style: str) -> np.ndarray:
    """(n, J, 3, 3) canonical world rotations from the built-in sampler."""
    kinds = rng.choice(len(ARCHETYPES), size=n, p=STYLE_MIX[style])
    A = np.stack([_pose_angles(rng, ARCHETYPES[k]) for k in kinds])
    noise = 6.0 if style == "synthetic" else 3.0
    A += rng.normal(0, noise, A.shape)
    return canonical_fk(angles_to_local(A))


# BVH: CMU names first, then MakeHuman rig names (which are also anny's bone names)
BVH_NAMES = {
    "pelvis": ["Hips", "root"], "spine": ["LowerBack", "lowerback", "spine05"],
    "chest": ["Spine1", "Chest", "spine03"], "neck": ["LowerNeck", "lowerneck", "Neck", "neck01"],
    "head": ["Head", "head"], "l_hip": ["LeftUpLeg", "LeftHip", "upperleg01.L"],
    "l_knee": ["LeftLeg", "LeftKnee", "lowerleg01.L"],
    "l_ankle": ["LeftFoot", "LeftAnkle", "foot.L"],
    "r_hip": ["RightUpLeg", "RightHip", "upperleg01.R"],
    "r_knee": ["RightLeg", "RightKnee", "lowerleg01.R"],
    "r_ankle": ["RightFoot", "RightAnkle", "foot.R"],
    "l_collar": ["LeftShoulder", "LeftCollar", "clavicle.L"],
    "l_shoulder": ["LeftArm", "LeftShoulder", "upperarm01.L"],
    "l_elbow": ["LeftForeArm", "LeftElbow", "lowerarm01.L"],
    "l_wrist": ["LeftHand", "LeftWrist", "wrist.L"],
    "r_collar": ["RightShoulder", "RightCollar", "clavicle.R"],
    "r_shoulder": ["RightArm", "RightShoulder", "upperarm01.R"],
    "r_elbow": ["RightForeArm", "RightElbow", "lowerarm01.R"],
    "r_wrist": ["RightHand", "RightWrist", "wrist.R"],
}
# [ours] keep ~15 poses per second of mocap (neighbours are near-duplicates)
BVH_STRIDE_S = 1 / 15


def _skip_end_site(tokens: list, i: int):
    """tokens[i] is the '{' of an End Site -> (index after its '}', its OFFSET or None)."""
    depth, offset = 0, None
    while i < len(tokens):
        if tokens[i] == "{":
            depth += 1
        if tokens[i] == "}":
            depth -= 1
            if depth == 0:
                break
        if tokens[i] == "OFFSET" and depth == 1:
            offset = np.array(tokens[i + 1:i + 4], float)
        i += 1
    return i + 1, offset


def _parse_hierarchy(tokens: list):
    """HIERARCHY tokens -> joint names, parents, offsets, channel names,
    {joint: End Site offset}."""
    names, parents, offsets, channels, stack, end_sites = [], [], [], [], [], {}
    i, pending = 0, None
    while i < len(tokens):
        t = tokens[i]
        if t in ("ROOT", "JOINT"):
            pending, i = tokens[i + 1], i + 2
        elif t == "End":
            i, offset = _skip_end_site(tokens, i + 2)
            pending = None
            if offset is not None:
                end_sites[stack[-1] if stack else -1] = offset
        elif t == "{":
            if pending is not None:
                names.append(pending)
                parents.append(stack[-1] if stack else -1)
                offsets.append(np.zeros(3))
                channels.append([])
                stack.append(len(names) - 1)
                pending = None
            i += 1
        elif t == "}":
            stack.pop()
            i += 1
        elif t == "OFFSET":
            offsets[stack[-1]] = np.array(tokens[i + 1:i + 4], float)
            i += 4
        elif t == "CHANNELS":
            c = int(tokens[i + 1])
            channels[stack[-1]] = tokens[i + 2:i + 2 + c]
            i += 2 + c
        else:
            i += 1
    return names, parents, offsets, channels, end_sites


def _parse_motion(path: Path, numbers: list, frames: int, nch: int) -> np.ndarray:
    """MOTION numbers -> (frames, nch). Strict: a file that holds fewer (or more) numbers than its
    header promises is refused, not used in part: it is usually a cut-off download or copy, and
    using what is left would make the pose bank, so the rendered bytes, differ from a complete
    copy's without anyone noticing."""
    if nch == 0 or frames < 1:
        raise RenderError(f"{path}: malformed BVH ({nch} channels, {frames} frames)")
    if len(numbers) != frames * nch:
        whole, rest = divmod(len(numbers), nch)
        held = f"{whole} frames" + (f" and {rest} numbers" if rest else "")
        raise RenderError(f"{path}: truncated or malformed BVH: its header promises {frames} "
                          f"frames of {nch} channels, the file holds {held}")
    try:
        return np.array(numbers, float).reshape(frames, nch)
    except ValueError:
        raise RenderError(f"{path}: motion data holds something that is not a number") from None


def parse_bvh(path: Path):
    """-> joint names, parents, offsets (K, 3), per-joint channel names, motion (T, C), frame time,
    {joint: End Site offset}."""
    text = path.read_text(errors="replace")
    head, sep, motion = text.partition("MOTION")
    if not sep:
        raise RenderError(f"{path}: not a BVH file (no MOTION section)")
    names, parents, offsets, channels, end_sites = _parse_hierarchy(head.split())
    m = re.search(r"Frames:\s*(\d+)\s*Frame Time:\s*([0-9.eE+-]+)", motion)
    if not names or not m:
        raise RenderError(f"{path}: malformed BVH (no joints or no 'Frames:'/'Frame Time:' header)")
    data = _parse_motion(path, motion[m.end():].split(), int(m.group(1)),
                         sum(len(c) for c in channels))
    return names, parents, np.array(offsets), channels, data, float(m.group(2)), end_sites


def bvh_to_canonical(path: Path) -> np.ndarray:
    """A BVH file -> (T, J, 3, 3) canonical world rotations (subsampled frames)."""
    try:
        names, parents, offsets, channels, data, frame_time, end_sites = parse_bvh(path)
    except RenderError:
        raise
    except Exception as e:
        raise RenderError(f"{path}: unreadable BVH ({type(e).__name__}: {e})") from None
    idx = {}
    for c, options in BVH_NAMES.items():
        hit = [names.index(o) for o in options if o in names]
        if not hit:
            raise RenderError(f"{path}: no joint for {c} (expected one of {', '.join(options)}: "
                              "CMU or MakeHuman joint names)")
        idx[c] = hit[0]
    # CMU's "LeftShoulder" is the collar in some exports and the upper arm in others: prefer
    # the mapping in which collar and shoulder are different joints.
    if idx["l_collar"] == idx["l_shoulder"]:
        idx["l_collar"] = parents[idx["l_shoulder"]]
        idx["r_collar"] = parents[idx["r_shoulder"]]
    step = max(1, int(round(BVH_STRIDE_S / max(frame_time, 1e-4))))
    data = data[::step]
    T, K = len(data), len(names)
    world = np.zeros((T, K, 3, 3))
    rest = np.zeros((K, 3))
    col = 0
    for k in range(K):
        R = np.tile(np.eye(3), (T, 1, 1))
        for ch in channels[k]:
            v = data[:, col] * DEG
            col += 1
            if ch.lower().endswith("rotation"):
                R = R @ {"x": rot_x, "y": rot_y, "z": rot_z}[ch[0].lower()](v)
        p = parents[k]
        world[:, k] = R if p < 0 else world[:, p] @ R
        rest[k] = offsets[k] if p < 0 else rest[p] + offsets[k]
    Mb = frame_from(rest[idx["neck"]] - rest[idx["pelvis"]],
                    rest[idx["l_hip"]] - rest[idx["r_hip"]])
    pos = {c: rest[k] for c, k in idx.items()}
    toe = {}
    for s in "lr":
        a = idx[s + "_ankle"]
        kids = [k for k in range(K) if parents[k] == a]
        toe[s] = rest[kids[0]] if kids else rest[a] + end_sites.get(a, offsets[a] * 0 + [0, 0, 1])
    al = limb_alignments(pos, Mb, toe)
    out = np.zeros((T, len(CANON), 3, 3))
    for c, k in idx.items():
        out[:, J[c]] = Mb @ world[:, k] @ Mb.T @ al.get(c, np.eye(3))
    if not np.isfinite(out).all():
        raise RenderError(f"{path}: motion data holds non-numbers")
    return out


@functools.cache
def load_pose_bank(poses_dir: str) -> np.ndarray:
    """All BVH files under a folder -> (N, J, 3, 3); cached per process."""
    root = Path(poses_dir)
    if not root.is_dir():
        raise RenderError(f"poses folder {root} does not exist")
    files = sorted(root.rglob("*.bvh"))
    if not files:
        raise RenderError(f"poses folder {root} holds no .bvh files")
    bank = np.concatenate([bvh_to_canonical(f) for f in files]).astype(np.float32)
    bank.flags.writeable = False  # shared by every caller
    return bank


def pick_poses(rng: np.random.Generator, n: int, style: str, poses_dir: str | None) -> np.ndarray:
    """[ours] With --poses, 75% of people take a mocap frame and 25% a sampled pose."""
    world = sample_poses(rng, n, style)
    if poses_dir:
        bank = load_pose_bank(poses_dir)
        use = rng.random(n) < 0.75
        world[use] = bank[rng.integers(0, len(bank), n)][use]
    return world


# ----------------------------------------------------------------------------------------------
# Appearance: per-vertex albedo from rules in the rest frame (skin, face, hair, garments, shoes)
# ----------------------------------------------------------------------------------------------
SKIN = np.array([[255, 224, 196], [241, 194, 167], [224, 172, 138], [198, 134, 100],
                 [161, 102, 73], [120, 75, 52], [86, 54, 39]], float) / 255
HAIR = np.array([[20, 17, 15], [45, 30, 20], [85, 55, 35], [150, 110, 60], [200, 165, 100],
                 [120, 50, 25], [150, 150, 150]], float) / 255
IRIS = np.array([[60, 40, 25], [95, 65, 35], [70, 100, 140], [80, 110, 70]], float) / 255


def _hsv(h, s, v):
    import colorsys
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _garment_colour(rng, style):
    if rng.random() < 0.3:  # greys, black, white, denim
        return (np.array([[0.9, 0.9, 0.88], [0.12, 0.12, 0.13], [0.5, 0.5, 0.52],
                          [0.2, 0.28, 0.45], [0.7, 0.62, 0.5]])[rng.integers(5)]
                * rng.uniform(0.85, 1.1))
    return _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.25, 0.95))


def _pattern(rng, P: np.ndarray, style: str) -> np.ndarray:
    """A 0/1 texture over rest positions: stripes, checks, dots, plaid or blotches."""
    x, y, z = P[:, 0], P[:, 1], P[:, 2]
    ang = np.arctan2(x, z)  # around the body axis
    kind = rng.choice(["hstripe", "vstripe", "check", "dots", "plaid", "blotch"])
    f = rng.uniform(12, 40)
    if kind == "hstripe":
        return (np.sin(y * f * 2 * math.pi / 6) > rng.uniform(-0.3, 0.5)).astype(float)
    if kind == "vstripe":
        return (np.sin(ang * rng.integers(8, 20)) > 0.3).astype(float)
    if kind == "check":
        return ((np.sin(y * f) > 0) ^ (np.sin(ang * rng.integers(6, 14)) > 0)).astype(float)
    if kind == "dots":
        return ((np.sin(y * f * 1.5) * np.sin(ang * 18)) > 0.55).astype(float)
    if kind == "plaid":
        return np.maximum(np.sin(y * f) > 0.7, np.sin(ang * 10) > 0.7).astype(float)
    d = rng.normal(size=(4, 3))
    waves = sum(np.sin(P @ d[i] * rng.uniform(5, 15) + rng.uniform(0, 6)) for i in range(4))
    return (waves > 0.3).astype(float)


@functools.cache
def _figure(body: BodyModel) -> types.SimpleNamespace:
    """Rest-frame landmarks of a body for the appearance rules (no randomness: once per body)."""
    P, part, kp = body.rest, body.part, body.rest_kp
    x, y, z = P[:, 0], P[:, 1], P[:, 2]
    head_cz = (kp[3, 2] + kp[4, 2]) / 2
    return types.SimpleNamespace(
        P=P, part=part, x=x, y=y, z=z, nose=kp[0], leye=kp[1], reye=kp[2], lear=kp[3],
        sh_y=kp[5:7, 1].mean(), hip_y=kp[11:13, 1].mean(), knee_y=kp[13:15, 1].mean(),
        ank_y=kp[15:17, 1].mean(), eye_y=(kp[1][1] + kp[2][1]) / 2, head_cz=head_cz,
        in_head=(part == PART["head"]) | (part == PART["eye"]) | (part == PART["neck"]),
        upper_arm_len=np.linalg.norm(kp[5] - kp[7]),
        arm_d=np.minimum(np.linalg.norm(P - kp[5], axis=1), np.linalg.norm(P - kp[6], axis=1)),
        is_arm=np.isin(part, [PART["upperarm"], PART["lowerarm"]]), front=z > head_cz - 0.02,
        torso_mid_z=np.median(z[part == PART["torso"]]))


# The appearance rules below paint col (V, 3) in place. The order of their random draws is part of
# the output: keep it when editing.
def _garment(col, P, mask, c, rng, style, p_tex):
    """One garment: a plain colour with a faint weave, or a two-colour pattern."""
    c2 = _garment_colour(rng, style)
    if rng.random() < p_tex:
        t = _pattern(rng, P[mask], style)[:, None]
        col[mask] = c * (1 - t) + c2 * t
    else:
        col[mask] = c * (1 + 0.06 * np.sin(P[mask] @ rng.normal(size=3) * 30))[:, None]


def _dress(col, F, rng, style) -> dict:
    """Lower and upper garments -> the top's mask, colour and cut (the front cues go on it)."""
    part, x, y = F.part, F.x, F.y
    # lower garment: trousers, three-quarter, shorts
    low_cut = [F.ank_y + 0.04, F.knee_y - 0.12, F.knee_y + 0.12][rng.choice(3, p=[0.6, 0.15, 0.25])]
    waist = F.hip_y + rng.uniform(0.06, 0.12)
    lower = ((np.isin(part, [PART["pelvis"], PART["upperleg"], PART["lowerleg"]]) & (y > low_cut))
             | ((part == PART["torso"]) & (y < waist)))
    # upper garment: sleeveless, short, elbow, long sleeves; round or V neckline
    sleeve = [0.0, 0.5, 1.05, 2.2][rng.choice(4, p=[0.1, 0.45, 0.15, 0.3])] * F.upper_arm_len
    neck_y = F.sh_y + rng.uniform(0.02, 0.06)
    vdepth = rng.uniform(0.0, 0.12)
    neckline = F.front & (y > neck_y - vdepth - 0.03 + 1.5 * np.abs(x)) & (np.abs(x) < 0.09)
    upper = (((part == PART["torso"]) & (y >= waist) & ~neckline)
             | (F.is_arm & (F.arm_d < sleeve))
             | ((part == PART["neck"]) & (y < neck_y - 0.04) & ~F.front))
    c_low, c_up = _garment_colour(rng, style), _garment_colour(rng, style)
    p_tex = 0.75 if style == "standin" else 0.3
    for mask, c in ((lower, c_low), (upper, c_up)):
        _garment(col, F.P, mask, c, rng, style, p_tex)
    return dict(mask=upper, colour=c_up, waist=waist, neck_y=neck_y, vdepth=vdepth)


def _front_cues(col, F, top: dict, rng, style):
    """Collar band, then a chest print, a pocket or a buttoned placket on the front of the top."""
    x, y, upper, c_up = F.x, F.y, top["mask"], top["colour"]
    accent = _garment_colour(rng, style)
    if np.linalg.norm(accent - c_up) < 0.25:
        accent = 1 - c_up
    collar = (upper & F.front & (y > top["neck_y"] - top["vdepth"] - 0.055 + 1.5 * np.abs(x))
              & (np.abs(x) < 0.11))
    col[collar] = c_up * 0.55
    chest_y = F.sh_y - rng.uniform(0.1, 0.16)
    kind = rng.integers(3)
    front_face = upper & (F.z > F.torso_mid_z + 0.02)
    if kind == 0:   # print in the middle of the chest
        w, h = rng.uniform(0.05, 0.09), rng.uniform(0.04, 0.07)
        col[front_face & (np.abs(x) < w) & (np.abs(y - chest_y) < h)] = accent
    elif kind == 1:  # pocket / logo on the left chest
        col[front_face & (np.abs(x - 0.08) < 0.035) & (np.abs(y - chest_y - 0.02) < 0.03)] = accent
    else:           # placket with buttons
        placket = front_face & (np.abs(x) < 0.012) & (y > top["waist"])
        col[placket] = c_up * 0.7
        col[placket & (np.sin(y * 2 * math.pi / 0.08) > 0.6)] = accent


def _shoes(col, F, rng, style):
    """Shoes (and socks under trousers)."""
    shoe = (F.part == PART["foot"]) | ((F.part == PART["lowerleg"]) & (F.y < F.ank_y + 0.02))
    col[shoe] = [[0.08, 0.08, 0.08], [0.92, 0.92, 0.9], [0.35, 0.22, 0.12],
                 _garment_colour(rng, style)][rng.choice(4, p=[0.45, 0.25, 0.15, 0.15])]


def _hair(col, F, rng) -> np.ndarray:
    """Top and back of the head, down the neck for long hair; none when bald. -> hair colour."""
    x, y, z = F.x, F.y, F.z
    hair_c = HAIR[rng.integers(len(HAIR))] * rng.uniform(0.85, 1.15)
    long_hair = rng.random() < 0.35
    if rng.random() > 0.05:
        fwd = np.clip((z - F.head_cz) / 0.09, 0, 1)
        hairline = F.eye_y + 0.035 + 0.02 * fwd
        back = (z < F.head_cz - 0.015) & (y > F.lear[1] - (0.14 if long_hair else 0.03))
        hair = (F.in_head & ((y > hairline) | back))
        if long_hair:
            hair |= ((F.part == PART["torso"]) & (z < F.head_cz - 0.06) & (y > F.sh_y - 0.12)
                     & (np.abs(x) < 0.12))
        col[hair] = hair_c
    return hair_c


def _face(col, F, rng, skin, hair_c):
    """Eyes (sclera, iris, pupil), brows, lips, a darker nose tip."""
    x, y, z, nose = F.x, F.y, F.z, F.nose
    face = F.in_head & (z > F.head_cz + 0.03)
    for e in (F.leye, F.reye):
        r = np.hypot(x - e[0], y - e[1])
        col[face & (r < 0.012)] = [0.93, 0.93, 0.9]
        col[face & (r < 0.0065)] = IRIS[rng.integers(len(IRIS))]
        col[face & (r < 0.003)] = [0.03, 0.03, 0.03]
        col[face & (np.abs(x - e[0]) < 0.02) & (y > e[1] + 0.014)
            & (y < e[1] + 0.024)] = hair_c * 0.6
    mouth_y = nose[1] - rng.uniform(0.032, 0.04)
    lips = face & (np.abs(x) < 0.022 - 20 * (y - mouth_y) ** 2 * 10) & (np.abs(y - mouth_y) < 0.006)
    col[lips] = skin * [0.75, 0.45, 0.45]
    col[face & (np.hypot(x - nose[0], y - nose[1] + 0.012) < 0.012)
        & (z > nose[2] - 0.02)] = skin * 0.85


def person_albedo(body: BodyModel, rng: np.random.Generator, style: str) -> np.ndarray:
    """(V, 3) float albedo for one person. Front/back and left/right cues: face, hair on the
    back of the head, a collar/print/buttons on the front of the top, shoes."""
    F = _figure(body)
    skin = SKIN[rng.integers(len(SKIN))] * rng.uniform(0.92, 1.06, 3)
    col = np.tile(skin, (len(F.P), 1))
    top = _dress(col, F, rng, style)
    _front_cues(col, F, top, rng, style)
    _shoes(col, F, rng, style)
    hair_c = _hair(col, F, rng)
    _face(col, F, rng, skin, hair_c)
    return np.clip(col, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Lighting (per vertex): the paper's random spherical harmonics, or a warm key light
# ----------------------------------------------------------------------------------------------
def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    import torch
    v = torch.from_numpy(verts)
    f = torch.from_numpy(faces.astype(np.int64))
    fn = torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=1)
    n = torch.zeros_like(v)
    for k in range(3):
        n.index_add_(0, f[:, k], fn)
    return torch.nn.functional.normalize(n, dim=1).numpy()


def sample_lighting(rng: np.random.Generator, style: str) -> dict:
    if style == "synthetic":
        sh = np.concatenate([[SH_DC[0] + SH_DC[1] * rng.random(), SH_1 * rng.random()],
                             SH_REST * rng.uniform(-1, 1, 7)])
        return {"sh": sh, "tint": rng.uniform(0.9, 1.1, 3)}
    az, el = rng.uniform(-1.2, 1.2), rng.uniform(0.3, 1.1)
    d = np.array([math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el)])
    return {"dir": d, "key": rng.uniform(0.7, 1.0) * np.array([1.0, 0.9, 0.75]),
            "fill": rng.uniform(0.35, 0.5) * np.array([0.8, 0.85, 1.0])}


def shade(normals: np.ndarray, light: dict) -> np.ndarray:
    """(N, 3) per-vertex light colour; normals are in the camera-facing world frame."""
    x, y, z = normals[:, 0], normals[:, 2], normals[:, 1]  # SH in a z-up frame, as Blender's
    if "sh" in light:
        c = light["sh"]
        basis = np.stack([0.282095 * np.ones_like(x), 0.488603 * y, 0.488603 * z, 0.488603 * x,
                          1.092548 * x * y, 1.092548 * y * z, 0.315392 * (3 * z * z - 1),
                          1.092548 * x * z, 0.546274 * (x * x - y * y)], 1)
        e = (basis @ c) / (0.282095 * 0.95)
        return np.clip(e, 0.15, 1.5)[:, None] * light["tint"]
    lam = np.clip(normals @ light["dir"], 0, None)
    return light["fill"] + lam[:, None] * light["key"]


# ----------------------------------------------------------------------------------------------
# Backgrounds: photos (user folder, else people-free photos shipped with scikit-image and
# scikit-learn) with random crops and colour jitter, plus procedural ones
# ----------------------------------------------------------------------------------------------
SKIMAGE_PHOTOS = ["coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "hubble_deep_field.jpg", "brick.png", "grass.png",
                  "gravel.png"]


def background_files(folder: str | None) -> list:
    if folder:
        root = Path(folder)
        if not root.is_dir():
            raise RenderError(f"backgrounds folder {root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise RenderError(f"backgrounds folder {root} holds no images "
                              f"({', '.join(IMAGE_EXTS)})")
        return files
    import skimage
    import sklearn.datasets
    files = [Path(skimage.__file__).parent / "data" / n for n in SKIMAGE_PHOTOS]
    files += sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
    return [f for f in files if f.is_file()]


@functools.lru_cache(maxsize=256)  # bounded: a folder of large photos would not fit in memory
def _load_photo(path: Path) -> np.ndarray | None:
    import cv2
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is not None:
        s = 1024 / max(img.shape[:2])
        if s < 1:  # keep memory bounded when a folder of large photos is used
            img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        img = img[:, :, ::-1].copy()
        img.flags.writeable = False  # shared by every caller
    return img


def unreadable_backgrounds(files: list) -> list:
    """Files no image decoder recognises (checked from their first bytes: cheap for big folders).
    Rendering skips them: its draws still pick them (so output stays as before), then redraw."""
    import cv2
    return [f for f in files if not cv2.haveImageReader(str(f))]


def photo_background(rng, files: list, size: int) -> np.ndarray:
    import cv2
    for _ in range(20):
        img = _load_photo(files[rng.integers(len(files))])
        if img is not None:
            break
    else:
        raise RenderError("no background photo could be read")
    h, w = img.shape[:2]
    s = int(min(h, w) * rng.uniform(0.45, 1.0))
    y0, x0 = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
    out = cv2.resize(img[y0:y0 + s, x0:x0 + s], (size, size),
                     interpolation=cv2.INTER_AREA).astype(np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    grey = out.mean(2, keepdims=True)
    out = grey + (out - grey) * rng.uniform(0.6, 1.3)                       # saturation
    out = (out - out.mean()) * rng.uniform(0.75, 1.2) + out.mean()          # contrast
    out = out * rng.uniform(0.7, 1.25) * rng.uniform(0.9, 1.1, 3)           # brightness, tint
    return np.clip(out, 0, 255).astype(np.uint8)


def procedural_background(rng, size: int) -> np.ndarray:
    """Sky/ground gradients with low-frequency noise, or tiled and striped walls."""
    import cv2
    yy = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    top, bottom = (_hsv(rng.random(), rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.95)) * 255
                   for _ in range(2))
    horizon = rng.uniform(0.2, 0.8)
    img = np.where(yy < horizon, top + (bottom - top) * 0.3 * yy / horizon,
                   bottom * (0.7 + 0.3 * yy)) * np.ones((1, size, 1), np.float32)
    k = rng.integers(4, 24)
    noise = cv2.resize(rng.normal(0, 1, (k, k, 1)).astype(np.float32), (size, size),
                       interpolation=cv2.INTER_CUBIC)[..., None] * (1 + 0.15 * rng.normal(size=3))
    img += noise * rng.uniform(8, 35)
    if rng.random() < 0.4:
        period = rng.uniform(0.03, 0.15) * size
        xx = np.arange(size, dtype=np.float32)
        tiles = ((np.sin(xx[None] * 2 * math.pi / period) > 0)
                 ^ (np.sin(xx[:, None] * 2 * math.pi / period) > 0))
        img *= (0.8 + 0.2 * tiles[..., None])
    return np.clip(img, 0, 255).astype(np.uint8)


def sample_background(rng, style: str, size: int, files: list) -> np.ndarray:
    # [ours] standin: photos only; synthetic: half photos, half procedural
    if style == "standin" or rng.random() < 0.5:
        return photo_background(rng, files, size)
    return procedural_background(rng, size)


# ----------------------------------------------------------------------------------------------
# Camera and scene layout
# ----------------------------------------------------------------------------------------------
@dataclass
class Camera:
    R: np.ndarray      # world -> camera rotation (rows: right, up, back)
    c: np.ndarray      # centre in world coordinates
    f: float           # focal length in pixels
    w: int
    h: int
    pitch_deg: float

    def project(self, X: np.ndarray):
        """World points (..., 3)
        -> pixel u, v (COCO convention, origin at the top-left corner), depth."""
        p = (X - self.c) @ self.R.T
        d = -p[..., 2]
        safe = np.where(d > 1e-6, d, 1e-6)
        return self.w / 2 + self.f * p[..., 0] / safe, self.h / 2 - self.f * p[..., 1] / safe, d

    def gl_matrix(self) -> np.ndarray:
        t = np.eye(4)
        t[:3, :3] = self.R
        t[:3, 3] = -self.R @ self.c
        sx, sy = 2 * self.f / self.w, 2 * self.f / self.h
        proj = np.array([[sx, 0, 0, 0], [0, sy, 0, 0],
                         [0, 0, -(FAR + NEAR) / (FAR - NEAR), -2 * FAR * NEAR / (FAR - NEAR)],
                         [0, 0, -1, 0]])
        return (proj @ t).astype(np.float32)


def make_camera(distance: float, pitch_deg: float, w: int, h: int,
                look_height: float = LOOK_HEIGHT) -> Camera:
    p = pitch_deg * DEG
    fwd = np.array([0.0, -math.sin(p), -math.cos(p)])
    look = np.array([0.0, look_height, 0.0])
    c = look - distance * fwd
    back = -fwd
    right = np.array([1.0, 0.0, 0.0])
    R = np.stack([right, np.cross(back, right), back])
    return Camera(R, c, w / (2 * (SENSOR_MM / 2) / FOCAL_MM), w, h, pitch_deg)


def place_people(rng, cam: Camera, verts: np.ndarray, distance: float):
    """Ground positions (x, z) inside the visible area without overlaps;
    returns kept indices too."""
    n = len(verts)
    radius = np.sqrt((verts[:, :, [0, 2]] ** 2).sum(-1)).max(1) * 0.9
    heights = verts[:, :, 1].max(1)
    depth_range = GROUND_DEPTH * distance
    placed, pos = [], []
    for i in range(n):
        for _ in range(80):
            z = rng.uniform(-depth_range, depth_range)
            x = rng.uniform(-1, 1) * distance * 0.5
            foot, head = np.array([x, 0.0, z]), np.array([x, heights[i], z])
            (uf, ut), (vf, vt), _ = zip(*[cam.project(foot), cam.project(head)])
            if not (cam.w * (1 - PLACE_WIDTH) / 2 < uf < cam.w * (1 + PLACE_WIDTH) / 2):
                continue
            if not (vf < cam.h * 0.98 and vt > -0.1 * cam.h and vf > cam.h * 0.1):
                continue
            if all((x - pos[j][0]) ** 2 + (z - pos[j][1]) ** 2
                   > (radius[i] + radius[placed[j]] + 0.05) ** 2 for j in range(len(placed))):
                placed.append(i)
                pos.append((x, z))
                break
    return np.array(placed, int), np.array(pos, float).reshape(-1, 2)


# ----------------------------------------------------------------------------------------------
# OpenGL: one pass, all people in one vertex-coloured mesh, instance id in the alpha channel
# ----------------------------------------------------------------------------------------------
VERT_SHADER = """#version 330 core
layout(location = 0) in vec3 pos;
layout(location = 1) in vec4 col;
uniform mat4 mvp;
out vec3 v_col;
flat out float v_id;
void main() { gl_Position = mvp * vec4(pos, 1.0); v_col = col.rgb; v_id = col.a; }
"""
FRAG_SHADER = """#version 330 core
in vec3 v_col;
flat in float v_id;
out vec4 frag;
void main() { frag = vec4(v_col, v_id); }
"""


# PYOPENGL_PLATFORM -> its library (and pyrender class)
GL_PLATFORMS = {"egl": "EGL", "osmesa": "OSMesa"}
GL_INSTALL = {"egl": "apt-get install libegl1 libegl-mesa0 libgbm1 libgl1-mesa-dri",
              "osmesa": "apt-get install libosmesa6"}
_GL_PROBE = ("import os; os.environ['PYOPENGL_PLATFORM']='{0}'; "
             "from pyrender.platforms.{0} import {1}Platform as P; p=P(8,8); p.init_context(); "
             "p.make_current(); from OpenGL import GL; GL.glGetString(GL.GL_VERSION); print('ok')")


def _one_line(text) -> str:
    return " ".join(str(text).split())


@functools.cache
def gl_probe(name: str) -> bool:
    """Whether a fresh process can make a `name` GL context (GL stays out of this process)."""
    r = subprocess.run([sys.executable, "-c", _GL_PROBE.format(name, GL_PLATFORMS[name])],
                       capture_output=True, text=True, timeout=120)
    return r.returncode == 0 and "ok" in r.stdout


def choose_gl_platform() -> str:
    """EGL, else OSMesa; decided before OpenGL is imported (PyOpenGL binds it at import).

    A PYOPENGL_PLATFORM the user set is checked, not trusted: anything but egl or osmesa, or a
    platform whose library is missing, is a one-line RenderError rather than a failure deep in GL.
    """
    name = os.environ.get("PYOPENGL_PLATFORM")
    if name:
        if name not in GL_PLATFORMS:
            raise RenderError(f"PYOPENGL_PLATFORM={name} is not a headless platform this renderer "
                              f"can use: set it to {' or '.join(GL_PLATFORMS)}, or unset it to "
                              "pick one automatically")
        if not ctypes.util.find_library(GL_PLATFORMS[name]):
            raise RenderError(f"PYOPENGL_PLATFORM={name}, but lib{GL_PLATFORMS[name]} is not "
                              f"installed ({GL_INSTALL[name]}); or unset PYOPENGL_PLATFORM to pick "
                              "one automatically")
        return name
    for name, lib in GL_PLATFORMS.items():
        if ctypes.util.find_library(lib) and gl_probe(name):
            os.environ["PYOPENGL_PLATFORM"] = name
            return name
    raise RenderError(f"no headless OpenGL: install EGL ({GL_INSTALL['egl']}) "
                      f"or OSMesa ({GL_INSTALL['osmesa']})")


def _gl_context(name: str):
    """A current headless GL context of platform `name`, or a one-line RenderError."""
    try:
        if name == "egl":
            from pyrender.platforms.egl import EGLPlatform as Platform
        else:
            from pyrender.platforms.osmesa import OSMesaPlatform as Platform
        platform = Platform(64, 64)
        platform.init_context()
        platform.make_current()
    except Exception as e:
        raise RenderError(f"cannot make a headless OpenGL context (PYOPENGL_PLATFORM={name}): "
                          f"{type(e).__name__}: {_one_line(e)}; "
                          f"{GL_INSTALL[name]} may help") from None
    return platform


class GLRenderer:
    """A headless GL context with one framebuffer, one shader and one vertex array, reused."""

    def __init__(self):
        import torch._dynamo  # noqa: F401  (imported after a llvmpipe context exists, it segfaults)
        self.platform = _gl_context(choose_gl_platform())
        from OpenGL import GL as gl
        self.gl = gl
        self.prog, self.mvp_loc = self._program()
        self.vao = gl.glGenVertexArrays(1)
        gl.glBindVertexArray(self.vao)
        self.vbo_pos, self.vbo_col, self.ebo = gl.glGenBuffers(3)
        gl.glBindBuffer(gl.GL_ARRAY_BUFFER, self.vbo_pos)
        gl.glVertexAttribPointer(0, 3, gl.GL_FLOAT, gl.GL_FALSE, 0, None)
        gl.glEnableVertexAttribArray(0)
        gl.glBindBuffer(gl.GL_ARRAY_BUFFER, self.vbo_col)
        gl.glVertexAttribPointer(1, 4, gl.GL_UNSIGNED_BYTE, gl.GL_TRUE, 0, None)
        gl.glEnableVertexAttribArray(1)
        gl.glBindBuffer(gl.GL_ELEMENT_ARRAY_BUFFER, self.ebo)
        self.fbo, self.size, self.faces_key = gl.glGenFramebuffers(1), None, None
        self.rbos = gl.glGenRenderbuffers(2)

    def _program(self):
        gl = self.gl
        prog = gl.glCreateProgram()
        for src, kind in ((VERT_SHADER, gl.GL_VERTEX_SHADER), (FRAG_SHADER, gl.GL_FRAGMENT_SHADER)):
            sh = gl.glCreateShader(kind)
            gl.glShaderSource(sh, src)
            gl.glCompileShader(sh)
            if not gl.glGetShaderiv(sh, gl.GL_COMPILE_STATUS):
                raise RenderError(f"shader compile failed: {_one_line(gl.glGetShaderInfoLog(sh))}")
            gl.glAttachShader(prog, sh)
        gl.glLinkProgram(prog)
        return prog, gl.glGetUniformLocation(prog, "mvp")

    def _resize(self, w, h):
        gl = self.gl
        gl.glBindFramebuffer(gl.GL_FRAMEBUFFER, self.fbo)
        for rb, fmt, att in ((self.rbos[0], gl.GL_RGBA8, gl.GL_COLOR_ATTACHMENT0),
                             (self.rbos[1], gl.GL_DEPTH_COMPONENT24, gl.GL_DEPTH_ATTACHMENT)):
            gl.glBindRenderbuffer(gl.GL_RENDERBUFFER, rb)
            gl.glRenderbufferStorage(gl.GL_RENDERBUFFER, fmt, w, h)
            gl.glFramebufferRenderbuffer(gl.GL_FRAMEBUFFER, att, gl.GL_RENDERBUFFER, rb)
        self.size = (w, h)

    def render(self, verts: np.ndarray, colors: np.ndarray, faces: np.ndarray, faces_key,
               mvp: np.ndarray, w: int, h: int):
        """-> rgba (h, w, 4) uint8 with the instance id in alpha, depth (h, w) metres
        (inf = empty)."""
        gl = self.gl
        if self.size != (w, h):
            self._resize(w, h)
        gl.glBindFramebuffer(gl.GL_FRAMEBUFFER, self.fbo)
        gl.glViewport(0, 0, w, h)
        gl.glUseProgram(self.prog)
        gl.glBindVertexArray(self.vao)
        gl.glBindBuffer(gl.GL_ARRAY_BUFFER, self.vbo_pos)
        gl.glBufferData(gl.GL_ARRAY_BUFFER, verts.nbytes, verts, gl.GL_STREAM_DRAW)
        gl.glBindBuffer(gl.GL_ARRAY_BUFFER, self.vbo_col)
        gl.glBufferData(gl.GL_ARRAY_BUFFER, colors.nbytes, colors, gl.GL_STREAM_DRAW)
        if faces_key != self.faces_key:  # the index buffer only changes with the people count
            gl.glBufferData(gl.GL_ELEMENT_ARRAY_BUFFER, faces.nbytes, faces, gl.GL_STATIC_DRAW)
            self.faces_key = faces_key
        gl.glUniformMatrix4fv(self.mvp_loc, 1, gl.GL_TRUE, mvp)
        gl.glDisable(gl.GL_BLEND)
        gl.glDisable(gl.GL_CULL_FACE)
        gl.glEnable(gl.GL_DEPTH_TEST)
        gl.glClearColor(0, 0, 0, 0)
        gl.glClear(gl.GL_COLOR_BUFFER_BIT | gl.GL_DEPTH_BUFFER_BIT)
        gl.glDrawElements(gl.GL_TRIANGLES, faces.size, gl.GL_UNSIGNED_INT, None)
        rgba = np.frombuffer(gl.glReadPixels(0, 0, w, h, gl.GL_RGBA, gl.GL_UNSIGNED_BYTE), np.uint8)
        d = np.frombuffer(gl.glReadPixels(0, 0, w, h, gl.GL_DEPTH_COMPONENT, gl.GL_FLOAT),
                          np.float32)
        rgba, d = rgba.reshape(h, w, 4)[::-1], d.reshape(h, w)[::-1]
        zn = 2.0 * d - 1.0
        depth = np.where(d < 1.0, 2 * FAR * NEAR / ((FAR + NEAR) - zn * (FAR - NEAR)), np.inf)
        return rgba, depth.astype(np.float32)


@functools.cache
def get_renderer() -> GLRenderer:
    return GLRenderer()


# ----------------------------------------------------------------------------------------------
# Labels: exact visibility from the depth and instance buffers, masks, per-person attributes
# ----------------------------------------------------------------------------------------------
def keypoint_labels(cam: Camera, kps: np.ndarray, inst: np.ndarray, depth: np.ndarray,
                    kp_tol: np.ndarray):
    """kps (n, K, 3) world -> (n, K, 3) x, y, v with v=2 visible, 1 occluded, 0 outside."""
    u, v, d = cam.project(kps)
    inside = (u >= 0) & (u < cam.w) & (v >= 0) & (v < cam.h) & (d > NEAR)
    ui, vi = np.clip(u.astype(int), 0, cam.w - 1), np.clip(v.astype(int), 0, cam.h - 1)
    ids = np.arange(1, len(kps) + 1)[:, None]
    seen = (inst[vi, ui] == ids) & (d - depth[vi, ui] < kp_tol[None])
    vis = np.where(inside, np.where(seen, 2, 1), 0)
    out = np.stack([u, v, vis], -1)
    out[vis == 0, :2] = 0
    return out


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


def annotations_for(image_id: int, cam: Camera, kp_labels: np.ndarray, inst: np.ndarray,
                    verts_uv: list, centres: np.ndarray, num_people: int) -> list:
    """One COCO annotation per person with at least one visible pixel.

    scale: the person's full projected height in pixels (occlusion and truncation ignored);
    visibility_ratio: share of the keypoints labelled visible (v=2); truncation: share of
    the person's full projected box outside the image; min_dist: pixels from the person's hip
    centre to the nearest other person's; camera_angle: the camera pitch in degrees.
    """
    anns = []
    W, H = cam.w, cam.h
    dist = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1)) + np.eye(len(centres)) * 1e9
    for k in range(len(kp_labels)):
        mask = inst == k + 1
        area = int(mask.sum())
        if area == 0:
            continue
        ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        x0, x1, y0, y1 = xs[0], xs[-1] + 1, ys[0], ys[-1] + 1
        kl = kp_labels[k]
        u0, u1, v0, v1 = verts_uv[k]
        full = max((u1 - u0) * (v1 - v0), 1e-6)
        inter = max(0.0, min(u1, W) - max(u0, 0)) * max(0.0, min(v1, H) - max(v0, 0))
        anns.append({
            "id": image_id * 100 + k + 1, "image_id": image_id, "category_id": 1,
            "keypoints": [round(float(a), 2) if i % 3 < 2 else int(a)
                          for i, a in enumerate(kl.ravel())],
            "num_keypoints": int((kl[:, 2] > 0).sum()),
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float(area), "segmentation": rle(mask), "iscrowd": 0,
            "min_dist": round(float(dist[k].min()) if len(centres) > 1 else float(max(W, H)), 2),
            "camera_angle": round(float(cam.pitch_deg), 3),
            "visibility_ratio": round(float((kl[:, 2] == 2).mean()), 4),
            "truncation": round(float(1 - inter / full), 4),
            "scale": round(float(v1 - v0), 2),
            "num_people": int(num_people),
        })
    return anns


# ----------------------------------------------------------------------------------------------
# Rendering one scene / one bank person
# ----------------------------------------------------------------------------------------------
TIMERS: dict = {}


class _timed:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *a):
        TIMERS[self.name] = TIMERS.get(self.name, 0.0) + time.perf_counter() - self.t


@functools.lru_cache(maxsize=64)
def merged_faces(body: BodyModel, n: int) -> np.ndarray:
    """Faces of n copies of the body in one mesh (uint32, as the index buffer takes them)."""
    offsets = np.arange(n, dtype=np.uint32) * len(body.rest)
    faces = (body.faces[None].astype(np.uint32) + offsets[:, None, None]).reshape(-1, 3)
    faces.flags.writeable = False  # shared by every caller
    return faces


def sample_people(body: BodyModel, rng, n: int, cfg: RenderConfig):
    """Random shapes, poses (canonical world rotations), yaws and albedos for n people."""
    shape = styled(cfg, rng, "bodies", lambda r, s: body.sample_shape(r, n, s))
    world = styled(cfg, rng, "poses", lambda r, s: pick_poses(r, n, s, cfg.poses))
    yaw = styled(cfg, rng, "yaw", lambda r, s: sample_yaw(r, n, s))
    with _timed("appearance"):
        albedo = np.stack([styled(cfg, rng, "clothing", lambda r, s: person_albedo(body, r, s))
                           for _ in range(n)])
    return shape, world, yaw, albedo


def sample_yaw(rng: np.random.Generator, n: int, style: str) -> np.ndarray:
    yaw = rng.uniform(0, 2 * math.pi, n)  # paper code: random yaw U(0, 2 pi) per person
    if style == "standin":
        # [ours] Photos of people are biased towards people facing the camera (yaw 0); the
        # stand-in for real photos keeps that bias,
        # the synthetic style keeps the paper's U(0, 2 pi).
        facing = rng.random(n) < STANDIN_FACING_SHARE
        yaw = np.where(facing, rng.normal(0.0, math.radians(STANDIN_FACING_STD_DEG), n), yaw)
    return yaw


def sample_pitch(rng: np.random.Generator, style: str) -> float:
    return (rng.uniform(0, PITCH_MAX_DEG) if style == "synthetic"
            else rng.uniform(0, 0.6 * PITCH_MAX_DEG))


def build_people(body: BodyModel, shape, world, yaw, extended: bool = False):
    """-> canonical vertices (n, V, 3) and keypoints (n, 17, 3), (n, 21, 3) with EXTRA_POINTS when
    extended: hips centred on x=z=0, feet on y=0."""
    with _timed("body model"):
        verts, kps = body.run(shape, world, extended)
        R = np.swapaxes(rot_y(yaw), 1, 2).astype(np.float32)
        root = kps[:, 11:13].mean(1, keepdims=True) * np.float32([1, 0, 1])
        verts, kps = (verts - root) @ R, (kps - root) @ R
        floor = verts[:, :, 1].min(1)[:, None, None] * np.float32([0, 1, 0])
        return (verts - floor).astype(np.float32), (kps - floor).astype(np.float32)


def pose_people(body: BodyModel, rng, n: int, cfg: RenderConfig):
    shape, world, yaw, albedo = sample_people(body, rng, n, cfg)
    verts, kps = build_people(body, shape, world, yaw, LABEL_SETS[cfg.skeleton].extended)
    return verts, kps, albedo


def lit_colors(body, verts: np.ndarray, albedo: np.ndarray, light: dict) -> np.ndarray:
    """(n, V, 3) vertices + albedo -> (n*V, 4) uint8 colours with the instance id in alpha."""
    n, V = verts.shape[:2]
    normals = vertex_normals(verts.reshape(-1, 3), merged_faces(body, n).astype(np.int64))
    rgb = albedo.reshape(-1, 3) * shade(normals, light)
    ids = np.repeat(np.arange(1, n + 1, dtype=np.uint8), V)[:, None]
    return np.concatenate([np.clip(rgb * 255, 0, 255).astype(np.uint8), ids], 1)


def render_people(body: BodyModel, verts: np.ndarray, kps: np.ndarray, albedo: np.ndarray,
                  cam: Camera, light: dict, bg: np.ndarray):
    """Placed people (world coordinates) -> composited RGB, instance ids (0 = none), depth, labels
    of the keypoints given (n, K, 3), K = 17 or 21 (see build_people)."""
    n = len(verts)
    with _timed("shading"):
        colors = lit_colors(body, verts, albedo, light)
    with _timed("gl render+readback"):
        rgba, depth = get_renderer().render(verts.reshape(-1, 3), colors, merged_faces(body, n),
                                            (body.name, n), cam.gl_matrix(), cam.w, cam.h)
    with _timed("labels"):
        inst = rgba[..., 3]
        img = np.where(inst[..., None] > 0, rgba[..., :3], bg)
        kl = keypoint_labels(cam, kps, inst, depth, body.kp_depth[:kps.shape[1]] * 1.5 + VIS_MARGIN)
    return img, inst, depth, kl


def render_scene(cfg: RenderConfig, index: int, body: BodyModel, bg_files: list):
    """One purely synthetic scene (paper's dataset 1) -> RGB uint8 image,
    COCO-format annotations."""
    rng = _rng(cfg, index)
    S = cfg.image_size
    n = int(min(MAX_PEOPLE, max(cfg.min_people, rng.poisson(cfg.mean_people))))
    verts, kps, albedo = pose_people(body, rng, n, cfg)
    dist = max(2.0, rng.normal(*cfg.camera_distance))
    pitch = styled(cfg, rng, "pitch", sample_pitch)
    cam = make_camera(dist, pitch, S, S, LOOK_HEIGHT * min(1.0, dist / CAMERA_DISTANCE[0]))
    keep, pos = place_people(rng, cam, verts, dist)
    if len(keep) < min(cfg.min_people, n):  # crowded: fall back to anything inside the frame
        m = min(cfg.min_people, n)
        keep, pos = np.arange(m), rng.uniform(-0.3, 0.3, (m, 2)) * dist * 0.3
        pos[:, 1] = np.linspace(-1, 1, len(keep)) * GROUND_DEPTH * dist
    verts, kps, albedo = verts[keep], kps[keep], albedo[keep]
    off = np.stack([pos[:, 0], np.zeros(len(pos)), pos[:, 1]], 1)[:, None].astype(np.float32)
    verts, kps = verts + off, kps + off
    n = len(keep)
    light = styled(cfg, rng, "lighting", sample_lighting)
    bg = styled(cfg, rng, "background",
                lambda r, s: sample_background(r, s, cfg.image_size, bg_files))
    img, inst, depth, kl = render_people(body, verts, kps, albedo, cam, light, bg)
    with _timed("labels"):
        kl = LABEL_SETS[cfg.skeleton].labels(kl)
        u, v, _ = cam.project(verts)
        boxes = np.stack([u.min(1), u.max(1), v.min(1), v.max(1)], 1)
        cu, cv_, _ = cam.project(kps[:, 11:13].mean(1))
        anns = annotations_for(index + 1, cam, kl, inst, boxes, np.stack([cu, cv_], 1), n)
    with _timed("post (blur, noise)"):
        img = styled(cfg, rng, "blur", lambda r, s: post_process(r, img, s))
    return img, anns


def post_process(rng, img: np.ndarray, style: str) -> np.ndarray:
    """Paper-style blur for synthetic scenes;
    sensor noise and a mild vignette-free look for standin."""
    import cv2
    if style == "synthetic":
        if rng.random() < 0.5:  # pixel blur
            img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 1.2))
        mb = abs(rng.normal(*BLUR_SIGMA))
        k = int(round(mb * 30))
        if k >= 2:  # motion blur along a random direction
            kern = np.zeros((2 * k + 1, 2 * k + 1), np.float32)
            a = rng.uniform(0, math.pi)
            for t in np.linspace(-k, k, 4 * k + 1):
                kern[int(round(k + t * math.sin(a))), int(round(k + t * math.cos(a)))] = 1
            img = cv2.filter2D(img, -1, kern / kern.sum())
        return img
    noise = rng.normal(0, rng.uniform(1.5, 4.0), img.shape[:2] + (1,)).astype(np.float32)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def render_bank_group(cfg: RenderConfig, indices: list, body: BodyModel):
    """Single people as RGBA crops -> list of (rgba, annotations); their bodies go through the model
    at once."""
    S = cfg.image_size
    canvas = int(S * 1.35)
    f = canvas / (2 * (SENSOR_MM / 2) / FOCAL_MM)
    rngs = [_rng(cfg, i) for i in indices]
    people = [sample_people(body, rng, 1, cfg) for rng in rngs]
    skeleton = LABEL_SETS[cfg.skeleton]
    verts, kps = build_people(body, *(np.concatenate([p[k] for p in people]) for k in range(3)),
                              extended=skeleton.extended)
    out = []
    for k, (rng, index) in enumerate(zip(rngs, indices)):
        height = float(verts[k, :, 1].max())
        # [ours] the person fills ~image_size px; the camera keeps the paper's lens and pitch range
        cam = make_camera(f * max(height, 0.8) / S, rng.uniform(0, PITCH_MAX_DEG), canvas, canvas,
                          height / 2)
        rgb, inst, depth, kl = render_people(body, verts[k:k + 1], kps[k:k + 1], people[k][3], cam,
                                           styled(cfg, rng, "lighting", sample_lighting),
                                           np.zeros(3, np.uint8))
        with _timed("labels"):
            kl = skeleton.labels(kl)
            ys, xs = np.nonzero(inst.any(1))[0], np.nonzero(inst.any(0))[0]
            m = int(0.04 * S) + 2
            y0, y1 = max(0, ys[0] - m), min(canvas, ys[-1] + 1 + m)
            x0, x1 = max(0, xs[0] - m), min(canvas, xs[-1] + 1 + m)
            crop = np.dstack([rgb[y0:y1, x0:x1],
                              np.where(inst[y0:y1, x0:x1] > 0, 255, 0).astype(np.uint8)])
            kl[..., 0] -= x0
            kl[..., 1] -= y0
            outside = ((kl[..., 0] < 0) | (kl[..., 0] >= x1 - x0)
                       | (kl[..., 1] < 0) | (kl[..., 1] >= y1 - y0))
            kl[outside] = 0
            u, v, _ = cam.project(verts[k:k + 1])
            boxes = np.stack([u.min(1) - x0, u.max(1) - x0, v.min(1) - y0, v.max(1) - y0], 1)
            anns = annotations_for(index + 1, replace(cam, w=x1 - x0, h=y1 - y0), kl,
                                   inst[y0:y1, x0:x1], boxes, np.zeros((1, 2)), 1)
        out.append((crop, anns))
    return out


# ----------------------------------------------------------------------------------------------
# Writing, chunks, shards, workers
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: Path, keep_suffix: bool = False, error: type[Exception] = RenderError):
    """Yields a temporary path to write; renamed onto `path` on success, removed on any failure, so
    a killed run or a full disk never leaves half a file (the previous version stays): the one
    atomic writer of both scripts (repro.py raises its own error class through it). keep_suffix: the
    temporary name ends like `path` (cv2's video writer picks the container by it)."""
    unique = f"{os.getpid()}-{os.urandom(4).hex()}"  # one name per writer
    tmp = path.with_name(f"{path.stem}.{unique}.tmp{path.suffix}" if keep_suffix
                         else f"{path.name}.{unique}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, (error, RenderError)):
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise error(f"cannot write {path} ({reason}); "
                        "the previous version, if any, is kept") from None
        raise


def atomic_write(path: Path, data: bytes):
    """`data` into `path` through atomic_path: readers see the old file or the whole new one."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def _config_json(cfg: RenderConfig) -> dict:
    d = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if not (f.metadata["new"] and value == f.default):
            d[f.name] = list(value) if isinstance(value, tuple) else value
    d["renderer_version"] = 2  # bump when the same settings render differently
    return d


def num_chunks(cfg: RenderConfig) -> int:
    return (cfg.num_images + CHUNK[cfg.kind] - 1) // CHUNK[cfg.kind]


def chunk_size(cfg: RenderConfig, c: int) -> int:
    return min(CHUNK[cfg.kind], cfg.num_images - c * CHUNK[cfg.kind])


def chunk_path(out: Path, c: int) -> Path:
    return out / "parts" / f"chunk-{c:06d}.json"


@functools.cache
def _resources(body_model: str, model_path: str | None, backgrounds: str | None):
    return get_body_model(body_model, model_path), background_files(backgrounds)


def _worker_state(cfg: RenderConfig):
    """This process's body model and background files (loaded once per process)."""
    return _resources(cfg.body_model, cfg.model_path, cfg.backgrounds)


def _write_image(out: Path, kind: str, i: int, img: np.ndarray) -> dict:
    """A scene as JPEG (RGB) or a bank crop as PNG (RGBA) -> its COCO image entry."""
    import cv2
    if kind == "scenes":
        name = f"{i:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    else:
        name = f"{i:06d}.png"
        bgra = img[:, :, [2, 1, 0, 3]]
        ok, buf = cv2.imencode(".png", bgra, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise RenderError(f"cannot encode {name}")
    atomic_write(out / "images" / name, buf.tobytes())
    return {"id": i + 1, "file_name": name, "width": img.shape[1], "height": img.shape[0]}


def render_chunk(args) -> int:
    """Render one chunk's images, then atomically write its annotation part (the commit point)."""
    cfg, out, c = args
    out = Path(out)
    body, bg_files = _worker_state(cfg)
    lo, hi = c * CHUNK[cfg.kind], min(cfg.num_images, (c + 1) * CHUNK[cfg.kind])
    if cfg.kind == "scenes":  # one scene at a time; a bank's bodies go through the model together
        rendered = (render_scene(cfg, i, body, bg_files) for i in range(lo, hi))
    else:
        rendered = render_bank_group(cfg, list(range(lo, hi)), body)
    images, anns = [], []
    for i, (img, a) in zip(range(lo, hi), rendered):
        with _timed("encode+write"):
            images.append(_write_image(out, cfg.kind, i, img))
        anns += a
    atomic_write(chunk_path(out, c), json.dumps({"images": images, "annotations": anns}).encode())
    return hi - lo


def _init_worker(env: dict):
    os.environ.update(env)
    import torch
    torch.set_num_threads(1)


def check_backgrounds(folder: str | None):
    """A user's folder must hold readable photos; files that are not are counted on stderr."""
    files = background_files(folder)
    if not folder:
        return
    junk = unreadable_backgrounds(files)
    good = [f for f in files if f not in set(junk)]
    if not any(_load_photo(f) is not None for f in good[:50]):
        raise RenderError(f"backgrounds folder {folder}: none of its images can be read")
    if junk:
        print(f"render_humans: backgrounds: skipping {len(junk)} of {len(files)} files that are "
              f"not readable images (e.g. {junk[0]})", file=sys.stderr)


def validate(cfg: RenderConfig):
    """Every check that can fail on user input, before anything is written."""
    for name, allowed in (("kind", KINDS), ("style", STYLES), ("skeleton", tuple(LABEL_SETS))):
        if getattr(cfg, name) not in allowed:
            raise RenderError(f"{name} must be one of {allowed}, not {getattr(cfg, name)!r}")
    if not math.isfinite(cfg.mean_people):
        raise RenderError(f"mean_people must be a finite number, not {cfg.mean_people}")
    if cfg.num_images < 1 or cfg.image_size < 32 or cfg.min_people < 1 or cfg.mean_people < 0:
        raise RenderError("need num_images >= 1, image_size >= 32, min_people >= 1, "
                          "mean_people >= 0")
    if cfg.min_people > MAX_PEOPLE or cfg.mean_people > MAX_PEOPLE:
        raise RenderError(f"a scene holds at most {MAX_PEOPLE} people (instance ids live in one "
                          f"byte): min_people {cfg.min_people} and mean_people "
                          f"{cfg.mean_people:g} must be at most that")
    if len(cfg.camera_distance) != 2 or cfg.camera_distance[0] <= 1 or cfg.camera_distance[1] < 0:
        raise RenderError("camera_distance must be (mean > 1 m, std >= 0)")
    if cfg.body_model not in BODY_MODELS:
        raise RenderError(f"unknown body model {cfg.body_model!r}; choose from "
                          f"{', '.join(BODY_MODELS)}")
    for f in cfg.style_factors:
        name, style = f.split("=")
        if style == cfg.style:
            raise RenderError(f"style_factors {f}: the style is {cfg.style} already; name the "
                              "factors that take the other style")
        if cfg.kind == "bank" and name not in BANK_FACTORS:
            raise RenderError(f"style_factors {f}: bank crops have no {name}; their factors: "
                              f"{', '.join(BANK_FACTORS)}")
    if cfg.body_model != "anny":
        find_model_files(cfg.body_model, cfg.model_path)
    check_backgrounds(cfg.backgrounds)
    if cfg.poses:
        load_pose_bank(cfg.poses)


def preflight(cfg: RenderConfig, in_process: bool):
    """Everything that can fail before the first file is written: the inputs, the GL context
    (made here when this process renders; probed in a fresh process for spawned workers, since
    GL stays out of a parent of workers) and the body model."""
    validate(cfg)
    name = choose_gl_platform()  # also checks a user's PYOPENGL_PLATFORM when a context is cached
    if in_process:
        get_renderer()
    elif not gl_probe(name):
        raise RenderError(f"cannot make a headless OpenGL context (PYOPENGL_PLATFORM={name}); "
                          f"{GL_INSTALL[name]} may help")
    _worker_state(cfg)


def _finished(out: Path, cfg: RenderConfig) -> Path | None:
    """annotations.json of a finished render with these settings, or None; a folder rendered with
    other settings is a RenderError."""
    cfg_file = out / "parts" / "config.json"
    if not cfg_file.exists():
        return None
    if json.loads(cfg_file.read_text()) != _config_json(cfg):
        raise RenderError(f"{out} holds a dataset rendered with other settings; use another folder")
    return out / "annotations.json" if (out / "annotations.json").exists() else None


def _start_output(out: Path, cfg: RenderConfig):
    """images/, parts/ and parts/config.json. An unwritable out_dir is a one-line RenderError, and
    the folders made here are removed again."""
    made = [d for d in (out, out / "images", out / "parts") if not d.exists()]
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "parts").mkdir(exist_ok=True)
        if not (out / "parts" / "config.json").exists():
            atomic_write(out / "parts" / "config.json",
                         json.dumps(_config_json(cfg), indent=1).encode())
    except (OSError, RenderError) as e:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(e, RenderError):
            raise
        raise RenderError(f"cannot write into {out}: {e.strerror or e}") from None


def merge(out: Path, cfg: RenderConfig) -> Path | None:
    """Join all chunk parts into annotations.json once every chunk exists."""
    parts = [chunk_path(out, c) for c in range(num_chunks(cfg))]
    if not all(p.exists() for p in parts):
        return None
    images, anns = [], []
    for p in parts:
        d = json.loads(p.read_text())
        images += d["images"]
        anns += d["annotations"]
    skeleton = LABEL_SETS[cfg.skeleton]
    coco = {"info": {"description": "render_humans.py synthetic people",
                     "config": _config_json(cfg)},
            "licenses": [], "images": images, "annotations": anns,
            "categories": [_category(skeleton.names, skeleton.limbs)]}
    path = out / "annotations.json"
    atomic_write(path, json.dumps(coco).encode())
    if cfg.kind == "scenes":
        warn_crowding(images, anns, cfg)
    return path


def warn_crowding(images: list, anns: list, cfg: RenderConfig) -> None:
    """One line when scenes hold fewer people than min_people: the frame at this camera distance and
    image size fits no more, and the count is never short without a word."""
    index = {im["id"]: k for k, im in enumerate(images)}
    counts = np.bincount([index[a["image_id"]] for a in anns], minlength=len(images)).astype(int)
    short = counts < cfg.min_people
    if short.any():
        print(f"render_humans: {short.sum()} of {len(images)} scenes hold fewer than min_people "
              f"{cfg.min_people} people (from {counts.min()} to {counts.max()} per scene): at "
              f"image size {cfg.image_size} and camera distance {cfg.camera_distance[0]:g} m the "
              "frame fits no more", file=sys.stderr)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)  # small ops: threads only spin, and badly so on a busy machine
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_jobs(jobs: list, workers: int, bar):
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            bar.update(render_chunk(j))
        return
    import multiprocessing as mp
    env = {"PYOPENGL_PLATFORM": choose_gl_platform()}
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(env,)) as pool:
        for k in pool.imap_unordered(render_chunk, jobs):
            bar.update(k)


def render_dataset(out_dir, *, workers: int = 1, num_shards: int = 1, shard: int = 0,
                   progress: bool = True, **settings) -> Path:
    """Render a COCO keypoint dataset into out_dir; returns out_dir/annotations.json.

    settings: RenderConfig's fields (kind, num_images, style, image_size, mean_people, min_people,
    camera_distance, seed, backgrounds, poses, body_model, model_path, skeleton, style_factors); an
    unknown one is a RenderError. Finished outputs are a cache: a second call with the same settings
    returns at once. With num_shards > 1 this call renders chunks c with c % num_shards == shard;
    whichever shard finds every chunk done writes annotations.json (until then the returned path
    does not exist). A killed run resumes: finished chunks are skipped, every file is written
    atomically. Every check (inputs, GL, body model) runs before the first file is written.
    """
    cfg = make_config(settings)
    if not (0 <= shard < num_shards):
        raise RenderError(f"shard must be in [0, {num_shards}), got {shard}")
    out = Path(out_dir)
    done = _finished(out, cfg)
    if done:
        return done
    mine = [c for c in range(num_chunks(cfg)) if c % num_shards == shard]
    todo = [c for c in mine if not chunk_path(out, c).exists()]
    jobs = [(cfg, str(out), c) for c in todo]
    with _torch_threads(1):
        preflight(cfg, in_process=workers <= 1 or len(jobs) <= 1)
        _start_output(out, cfg)
        bar = _render_progress(cfg, mine, todo, enabled=progress)
        try:
            _run_jobs(jobs, workers, bar)
        finally:
            bar.close()
    return merge(out, cfg) or (out / "annotations.json")


# ----------------------------------------------------------------------------------------------
# Progress: a bar on a terminal, sparse plain lines in logs
# ----------------------------------------------------------------------------------------------
# [ours] in a log, one progress line per 30 s (and one at the end) is plenty
PROGRESS_EVERY_S = 30.0


class PlainProgress:
    """tqdm's n, update, set_postfix and close for logs and pipes: a plain line at most every
    `every_s` seconds and one at close, instead of a bar redrawn many times a second. With
    enabled=False it only counts."""

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", unit: str = "it",
                 enabled: bool = True, stream=None, every_s: float = PROGRESS_EVERY_S):
        self.total, self.n, self.start, self.desc, self.unit = total, initial, initial, desc, unit
        self.enabled, self.stream, self.every_s = enabled, stream or sys.stderr, every_s
        self.t0 = self.shown = time.monotonic()
        self.postfix, self.closed = "", False

    def update(self, n: int = 1):
        self.n += n
        if self.enabled and time.monotonic() - self.shown >= self.every_s:
            self._show()

    def set_postfix(self, **values):
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self):
        if self.enabled and not self.closed:
            self._show()
        self.closed = True

    def _show(self):
        self.shown = time.monotonic()
        dt = self.shown - self.t0
        done = f"{self.n} {self.unit}"
        if self.total:
            done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        rate = f", {(self.n - self.start) / dt:.1f} {self.unit}/s" if dt > 0 else ""
        postfix = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {done}{rate}, {dt:.0f} s{postfix}", file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(total: int | None, initial: int = 0, desc: str = "", unit: str = "it",
             enabled: bool = True, stream=None):
    """Progress that fits where it is shown: a tqdm bar where `stream` (default stderr) is a
    terminal, else a PlainProgress (sparse lines). Both have n, update(k), set_postfix(**values),
    close() and work as context managers."""
    stream = stream or sys.stderr
    if enabled and getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream,
                    dynamic_ncols=True)
    return PlainProgress(total, initial, desc, unit, enabled, stream)


def _render_progress(cfg: RenderConfig, mine: list, todo: list, enabled: bool):
    total = sum(chunk_size(cfg, c) for c in mine)
    done = total - sum(chunk_size(cfg, c) for c in todo)
    return progress(total, done, f"render {cfg.kind}/{cfg.style}", "img", enabled)


# ----------------------------------------------------------------------------------------------
# Showing it: keypoint overlays, the grid image, the speed benchmark
# ----------------------------------------------------------------------------------------------
LIMBS_BY_COUNT = {len(sk.names): sk.limbs for sk in LABEL_SETS.values()}  # 17: COCO, 16: MPII


def draw_keypoints(img: np.ndarray, anns: list, scale: float = 1.0) -> np.ndarray:
    """Skeletons of COCO (17 keypoints) or MPII (16 joints) annotations drawn on a copy of img."""
    import cv2
    img = np.ascontiguousarray(img.copy())
    colors = [(255, 64, 64), (64, 160, 255), (255, 220, 0), (0, 220, 120), (220, 80, 255)]

    def px(p):
        return int(p[0] * scale), int(p[1] * scale)

    for k, a in enumerate(anns):
        kp = np.array(a["keypoints"], float).reshape(-1, 3)
        c = colors[k % len(colors)]
        for i, j in LIMBS_BY_COUNT[len(kp)]:
            p, q = kp[i - 1], kp[j - 1]
            if p[2] > 0 and q[2] > 0:
                cv2.line(img, px(p), px(q), c, 1, cv2.LINE_AA)
        for p in kp:
            if p[2] > 0:
                cv2.circle(img, px(p), 2, (255, 255, 255) if p[2] == 2 else (90, 90, 90), -1)
    return img


def make_grid(path="results/render-grid.png", n_cols: int = 3, size: int = 640,
              seed: int = 0) -> Path:
    """Two rows of scenes (synthetic, standin) and a row of bank people, keypoints drawn."""
    import cv2
    tiles = []
    with tempfile.TemporaryDirectory() as tmp:
        for style in STYLES:
            ann = render_dataset(Path(tmp) / style, num_images=n_cols, style=style, image_size=size,
                                 seed=seed, progress=False)
            coco = json.loads(ann.read_text())
            for im in coco["images"]:
                img = cv2.imread(str(ann.parent / "images" / im["file_name"]))[:, :, ::-1]
                a = [x for x in coco["annotations"] if x["image_id"] == im["id"]]
                tiles.append(draw_keypoints(img, a))
        ann = render_dataset(Path(tmp) / "bank", kind="bank", num_images=2 * n_cols,
                             style="synthetic", image_size=int(size * 0.8), seed=seed,
                             progress=False)
        coco = json.loads(ann.read_text())
        row = np.full((size, size * n_cols, 3), 40, np.uint8)
        x = 4
        for im in coco["images"]:
            rgba = cv2.imread(str(ann.parent / "images" / im["file_name"]), cv2.IMREAD_UNCHANGED)
            rgb, a = rgba[:, :, 2::-1].astype(np.float32), rgba[:, :, 3:] / 255.0
            drawn = draw_keypoints((rgb * a + 40 * (1 - a)).astype(np.uint8),
                                   [x_ for x_ in coco["annotations"] if x_["image_id"] == im["id"]])
            h, w = drawn.shape[:2]
            s = min(1.0, (size - 8) / h)
            drawn = cv2.resize(drawn, (int(w * s), int(h * s)))
            if x + drawn.shape[1] > row.shape[1]:
                break
            row[4:4 + drawn.shape[0], x:x + drawn.shape[1]] = drawn
            x += drawn.shape[1] + 8
    rows = [np.concatenate(tiles[i * n_cols:(i + 1) * n_cols], 1) for i in range(2)]
    grid = np.concatenate(rows + [row], 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), grid[:, :, ::-1])
    return path


def bench(n_scenes: int = 20, n_bank: int = 128):
    """Scenes/s at 640x640 with ~10 people and bank people/s, with where the time went."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        _worker_state(RenderConfig())
        get_renderer()
        render_dataset(Path(tmp) / "warm", num_images=1, progress=False)
        print(f"start-up (body model, GL context, first scene): {time.perf_counter() - t:.1f} s")
        for kind, n in (("scenes", n_scenes), ("bank", n_bank)):
            TIMERS.clear()
            t = time.perf_counter()
            render_dataset(Path(tmp) / kind, kind=kind, num_images=n,
                           image_size=640 if kind == "scenes" else 256, progress=False)
            dt = time.perf_counter() - t
            unit = ("scenes/s (640x640, Poisson(10) people)" if kind == "scenes"
                    else "bank people/s (~256 px tall)")
            print(f"{kind}: {n / dt:.2f} {unit}")
            for k, v in sorted(TIMERS.items(), key=lambda kv: -kv[1]):
                print(f"    {k:<20} {1000 * v / n:7.1f} "
                      f"ms/{'scene' if kind == 'scenes' else 'person'}")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _add_setting(p: argparse.ArgumentParser, f):
    """One RenderConfig field as a --flag: its help, choices and type come from the field."""
    meta = f.metadata
    kw = dict(default=list(f.default) if isinstance(f.default, tuple) else f.default,
              help=meta["help"])
    if meta["choices"]:
        kw["choices"] = meta["choices"]
    if meta["convert"] in (int, float):
        kw["type"] = meta["convert"]
    p.add_argument("--" + f.name.replace("_", "-"), **{**kw, **meta["cli"]})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="render_humans.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Render synthetic people (anny or SMPL-family bodies) into COCO keypoint "
                    "datasets: multi-person scenes (JPEG) or a bank of single people "
                    "(RGBA PNG crops).")
    p.add_argument("out_dir", nargs="?", help="output folder (images/, annotations.json, parts/)")
    for f in fields(RenderConfig):
        _add_setting(p, f)
    p.add_argument("--workers", type=int, default=1,
                   help="parallel processes (spawned, one GL context each)")
    p.add_argument("--num-shards", type=int, default=1,
                   help="split the work into this many shards (cluster jobs)")
    p.add_argument("--shard", type=int, default=0, help="which shard this run renders (0-based)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (a bar on a terminal, else a line every 30 s)")
    p.add_argument("--bench", action="store_true",
                   help="print scenes/s and bank people/s on this machine")
    p.add_argument("--grid", nargs="?", const="results/render-grid.png", metavar="PATH",
                   help="write a grid of rendered scenes and bank people with keypoints drawn")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    Terminated.received = False
    try:
        if args.bench:
            bench()
        elif args.grid:
            print(make_grid(args.grid))
        elif not args.out_dir:
            raise RenderError("give an output folder (or --bench / --grid); see --help")
        else:
            settings = {name: getattr(args, name) for name in SETTINGS}
            path = render_dataset(args.out_dir, workers=args.workers, num_shards=args.num_shards,
                                  shard=args.shard, progress=not args.no_progress, **settings)
            print(path if path.exists()
                  else f"shard {args.shard} done; {path} appears when all shards are")
    # user input or environment: one line, no traceback, status 2
    except (RenderError, OSError) as e:
        if Terminated.received:  # a library swallowed the SIGTERM, then failed half-made
            interrupted(Terminated())
        print(f"render_humans: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: finished chunks are kept, a rerun resumes
        interrupted(e)


def interrupted(e: KeyboardInterrupt):
    print("render_humans: interrupted; finished chunks are kept: rerun the same command to resume",
          file=sys.stderr)
    sys.exit(143 if isinstance(e, Terminated) else 130)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the renderer is, so that it ends like Ctrl-C. `received` stays set:
    a SIGTERM that lands inside an import (GL's, torch's) can be caught there and come out as
    another error, which is the SIGTERM's doing, not the user's."""
    received = False


def _on_sigterm(signum, frame):
    Terminated.received = True
    raise Terminated


if __name__ == "__main__":
    main()
