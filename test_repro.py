"""Tests for the reproduction (CPU only; run with `python -m pytest -x -q test_repro.py`)."""
import ast
import collections
import copy
import errno
import importlib.util
import itertools
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import types
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import torch

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
# pycocotools 2.0.11's RLE decoder predates numpy 2's __array__(copy=...): its warning is about the
# package, not about anything these tests check (Python shows it outside tests only in __main__).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy "
                                        "keyword")

import repro as R  # noqa: E402



def _script(path: str) -> types.ModuleType:
    """An experiment's script under results/ (README, "Code map"), imported by its path."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


C = _script("results/protocol/claims.py")  # the claims protocol
G = _script("results/domain-gap/domain_gap.py")  # where the domain gap comes from
S = _script("results/speed/speed.py")  # the GPU report, targets against Lightweight OpenPose's
SCRIPTS = {"repro.py": R, "results/protocol/claims.py": C, "results/domain-gap/domain_gap.py": G,
           "results/speed/speed.py": S}

# ==============================================================================================
# Renderer (render_humans.py)
# ==============================================================================================
import render_humans as rh  # noqa: E402

TINY = dict(image_size=96, mean_people=2.0, min_people=2, camera_distance=(9.0, 0.1),
            progress=False)


@pytest.fixture(scope="module")
def gl():
    """Body model and GL context, loaded once; skip (with the reason) where headless GL is
    missing."""
    try:
        rh.get_renderer()
    except rh.RenderError as e:
        pytest.skip(f"no headless OpenGL: {e}")
    return rh.get_body_model("anny", None)


@pytest.fixture(scope="module")
def scenes(gl, tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    ann = rh.render_dataset(out, num_images=3, seed=1,
                            **{**TINY, "image_size": 160, "mean_people": 4.0})
    return out, json.loads(ann.read_text())


def _two_people(body, behind: float, shift_x: float = 0.0, size: int = 128, extended: bool = False):
    """Two identical people facing the camera, the second `behind` metres further back; extended:
    their labels cover COCO's 17 keypoints and then rh.EXTRA_POINTS."""
    cfg = rh.RenderConfig(style="standin")
    rng = np.random.default_rng(0)
    shape, world, _, albedo = rh.sample_people(body, rng, 1, cfg)
    world[:] = rh.canonical_fk(rh.angles_to_local(rh._pose_angles(np.random.default_rng(0),
                                                                  "stand")[None]))
    verts, kps = rh.build_people(body, np.repeat(shape, 2, 0), np.repeat(world, 2, 0), np.zeros(2),
                                 extended)
    off = np.float32([[[shift_x, 0, 0]], [[shift_x, 0, -behind]]])
    cam = rh.make_camera(6.0, 0.0, size, size, 0.9)
    light = rh.sample_lighting(rng, "standin")
    return rh.render_people(body, verts + off, kps + off, np.repeat(albedo, 2, 0), cam, light,
                            np.zeros(3, np.uint8))


def test_coco_json_loads_and_gt_as_detections_gives_ap_1(scenes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out, coco = scenes
    gt = COCO(str(out / "annotations.json"))
    assert gt.loadCats(1)[0]["keypoints"] == rh.COCO_KEYPOINT_NAMES
    assert len(gt.getImgIds()) == 3 and len(gt.getAnnIds()) >= 6
    for a in coco["annotations"]:
        assert (len(a["keypoints"]) == 51 and
                a["num_keypoints"] == sum(v > 0 for v in a["keypoints"][2::3]))
        assert isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0
        for k in ("min_dist", "camera_angle", "visibility_ratio", "truncation", "scale",
                  "num_people"):
            assert k in a
    for im in coco["images"]:
        assert (out / "images" / im["file_name"]).is_file()
    dets = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
            for a in coco["annotations"]]
    ev = COCOeval(gt, gt.loadRes(dets), "keypoints")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_visible_keypoints_lie_on_their_persons_silhouette(scenes):
    from pycocotools import mask as mask_utils

    _, coco = scenes
    n_visible = 0
    for a in coco["annotations"]:
        m = mask_utils.decode({"size": a["segmentation"]["size"],
                               "counts": a["segmentation"]["counts"].encode()})
        kp = np.array(a["keypoints"]).reshape(17, 3)
        vis = kp[kp[:, 2] == 2]
        assert m[vis[:, 1].astype(int), vis[:, 0].astype(int)].all()
        assert m.sum() == a["area"]
        n_visible += len(vis)
    assert n_visible > 0


def test_person_behind_another_is_occluded(gl):
    _, inst, _, kl = _two_people(gl, behind=1.5)
    front, back = kl[0], kl[1]
    assert (front[[0, 5, 6, 11, 12], 2] == 2).all()  # nose, shoulders, hips of the front person
    assert (back[[0, 5, 6, 11, 12], 2] == 1).all()  # hidden behind the front person's torso
    assert (back[:, 2] == 1).sum() >= 10 and (back[:, 2] > 0).all()
    assert (inst == 2).sum() < 0.2 * (inst == 1).sum()


def test_keypoints_outside_the_frame_are_v0(gl):
    _, _, _, kl = _two_people(gl, behind=3.0, shift_x=1.6, size=96)
    p = kl[0]
    out = p[:, 2] == 0
    assert out.any() and (~out).any()                  # half in, half out
    assert (p[out, :2] == 0).all()
    assert ((p[~out, 0] >= 0) & (p[~out, 0] < 96)).all()


def test_same_seed_same_bytes_and_sharded_resume(gl, tmp_path, monkeypatch):
    monkeypatch.setitem(rh.CHUNK, "scenes", 2)
    kw = dict(num_images=5, seed=3, **TINY)
    a = rh.render_dataset(tmp_path / "a", **kw)
    b = rh.render_dataset(tmp_path / "b", **kw)
    def files(d):
        return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    fa = files(tmp_path / "a")
    assert fa == files(tmp_path / "b") and a.read_bytes() == b.read_bytes()

    # "kill" shard 0 of 2 in the middle of its second chunk, then resume both shards
    real_write, calls = rh.atomic_write, []

    def dying_write(path, data):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(rh, "atomic_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        rh.render_dataset(tmp_path / "c", num_shards=2, shard=0, **kw)
    monkeypatch.setattr(rh, "atomic_write", real_write)
    assert not (tmp_path / "c" / "annotations.json").exists()
    first = rh.render_dataset(tmp_path / "c", num_shards=2, shard=0, **kw)
    assert not first.exists()                        # shard 1 is still missing
    rh.render_dataset(tmp_path / "c", num_shards=2, shard=1, **kw)
    assert files(tmp_path / "c") == fa               # nothing lost, duplicated or left behind
    assert rh.render_dataset(tmp_path / "c", **kw) == first  # finished: returns from the cache


def test_bank_is_rgba_with_labels_in_crop_coordinates(gl, tmp_path):
    import cv2

    ann = rh.render_dataset(tmp_path, kind="bank", num_images=3, image_size=96, progress=False)
    coco = json.loads(ann.read_text())
    assert len(coco["images"]) == 3
    for im, a in zip(coco["images"], coco["annotations"]):
        rgba = cv2.imread(str(tmp_path / "images" / im["file_name"]), cv2.IMREAD_UNCHANGED)
        assert rgba.shape == (im["height"], im["width"], 4)
        assert 80 < a["scale"] < 115                  # person ~image_size px tall
        kp = np.array(a["keypoints"]).reshape(17, 3)
        assert (kp[:, 2] > 0).all() and set(kp[:, 2]) <= {1, 2}
        vis = kp[kp[:, 2] == 2]
        assert (rgba[vis[:, 1].astype(int), vis[:, 0].astype(int), 3] == 255).all()
        assert (rgba[..., 3] > 0).sum() == a["area"]


def test_small_demo_settings_with_min_people_1(gl, tmp_path):
    ann = rh.render_dataset(tmp_path, num_images=4, style="standin", image_size=64, mean_people=0.5,
                            min_people=1, camera_distance=(6.0, 0.5), progress=False)
    coco = json.loads(ann.read_text())
    assert {a["image_id"] for a in coco["annotations"]} == {1, 2, 3, 4}


@pytest.mark.skipif(not (SHARED / "poses").is_dir(), reason="../shared/data/poses not present")
def test_every_bvh_file_loads_and_retargets(gl):
    files = sorted((SHARED / "poses").rglob("*.bvh"))
    assert files
    for f in files:
        world = rh.bvh_to_canonical(f)
        assert world.shape[1:] == (len(rh.CANON), 3, 3) and np.isfinite(world).all()
        verts, kps = rh.build_people(gl, gl.sample_shape(np.random.default_rng(0), 1, "synthetic"),
                                     world[:1], np.zeros(1))
        height = verts[0, :, 1].max()
        assert 0.3 < height < 2.6, f.name              # a body, not an explosion
        assert np.isfinite(kps).all()


def _main_error(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        rh.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines may come before it
    msg = lines[-1] if lines else ""
    assert e.value.code == 2 and msg.startswith("render_humans: error: "), (e.value.code, lines)
    assert sum("error" in line for line in lines) == 1, lines
    return msg


def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert "SMPL_NEUTRAL.pkl" in _main_error([str(out), "--body-model", "smpl"], capsys)
    assert "smplx/SMPLX_NEUTRAL.npz" in _main_error(
        [str(out), "--body-model", "smplx", "--model-path", str(tmp_path)], capsys)
    assert "does not exist" in _main_error([str(out), "--backgrounds", str(tmp_path / "nope")],
                                           capsys)
    (tmp_path / "empty").mkdir()
    assert "no images" in _main_error([str(out), "--backgrounds", str(tmp_path / "empty")], capsys)
    (tmp_path / "bvh").mkdir()
    (tmp_path / "bvh" / "broken.bvh").write_text("HIERARCHY\nROOT Hips\n{ OFFSET 0 0 0\n")
    assert "broken.bvh" in _main_error([str(out), "--poses", str(tmp_path / "bvh")], capsys)
    assert not out.exists()
    r = subprocess.run([sys.executable, str(ROOT / "render_humans.py"), str(out), "--body-model",
                        "smplh",
                        "--model-path", str(tmp_path / "missing")], capture_output=True, text=True)
    assert (r.returncode != 0 and r.stderr.strip().count("\n") == 0 and
            "render_humans: error:" in r.stderr)
    assert not out.exists()


def test_help_explains_every_flag():
    r = subprocess.run([sys.executable, str(ROOT / "render_humans.py"), "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0
    flags = set(__import__("re").findall(r"--[a-z][a-z-]+", r.stdout))
    assert {"--kind", "--num-images", "--style", "--image-size", "--mean-people", "--min-people",
            "--camera-distance", "--seed", "--backgrounds", "--poses", "--body-model",
            "--model-path",
            "--workers", "--num-shards", "--shard", "--bench", "--grid", "--skeleton"} <= flags
    assert all(a.help and len(a.help) > 10 for a in rh.build_parser()._actions)


def test_smpl_pickles_load_without_chumpy(tmp_path):
    import scipy.sparse

    fake = types.ModuleType("chumpy")
    fake_ch = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x): self.x = x
        def __getstate__(self): return {"x": self.x, "_dirty_vars": set()}

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    fake_ch.Ch = Ch
    sys.modules.update({"chumpy": fake, "chumpy.ch": fake_ch})
    try:
        data = {"shapedirs": Ch(np.arange(12.0).reshape(2, 3, 2)), "f": np.array([[0, 1, 2]]),
                "J_regressor": scipy.sparse.csc_matrix(np.eye(3))}
        (tmp_path / "SMPL_NEUTRAL.pkl").write_bytes(pickle.dumps(data, protocol=2))
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]
    arrays = rh.load_model_arrays(tmp_path / "SMPL_NEUTRAL.pkl")
    assert np.array_equal(arrays["shapedirs"], np.arange(12.0).reshape(2, 3, 2))
    assert np.array_equal(arrays["J_regressor"], np.eye(3)) and arrays["f"].shape == (1, 3)
    assert rh.find_model_files("smpl", str(tmp_path)) == {"neutral": tmp_path / "SMPL_NEUTRAL.pkl"}


class _Touch:
    """Unpickles by creating a file: what a crafted data file could do in place of any command."""

    def __init__(self, path):
        self.path = Path(path)

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_crafted_smpl_files_are_refused_before_any_code_runs(tmp_path, capsys):
    hit = tmp_path / "pwned"
    evil = {"f": np.array([[0, 1, 2]]), "v_template": _Touch(hit)}
    (tmp_path / "smpl").mkdir()
    argv = [str(tmp_path / "out"), "--body-model", "smpl", "--model-path", str(tmp_path),
            "--num-images", "1"]
    for protocol, named in ((2, "__builtin__.getattr"), (4, "pathlib.Path.touch")):
        (tmp_path / "smpl" / "SMPL_NEUTRAL.pkl").write_bytes(pickle.dumps(evil, protocol=protocol))
        assert (f"refused {tmp_path / 'smpl' / 'SMPL_NEUTRAL.pkl'}: it names {named},"
                in _main_error(argv, capsys))
        assert not hit.exists() and not (tmp_path / "out").exists()
    # the same file through a plain unpickler does create it: the test would see code running
    pickle.loads((tmp_path / "smpl" / "SMPL_NEUTRAL.pkl").read_bytes())
    assert hit.exists()
    hit.unlink()
    # an .npz is read without pickles: an object array is refused, not unpickled
    np.savez(tmp_path / "model.npz", f=np.array([[0, 1, 2]]),
             v_template=np.array([_Touch(hit)], dtype=object))
    with pytest.raises(rh.RenderError, match="refused .*'v_template' holds pickled"):
        rh.load_model_arrays(tmp_path / "model.npz")
    assert not hit.exists()
    # SMPL-X's unused name tables are skipped, the arrays kept
    np.savez(tmp_path / "x.npz", f=np.array([[0, 1, 2]]),
             joint2num=np.array([{"pelvis": 0}], dtype=object))
    assert set(rh.load_model_arrays(tmp_path / "x.npz")) == {"f"}


def _fake_smpl(root: Path):
    """A stick-figure stand-in with SMPL's array layout (6890 vertices, 24 joints), for smoke
    tests."""
    par = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]
    J = np.array([[0, .9, 0], [.08, .82, 0], [-.08, .82, 0], [0, 1.0, 0], [.1, .45, 0],
                  [-.1, .45, 0], [0, 1.15, 0],
                  [.1, .08, 0], [-.1, .08, 0], [0, 1.25, 0], [.1, .02, .12], [-.1, .02, .12],
                  [0, 1.45, 0],
                  [.08, 1.38, 0], [-.08, 1.38, 0], [0, 1.6, .02], [.18, 1.4, 0], [-.18, 1.4, 0],
                  [.45, 1.4, 0],
                  [-.45, 1.4, 0], [.7, 1.4, 0], [-.7, 1.4, 0], [.78, 1.4, 0], [-.78, 1.4, 0]])
    V, rng = 6890, np.random.default_rng(0)
    owner = np.arange(V) % 24
    Jr = np.zeros((24, V))
    Jr[owner, np.arange(V)] = 1
    Jr /= Jr.sum(1, keepdims=True)
    W = np.zeros((V, 24))
    W[np.arange(V), owner] = 1
    data = dict(v_template=J[owner] + rng.normal(0, 0.04, (V, 3)),
                shapedirs=rng.normal(0, 1e-3, (V, 3, 10)),
                posedirs=np.zeros((V, 3, 207)), J_regressor=Jr, weights=W,
                kintree_table=np.array([[2**32 - 1 if p < 0 else p for p in par], list(range(24))]),
                f=np.array([[i, i + 24, i + 48] for i in range(V - 48)]))
    (root / "smpl").mkdir(parents=True)
    (root / "smpl" / "SMPL_NEUTRAL.pkl").write_bytes(pickle.dumps(data, protocol=2))


def test_smpl_body_model_path_renders(gl, tmp_path):
    _fake_smpl(tmp_path / "models")
    ann = rh.render_dataset(tmp_path / "out", num_images=1, body_model="smpl",
                            model_path=tmp_path / "models", **{**TINY, "image_size": 64})
    coco = json.loads(ann.read_text())
    assert coco["images"] and all(len(a["keypoints"]) == 51 for a in coco["annotations"])


def test_smpl_body_model_path_writes_mpii_joints(gl, tmp_path):
    _fake_smpl(tmp_path / "models")
    ann = rh.render_dataset(tmp_path / "out", num_images=1, body_model="smpl",
                            model_path=tmp_path / "models",
                            skeleton="mpii", **{**TINY, "image_size": 64})
    coco = json.loads(ann.read_text())
    assert coco["categories"][0]["keypoints"] == rh.MPII_KEYPOINT_NAMES
    assert coco["annotations"] and all(len(a["keypoints"]) == 48 for a in coco["annotations"])
    body = rh.get_body_model("smpl", str(tmp_path / "models"))
    verts, kps = rh.build_people(body, body.sample_shape(np.random.default_rng(0), 2, "synthetic"),
                                 rh.sample_poses(np.random.default_rng(1), 2, "synthetic"),
                                 np.zeros(2), extended=True)
    assert kps.shape == (2, 21, 3)
    # head_top: SMPL vertex 411
    assert np.allclose(kps[:, 17], verts[:, rh.SMPL_HEAD_TOP], atol=1e-5)


@pytest.fixture(scope="module")
def mpii_scenes(scenes, tmp_path_factory):
    """The `scenes` fixture's settings with MPII labels."""
    out = tmp_path_factory.mktemp("mpii")
    ann = rh.render_dataset(out, num_images=3, seed=1, skeleton="mpii",
                            **{**TINY, "image_size": 160, "mean_people": 4.0})
    return out, json.loads(ann.read_text())


def test_mpii_scenes_label_16_joints_on_the_same_images(scenes, mpii_scenes):
    (coco_dir, coco), (mpii_dir, mpii) = scenes, mpii_scenes
    cat = mpii["categories"][0]
    assert cat["keypoints"] == rh.MPII_KEYPOINT_NAMES and cat["skeleton"] == rh.MPII_SKELETON
    assert mpii["info"]["config"]["skeleton"] == "mpii" and "skeleton" not in coco["info"]["config"]
    # the labels change, the pixels do not
    for a, b in zip(coco["images"], mpii["images"], strict=True):
        assert (coco_dir / "images" / a["file_name"]).read_bytes() == \
            (mpii_dir / "images" / b["file_name"]).read_bytes()
    names = rh.COCO_KEYPOINT_NAMES
    for c, m in zip(coco["annotations"], mpii["annotations"], strict=True):
        assert c["segmentation"] == m["segmentation"] and len(m["keypoints"]) == 48
        kc, km = np.array(c["keypoints"]).reshape(17, 3), np.array(m["keypoints"]).reshape(16, 3)
        assert m["num_keypoints"] == (km[:, 2] > 0).sum()
        for j, name in enumerate(rh.MPII_KEYPOINT_NAMES):  # limbs: the points COCO uses
            if name in rh.MPII_FROM_COCO:
                k = kc[names.index(rh.MPII_FROM_COCO[name])]
                assert np.allclose(km[j, :2], k[:2], atol=0.02) and km[j, 2] == k[2]
    people = [m for m in mpii["annotations"] if m["image_id"] == 1]
    assert rh.draw_keypoints(np.zeros((160, 160, 3), np.uint8), people).any()


def test_mpii_head_top_above_upper_neck_above_thorax_when_standing(gl):
    assert np.argmax(gl.rest[:, 1]) == rh.ANNY_HEAD_TOP  # the pinned vertex is the top of the head
    _, _, _, kl = _two_people(gl, behind=1.5, extended=True)
    front = rh.LABEL_SETS["mpii"].labels(kl)[0]
    assert front.shape == (16, 3) and (front[:, 2] > 0).all()
    x, y = ({n: front[i, d] for i, n in enumerate(rh.MPII_KEYPOINT_NAMES)} for d in (0, 1))
    assert y["head_top"] < y["upper_neck"] < y["thorax"] < y["pelvis"] < y["r_knee"] < y["r_ankle"]
    assert y["upper_neck"] - y["head_top"] > 0.05 * (y["r_ankle"] - y["head_top"])
    # facing the camera: the right side on the left
    assert x["r_shoulder"] < x["thorax"] < x["l_shoulder"]


def test_bank_labels_mpii_joints_in_crop_coordinates(gl, tmp_path):
    ann = rh.render_dataset(tmp_path, kind="bank", num_images=3, image_size=96, skeleton="mpii",
                            progress=False)
    coco = json.loads(ann.read_text())
    assert coco["categories"][0]["keypoints"] == rh.MPII_KEYPOINT_NAMES
    for im, a in zip(coco["images"], coco["annotations"], strict=True):
        rgba = cv2.imread(str(tmp_path / "images" / im["file_name"]), cv2.IMREAD_UNCHANGED)
        kp = np.array(a["keypoints"]).reshape(16, 3)
        assert (kp[:, 2] > 0).all() and a["num_keypoints"] == 16
        assert ((kp[:, 0] < im["width"]) & (kp[:, 1] < im["height"]) & (kp[:,
                                                                           :2] >= 0).all(1)).all()
        vis = kp[kp[:, 2] == 2]
        assert (rgba[vis[:, 1].astype(int), vis[:, 0].astype(int), 3] == 255).all()


def test_settings_come_from_one_place(tmp_path):
    with pytest.raises(rh.RenderError, match="unknown render setting colour"):
        rh.render_dataset(tmp_path / "x", num_images=1, colour="red")
    assert not (tmp_path / "x").exists()
    with pytest.raises(rh.RenderError, match="num_images"):
        rh.RenderConfig(num_images="many")
    legacy = ["kind", "num_images", "style", "image_size", "mean_people", "min_people",
              "camera_distance", "seed",
              "backgrounds", "poses", "body_model", "model_path", "renderer_version"]
    # caches rendered before --skeleton stay valid
    assert list(rh._config_json(rh.RenderConfig())) == legacy
    assert rh._config_json(rh.RenderConfig(skeleton="mpii"))["skeleton"] == "mpii"
    args = rh.parse_args(["out", "--skeleton", "mpii", "--camera-distance", "6", "0.5",
                          "--num-images", "7"])
    cfg = rh.make_config({n: getattr(args, n) for n in rh.SETTINGS})
    assert cfg == rh.RenderConfig(skeleton="mpii", camera_distance=(6.0, 0.5), num_images=7)
    assert rh.RenderConfig(mean_people=2, poses=Path("p")) == rh.RenderConfig(mean_people=2.0,
                                                                              poses="p")


def _people_mask(anns: list, shape: tuple) -> np.ndarray:
    from pycocotools import mask as mask_utils
    masks = [mask_utils.decode(a["segmentation"]) > 0 for a in anns]
    return np.any(masks, 0) if masks else np.zeros(shape[:2], bool)


def test_style_factors_switch_their_factor_alone(gl):
    """Each switched factor changes the image; the appearance factors leave the labels (people,
    camera) as they are, and in the stand-in style (no blur mixes pixels) lighting and clothing
    change people's pixels only, the background the backdrop's only."""
    files = rh.background_files(None)
    geo = dict(image_size=96, mean_people=2.0, min_people=2, camera_distance=(6.0, 0.5), seed=7)
    assert (rh.RenderConfig(style_factors={}) == rh.RenderConfig() and
            rh.RenderConfig().style_factors == ())
    for style, other in (("standin", "synthetic"), ("synthetic", "standin")):
        base_img, base_anns = rh.render_scene(rh.RenderConfig(style=style, **geo), 0, gl, files)
        people = _people_mask(base_anns, base_img.shape)
        assert people.any() and not people.all()
        for f in rh.STYLE_FACTORS:
            cfg = rh.RenderConfig(style=style, style_factors={f: other}, **geo)
            assert rh.factor_style(cfg, f) == other and rh.factor_style(
                cfg, "lighting" if f != "lighting" else "pitch") == style
            img, anns = rh.render_scene(cfg, 0, gl, files)
            changed = (img != base_img).any(2)
            assert changed.any(), f
            assert (anns == base_anns) == (f in ("clothing", "lighting", "background", "blur")), f
            if style == "standin" and f in ("clothing", "lighting"):
                assert not changed[~people].any(), f
            if style == "standin" and f == "background":
                assert not changed[people].any() and changed[~people].any()


def test_default_settings_render_the_demo_cache_byte_for_byte(gl, tmp_path):
    """No factor switched: the first scenes of the demo's val split come out as the cache holds
    them."""
    import repro
    cache = ROOT / "data" / "demo" / "v2-small" / "val"
    if not (cache / "annotations.json").is_file():
        pytest.skip("data/demo/v2-small/val not rendered here")
    rh.render_dataset(tmp_path / "val", num_images=4, seed=2000, progress=False,
                      **repro.DEMO_STANDIN)
    for f in sorted((tmp_path / "val" / "images").iterdir()):
        assert f.read_bytes() == (cache / "images" / f.name).read_bytes(), f.name


def test_bad_style_factors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert "light=standin is not FACTOR=STYLE" in _main_error([str(out), "--style-factors",
                                                               "light=standin"], capsys)
    assert "pitch=sepia is not FACTOR=STYLE" in _main_error([str(out), "--style-factors",
                                                             "pitch=sepia"], capsys)
    assert "the style is synthetic already" in _main_error([str(out), "--style-factors",
                                                            "blur=synthetic"], capsys)
    assert "names a factor twice" in _main_error([str(out), "--style-factors",
                                                  "yaw=standin,yaw=synthetic"],
                                                 capsys)
    assert "bank crops have no pitch" in _main_error([str(out), "--kind", "bank", "--style-factors",
                                                      "pitch=standin"], capsys)
    assert not out.exists()
    cfg = rh.make_config(dict(style_factors=["yaw=standin", "blur=standin,lighting=standin"]))
    assert cfg.style_factors == ("blur=standin", "lighting=standin", "yaw=standin")  # one spelling
    assert rh._config_json(cfg)["style_factors"] == list(cfg.style_factors)


_TINY_BVH = """HIERARCHY
ROOT Hips
{
  OFFSET 0 0 0
  CHANNELS 6 Xposition Yposition Zposition Zrotation Xrotation Yrotation
  JOINT Spine
  {
    OFFSET 0 10 0
    CHANNELS 3 Zrotation Xrotation Yrotation
    End Site
    {
      OFFSET 0 5 0
    }
  }
}
MOTION
Frames: 3
Frame Time: 0.0333
"""


def test_truncated_bvh_is_refused_in_one_line(tmp_path, capsys):
    frame = " ".join(["0"] * 9) + "\n"
    (tmp_path / "good.bvh").write_text(_TINY_BVH + frame * 3)
    names, parents, _, _, data, _, end_sites = rh.parse_bvh(tmp_path / "good.bvh")
    assert names == ["Hips", "Spine"] and parents == [-1, 0] and data.shape == (3, 9)
    assert np.allclose(end_sites[1], [0, 5, 0])
    (tmp_path / "bvh").mkdir()
    # cut off in frame 3
    (tmp_path / "bvh" / "cut.bvh").write_text(_TINY_BVH + frame * 2 + "0 0 0 0")
    with pytest.raises(rh.RenderError,
                       match="promises 3 frames of 9 channels, the file holds 2 frames and 4"):
        rh.parse_bvh(tmp_path / "bvh" / "cut.bvh")
    out = tmp_path / "out"
    msg = _main_error([str(out), "--poses", str(tmp_path / "bvh")], capsys)
    assert "cut.bvh" in msg and "truncated" in msg and not out.exists()


def test_unusable_gl_platform_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "render_humans.py"), str(out), "--num-images",
                        "1"],
                       capture_output=True, text=True,
                       env={**os.environ, "PYOPENGL_PLATFORM": "bogus"})
    assert (r.returncode == 2 and r.stderr.strip().count("\n") == 0 and
            "PYOPENGL_PLATFORM=bogus" in r.stderr)
    assert not out.exists()
    # osmesa asked for where libOSMesa is missing (simulated: the library lookup finds nothing)
    real_find = rh.ctypes.util.find_library
    monkeypatch.setattr(rh.ctypes.util, "find_library", lambda name: None if name == "OSMesa" else
                        real_find(name))
    monkeypatch.setenv("PYOPENGL_PLATFORM", "osmesa")
    assert "libOSMesa is not installed" in _main_error([str(out), "--num-images", "1"], capsys)
    assert not out.exists()
    # a GL context that cannot be made: found before the first file is written
    monkeypatch.setattr(rh.ctypes.util, "find_library", lambda name: "libfound.so")

    def no_context():
        raise rh.RenderError("cannot make a headless OpenGL context (simulated)")

    monkeypatch.setattr(rh, "get_renderer", no_context)
    assert "simulated" in _main_error([str(out), "--num-images", "1"], capsys) and not out.exists()


def test_people_counts_the_scene_cannot_hold_are_refused_or_named(gl, tmp_path, capsys):
    out = tmp_path / "out"
    for argv, words in ((["--mean-people", "inf"], "finite"), (["--mean-people", "nan"], "finite"),
                        (["--mean-people", "1e9"], "at most 60 people"),
                        (["--min-people", "1000"], "at most 60")):
        assert words in _main_error([str(out), "--num-images", "1", *argv], capsys)
        # validated before parts/config.json: the next run into it is not refused
        assert not out.exists()
    capsys.readouterr()
    rh.render_dataset(out, num_images=2,
                      **{**TINY, "image_size": 64, "min_people": 40, "mean_people": 1.0})
    err = capsys.readouterr().err
    assert ("scenes hold fewer than min_people 40 people" in err and
            err.count("render_humans:") == 1), err


@pytest.mark.parametrize("sig,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_renderer_interrupted_is_one_line(tmp_path, sig, status):
    proc = subprocess.Popen([sys.executable, str(ROOT / "render_humans.py"), str(tmp_path / "out"),
                             "--num-images",
                             "400", "--image-size", "64", "--no-progress"], stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: (tmp_path / "out").exists() or proc.poll() is not None)
    R.time.sleep(1.0)
    proc.send_signal(getattr(R.signal, sig))
    err = proc.communicate(timeout=60)[1].strip().splitlines()
    assert proc.returncode == status and err == ["render_humans: interrupted; finished chunks are "
                                                 "kept: rerun the "
                                                 "same command to resume"], err


def test_sigterm_a_library_turns_into_an_error_still_ends_as_sigterm(tmp_path, monkeypatch, capsys):
    def start_up(*args, **kwargs):
        try:
            os.kill(os.getpid(), R.signal.SIGTERM)  # lands inside an import of GL or torch ...
            R.time.sleep(5)
        except KeyboardInterrupt:  # ... which catches it and fails later in its half-made state
            raise rh.RenderError("no headless OpenGL context: Algorithm already exists") from None
    monkeypatch.setattr(rh, "render_dataset", start_up)
    previous = R.signal.getsignal(R.signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            rh.main([str(tmp_path / "out"), "--no-progress"])
    finally:
        R.signal.signal(R.signal.SIGTERM, previous)
    assert e.value.code == 143 and capsys.readouterr().err.startswith("render_humans: interrupted;")


def test_read_only_out_dir_is_one_line(gl, tmp_path, monkeypatch, capsys):
    import errno

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        # root ignores the mode: simulate a read-only file system instead
        if os.access(ro, os.W_OK):
            def refuse(self, *args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

            monkeypatch.setattr(Path, "mkdir", refuse)
        msg = _main_error([str(ro / "out"), "--num-images", "1", "--image-size", "64"], capsys)
    finally:
        monkeypatch.undo()
        ro.chmod(0o700)
    assert "cannot write into" in msg and ("Read-only" in msg or "Permission denied" in msg)
    assert not (ro / "out").exists()


def test_full_disk_leaves_no_temp_file(gl, tmp_path, monkeypatch, capsys):
    import errno

    real_open = open

    class FullDisk:  # a file on a full disk: it opens, its writes fail
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_on_full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode and Path(path).parent.name == "images" else f

    monkeypatch.setattr(rh, "open", open_on_full_disk, raising=False)
    out = tmp_path / "out"
    msg = _main_error([str(out), "--num-images", "2", "--image-size", "64", "--mean-people", "1"],
                      capsys)
    assert "No space left on device" in msg and "000000.jpg" in msg
    # no .tmp, image or chunk part
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["config.json"]


def test_junk_backgrounds_are_counted(gl, tmp_path, capsys):
    bg = tmp_path / "bg"
    bg.mkdir()
    cv2.imwrite(str(bg / "photo.png"), np.full((64, 64, 3), 128, np.uint8))
    (bg / "notes.jpg").write_text("not an image")
    (bg / "empty.png").write_bytes(b"")
    rh.render_dataset(tmp_path / "out", num_images=1, style="standin", backgrounds=bg,
                      **{**TINY, "image_size": 64})
    lines = [s for s in capsys.readouterr().err.splitlines() if "backgrounds" in s]
    assert len(lines) == 1 and "skipping 2 of 3 files" in lines[0]


def test_progress_off_a_terminal_is_sparse_plain_lines(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert type(rh.progress(10, stream=Terminal())).__name__ == "tqdm"
    clock = [0.0]
    monkeypatch.setattr(rh, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    log = io.StringIO()
    bar = rh.progress(100, 10, "render scenes/standin", "img", stream=log)
    for _ in range(9):  # 45 s of work
        clock[0] += 5.0
        bar.update(10)
    bar.set_postfix(loss="0.12")
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and bar.n == 100  # one line after 30 s, one at the end
    assert lines[-1] == "render scenes/standin: 100/100 img (100%), 2.0 img/s, 45 s (loss=0.12)"
    quiet = rh.progress(5, stream=log, enabled=False)
    quiet.update(5)
    quiet.close()
    assert log.getvalue().count("\n") == 2


# ==============================================================================================
# Shared fixtures: toy COCO-format sets of stick figures (no GL needed), their MPII relabelling, and
# the helpers of every section (a refused command line, waiting on a process)
# ==============================================================================================
# A standing stick figure in a 1 x 2 box (x right, y down), COCO order.
TEMPLATE = np.array([[0.5, 0.14], [0.58, 0.08], [0.42, 0.08], [0.66, 0.12], [0.34, 0.12],
                     [0.72, 0.3], [0.28, 0.3],
                     [0.74, 0.52], [0.26, 0.52], [0.78, 0.74], [0.22, 0.74], [0.6, 0.98],
                     [0.4, 0.98],
                     [0.62, 1.42], [0.38, 1.42], [0.64, 1.86], [0.36, 1.86]], np.float32)


def stick_figure(rng, height):
    """(17, 2) keypoints of a randomly jittered stick figure, height px tall, at the origin."""
    kp = TEMPLATE * (height / 2) + rng.normal(0, height * 0.02, (17, 2))
    return kp.astype(np.float32)


def draw_figure(canvas, kp, colour, alpha=None):
    thick = max(2, int(np.ptp(kp[:, 1]) / 14))
    for a, b in np.array(rh.COCO_SKELETON) - 1:
        p, q = tuple(int(v) for v in kp[a]), tuple(int(v) for v in kp[b])
        cv2.line(canvas, p, q, colour, thick)
        if alpha is not None:
            cv2.line(alpha, p, q, 255, thick)


def write_toy_set(root: Path, n_images=6, size=128, people=(1, 3), seed=0, crowd=False):
    """A COCO-format keypoint set of stick figures on noise (no GL needed), each in its own
    column of the image, so that perfect maps are unambiguous."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n_images):
        img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        count = rng.integers(people[0], people[1] + 1)
        for j in range(count):
            h = rng.uniform(0.5, 0.9) * min(size, 2 * size / count)
            corner = [j * size / count + rng.uniform(0, size / count - h / 2),
                      rng.uniform(0, size - h)]
            kp = stick_figure(rng, h) + corner
            draw_figure(img, kp, tuple(int(c) for c in rng.integers(120, 255, 3)))
            full = np.concatenate([kp, np.full((17, 1), 2, np.float32)], 1)
            x0, y0 = kp.min(0)
            x1, y1 = kp.max(0)
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=1, iscrowd=0,
                             num_keypoints=17, keypoints=full.flatten().tolist(),
                             bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                             area=float((x1 - x0) * (y1 - y0)),
                             min_dist=float(rng.uniform(0, size)),
                             camera_angle=float(rng.uniform(0, 37))))
        if crowd:
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=1, iscrowd=1,
                             num_keypoints=0, keypoints=[0] * 51, bbox=[0, 0, 20, 20], area=400.0,
                             segmentation=[[0, 0, 20, 0, 20, 20, 0, 20]]))
        cv2.imwrite(str(root / "images" / f"{i:04d}.jpg"), img)
        images.append(dict(id=i + 1, file_name=f"{i:04d}.jpg", width=size, height=size))
    categories = [dict(id=1, name="person", supercategory="person",
                       keypoints=list(R.COCO.parts[:17]), skeleton=rh.COCO_SKELETON)]
    path = root / "annotations.json"
    path.write_text(json.dumps(dict(images=images, annotations=anns, categories=categories)))
    return path


def write_toy_bank(root: Path, n=4, seed=1):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        h = 96
        kp = stick_figure(rng, h) + [8, 4]
        rgba = np.zeros((h + 8, h // 2 + 16, 4), np.uint8)
        alpha = np.zeros(rgba.shape[:2], np.uint8)
        draw_figure(rgba, kp, (200, 60, 60, 255), alpha)
        rgba[..., 3] = alpha
        cv2.imwrite(str(root / "images" / f"{i:04d}.png"), rgba)
        full = np.concatenate([kp, np.full((17, 1), 2, np.float32)], 1)
        images.append(dict(id=i + 1, file_name=f"{i:04d}.png", width=rgba.shape[1],
                           height=rgba.shape[0]))
        anns.append(dict(id=i + 1, image_id=i + 1, category_id=1, iscrowd=0, num_keypoints=17,
                         keypoints=full.flatten().tolist(),
                         bbox=[0, 0, rgba.shape[1], rgba.shape[0]], area=1.0))
    path = root / "annotations.json"
    path.write_text(json.dumps(dict(images=images, annotations=anns,
                                    categories=[dict(id=1, name="person")])))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return dict(train=write_toy_set(root / "train", 6, seed=0, crowd=True),
                val=write_toy_set(root / "val", 3, seed=1),
                synthetic=write_toy_set(root / "synthetic", 6, people=(2, 4), seed=2),
                bank=write_toy_bank(root / "bank"))


def toy_data_args(toy):
    return ["--train-json", str(toy["train"]), "--train-images",
            str(toy["train"].parent / "images"),
            "--val-json", str(toy["val"]), "--val-images", str(toy["val"].parent / "images"),
            "--synthetic-json", str(toy["synthetic"]), "--bank-json", str(toy["bank"])]


def toy_args(toy, out, *extra):
    return toy_data_args(toy) + [
            "--out", str(out), "--batch-size", "4", "--input-size", "64", "--width", "16",
            "--stages", "2",
            "--eval-height", "64", "--eval-scales", "1.0", "--log-every", "1", "--threads", "2",
            *extra]


COCO_TO_MPII = {0: 16, 1: 14, 2: 12, 3: 11, 4: 13, 5: 15, 10: 10, 11: 8, 12: 6, 13: 5, 14: 7, 15: 9}


def relabel_mpii(path: Path) -> Path:
    """A toy COCO-format set relabelled with MPII's 16 joints, beside the original: thorax and
    pelvis at the shoulder and hip midpoints, upper neck between thorax and nose, head top above."""
    data = json.loads(path.read_text())
    for a in data["annotations"]:
        c = np.array(a["keypoints"], np.float32).reshape(17, 3)
        m = np.zeros((16, 3), np.float32)
        if a.get("num_keypoints", 1):
            for j, k in COCO_TO_MPII.items():
                m[j] = c[k]
            m[6], m[7] = (c[11] + c[12]) / 2, (c[5] + c[6]) / 2
            m[8] = (c[0] + m[7]) / 2
            m[9] = 2 * c[0] - m[8]
            m[6:10, 2] = 2
        a["keypoints"], a["num_keypoints"] = m.flatten().tolist(), int((m[:, 2] > 0).sum())
    out = path.with_name("mpii.json")
    out.write_text(json.dumps(data))
    return out


@pytest.fixture(scope="module")
def mpii_toy(toy):
    return {k: relabel_mpii(v) for k, v in toy.items()}


def run_main_error(capsys, argv):
    """The one line a refused command gives: repro.py's, or a script's (SCRIPTS) where the first
    job flag given is one of its jobs."""
    script = next((path for a in argv for path, m in SCRIPTS.items() if a and a in m.JOBS),
                  "repro.py")
    capsys.readouterr()
    assert SCRIPTS[script].main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{Path(script).name}: error:"), err
    return err[0]


def read_only(monkeypatch, folder: Path) -> None:
    """A folder the tests' user (often root, whom chmod does not stop) is told it cannot write."""
    def access(path, mode, real=R.os.access):
        return Path(path) != folder and real(path, mode)
    monkeypatch.setattr(R.os, "access", access)


def _wait_for(condition, seconds=120.0):  # generous: CI machines may be loaded
    deadline = R.time.time() + seconds
    while not condition():
        assert R.time.time() < deadline, "timed out"
        R.time.sleep(0.1)


# ==============================================================================================
# repro.py, in the order of its sections
# ==============================================================================================

# ---- the file's layout: the method first, the tooling after it, calls that go one way ------------

def repro_parts() -> tuple[str, ast.Module, int, int]:
    """repro.py's source, its tree, and the first lines of Part I and Part II (their banners)."""
    src = (ROOT / "repro.py").read_text()
    banners = [i for i, line in enumerate(src.splitlines(), 1) if line.startswith("# Part I")]
    return src, ast.parse(src), banners[0] - 1, banners[1] - 1


def test_part_one_uses_part_two_only_through_the_seams_its_docstring_lists():
    import symtable
    src, tree, _, part2 = repro_parts()
    defined = {t.id if isinstance(t, ast.Name) else None for n in tree.body if n.lineno > part2
               for t in (getattr(n, "targets", None) or [getattr(n, "target", None)])} - {None}
    defined |= {n.name for n in tree.body if n.lineno > part2 and
                isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    used = set()

    def free_names(table):
        used.update(s.get_name() for s in table.get_symbols() if s.is_global() and
                    s.get_name() in defined)
        for child in table.get_children():
            free_names(child)
    for child in symtable.symtable(src, "repro.py", "exec").get_children():
        if child.get_lineno() < part2:
            free_names(child)
    used |= {m.id for n in tree.body if n.lineno < part2 and
             not isinstance(n, (ast.FunctionDef, ast.ClassDef))
             for m in ast.walk(n) if isinstance(m, ast.Name) and m.id in defined}
    seams = re.search(r"only through these seams \(a test checks the list\): (.*?);", R.__doc__,
                      re.S).group(1)
    listed = set(re.findall(r"\b([A-Za-z_]+)\b(?=,| \(|$)", seams.replace("\n", " ")))
    assert used == listed, (sorted(used), sorted(listed))


def test_the_docstring_names_each_parts_sections_in_order_and_no_function_is_long():
    src, _, _, part2 = repro_parts()
    lines = src.splitlines()
    titles = [(i, lines[i].lstrip("# ").split(":")[0].split(" (")[0].lower())
              for i in range(1, len(lines))
              if re.match(r"# -{20,}$", lines[i - 1]) and re.match(r"# \w", lines[i])]
    doc = " ".join(R.__doc__.lower().split())
    where = [doc.find("reading map.")]
    # each found after the one before it: the map lists them in the file's order
    for _, title in titles:
        where.append(doc.find(title, where[-1] + 1))
        assert where[-1] != -1, f"the reading map does not name '{title}' in the file's order"
    where = where[1:]
    split = doc.find("part ii, the tooling")
    assert all((at < split) == (i < part2) for (i, _), at in zip(titles, where))
    assert not re.search(r"\blines? \d", R.__doc__)  # line numbers go stale with every edit
    assert len(lines) - part2 <= len(lines) / 2, "Part II, the tooling, outweighs the method"
    command_line = len(lines) - lines.index("# The command line") + 1  # the last section, its banner
    assert command_line <= 250, f"the command line is {command_line} lines"
    for path in ("repro.py", "render_humans.py", *SCRIPTS):
        long = [(n.name, n.end_lineno - n.lineno + 1)
                for n in ast.walk(ast.parse((ROOT / path).read_text()))
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and
                n.end_lineno - n.lineno >= 60]
        assert not long, f"{path}: functions over 60 lines: {long}"


# The way in, every call from main to Trainer.fit that carries it (utilities such as write_json or
# resolve_device left out), in the order they are made: each is called by the nearest one before it
# that calls it. A call jumps when caller and callee are defined more than 200 lines apart.
WAY_IN = ("main run_main parse_args pick_job build_parser job_config resolve_init check_config "
          "train_job start_job setup_distributed load_data run_training start_run Trainer.__init__ "
          "hold_run_dir prepare_metrics Trainer.fit").split()


def test_the_way_in_from_main_to_trainer_fit_takes_at_most_five_long_jumps():
    src, tree, _, _ = repro_parts()
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defs |= {f"{c.name}.{m.name}": m for c in defs.values() if isinstance(c, ast.ClassDef)
             for m in c.body if isinstance(m, ast.FunctionDef)}

    def calls(caller: str) -> set[str]:
        """What a function calls by name; a dispatch through JOBS calls every job's function."""
        called = {getattr(c.func, "id", None) or getattr(c.func, "attr", None)
                  for c in ast.walk(defs[caller]) if isinstance(c, ast.Call)}
        jobs = any(isinstance(n, ast.Name) and n.id == "JOBS" for n in ast.walk(defs[caller]))
        return called | ({job.run.__name__ for job in R.JOBS.values()} if jobs and "run" in called
                         else set())

    long = []
    for i, callee in enumerate(WAY_IN[1:], 1):
        name = "Trainer" if callee == "Trainer.__init__" else callee.split(".")[-1]
        caller = next((c for c in reversed(WAY_IN[:i]) if name in calls(c)), None)
        assert caller, f"no function before {callee} on the way in calls it"
        if abs(defs[caller].lineno - defs[callee].lineno) > 200:
            long.append(f"{caller} -> {callee}")
    assert len(long) <= 5, long
    mapped = re.search(r"The way in, .*?:\n  (.*)\n", R.__doc__).group(1).split(" -> ")
    assert [n for n in WAY_IN if n in mapped] == mapped, mapped  # the reading map's line, in order


# ==============================================================================================
# Part I: the method, in the order one training step's data flows
# ==============================================================================================

# ---- Config: every setting once, with its help text ----------------------------------------------

@pytest.mark.parametrize("argv,words", [
    (["--batch-size", "0"], "--batch-size must be at least 2"),
    (["--mode", "real", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--mode", "student-teacher", "--bins", "0"], "--bins must be at least 2"),
    (["--mode", "student-teacher", "--bins", "1"], "--bins must be at least 2"),
    (["--steps", "-5"], "--steps must be 0 or more"),
    (["--minutes", "-1"], "--minutes must be 0"),
    (["--input-size", "30"], "multiple of --stride"),
])
def test_impossible_settings_are_refused_before_anything_happens(capsys, tmp_path, argv, words):
    out = tmp_path / "run"
    assert words in run_main_error(capsys, argv + ["--out", str(out)])
    assert not out.exists()


# ---- Skeletons: one table each (COCO as OpenPose, MPII as the paper's OpenPose-MPI model) --------

def test_mpii_skeleton_tables():
    sk = R.MPII
    assert (sk.num_parts, sk.num_limbs, sk.num_heat, sk.num_paf) == (15, 14, 16, 28)
    for i, j in enumerate(sk.flip_parts):
        assert sk.parts[j] == R.mirror(sk.parts[i])
    for (a, b), k in zip(sk.limbs, sk.flip_limbs):
        assert tuple(sk.limbs[k]) == (sk.flip_parts[a], sk.flip_parts[b])
    joints = np.zeros((16, 3), np.float32)
    joints[:, 0], joints[:, 2] = np.arange(16), 2
    parts = sk.to_parts(joints)
    # head top, upper neck, centre
    assert parts[0, 0] == 9 and parts[1, 0] == 8 and parts[14, 0] == 6.5
    back = sk.to_joints(parts)
    scored = [j for j in range(16) if j not in (6, 7)]
    assert np.array_equal(back[scored], joints[scored]) and (back[[6, 7]] == 0).all()
    coco = np.zeros((17, 3), np.float32)
    coco[[5, 6], :2], coco[[5, 6], 2] = [[10, 0], [20, 4]], [2, 1]
    # the neck: shoulder midpoint, lower visibility
    assert R.COCO.to_parts(coco)[17].tolist() == [15, 2, 1]


def test_each_skeleton_names_its_benchmark_and_nothing_sets_it_after():
    assert type(R.COCO.benchmark) is R.CocoBenchmark
    assert isinstance(R.MPII.benchmark, R.MpiiBenchmark)
    tree = ast.parse((ROOT / "repro.py").read_text())
    set_after = [ast.unparse(t) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Attribute) and t.attr == "benchmark"]
    assert not set_after, set_after


# ---- Datasets: COCO-format json + images (real, stand-in, synthetic scenes, person bank) ---------

def test_person_without_keypoints_goes_into_the_ignore_mask(tmp_path):
    path = write_toy_set(tmp_path, 1, people=(1, 1))
    data = json.loads(path.read_text())
    data["annotations"].append(dict(id=99, image_id=1, category_id=1, iscrowd=0, num_keypoints=0,
                                    keypoints=[0] * 51, bbox=[100, 100, 20, 20], area=400.0,
                                    segmentation=[[100, 100, 120, 100, 120, 120, 100, 120]]))
    path.write_text(json.dumps(data))
    rec = R.load_keypoint_set(path, tmp_path / "images").records[0]
    assert len(rec.keypoints) == 1 and (R.ignore_mask(rec)[105:115, 105:115] == 0).all()


@pytest.mark.parametrize("name,json_name",
                         [("coco", "test_coco.json"), ("ochuman", "test_ochuman.json")])
def test_real_fixtures_load_and_evaluate(tmp_path, name, json_name):
    root = SHARED / "real" / name
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    kset = R.load_keypoint_set(root / json_name, root)
    assert len(kset.records) >= 3 and all(r.keypoints.shape[1:] == (18, 3) for r in kset.records)
    cfg, _ = R.parse_args(["--input-size", "64", "--width", "16", "--stages", "1", "--eval-height",
                           "96", "--eval-scales", "1.0"])
    stats, _ = R.evaluate(R.build_model(cfg), kset, cfg, torch.device("cpu"), progress=False)
    assert set(R.STAT_NAMES) <= set(stats) and stats["images"] == len(kset.records)


def test_missing_coco_root(capsys, tmp_path):
    assert "does not exist" in run_main_error(capsys,
                                              ["--mode", "real", "--coco-root",
                                               str(tmp_path / "nope")])


def test_json_without_keypoints(capsys, tmp_path, toy):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(images=[dict(id=1, file_name="a.jpg", width=8, height=8)],
                                   annotations=[dict(id=1, image_id=1, category_id=1,
                                                     bbox=[0, 0, 1, 1], area=1)],
                                   categories=[dict(id=1, name="person")])))
    argv = toy_args(toy, tmp_path / "o", "--mode", "real")
    argv[argv.index("--train-json") + 1] = str(bad)
    assert "no person keypoints" in run_main_error(capsys, argv)


def test_corrupt_json(capsys, tmp_path, toy):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    argv = toy_args(toy, tmp_path / "o", "--mode", "real")
    argv[argv.index("--val-json") + 1] = str(bad)
    assert "not valid json" in run_main_error(capsys, argv)


def test_wrong_keypoint_count(capsys, tmp_path, toy):
    data = json.loads(toy["val"].read_text())
    data["annotations"][0]["keypoints"] = data["annotations"][0]["keypoints"][:48]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    argv = toy_args(toy, tmp_path / "o", "--mode", "real")
    argv[argv.index("--val-json") + 1] = str(bad)
    assert "expected COCO's 17" in run_main_error(capsys, argv)


def test_undecodable_image(capsys, tmp_path, toy):
    root = tmp_path / "set"
    path = write_toy_set(root, 2)
    (root / "images" / "0001.jpg").write_bytes(b"this is not a jpeg")
    argv = toy_args(toy, tmp_path / "o", "--mode", "real")
    argv[argv.index("--train-json") + 1] = str(path)
    argv[argv.index("--train-images") + 1] = str(root / "images")
    assert "cannot decode image" in run_main_error(capsys, argv)


def test_a_json_of_the_other_skeleton_names_the_flag(capsys, tmp_path, mpii_toy, toy):
    argv = toy_args(toy, tmp_path / "o", "--mode", "real")
    argv[argv.index("--val-json") + 1] = str(mpii_toy["val"])
    assert "that is --skeleton mpii" in run_main_error(capsys, argv)


# ---- Person-centric crops and compositing --------------------------------------------------------

def toy_config(**kw):
    cfg, _ = R.parse_args(["--input-size", "64", "--batch-size", "4"])
    return R.dataclasses.replace(cfg, **kw)


@pytest.mark.parametrize("sk", [R.COCO, R.MPII], ids=["coco", "mpii"])
def test_flip_of_targets_equals_targets_of_flipped_keypoints(sk):
    rng = np.random.default_rng(0)
    size, stride, k = 64, 4, sk.num_parts
    kp = np.zeros((2, 3, k, 3), np.float32)
    kp[..., :2] = rng.uniform(0, size - 1, (2, 3, k, 2))
    kp[..., 2] = rng.choice([0, 1, 2], (2, 3, k))
    flipped = kp[:, :, sk.flip_parts].copy()
    flipped[..., 0] = size - 1 - flipped[..., 0]

    def targets(k):
        return torch.cat([R.paf_targets(torch.as_tensor(k), size, stride, 3.0, sk.limbs),
                          R.heatmap_targets(torch.as_tensor(k), size, stride, 2.5)], 1)
    assert torch.allclose(R.flip_maps(targets(kp), sk), targets(flipped), atol=1e-5)


def test_flip_swaps_left_and_right():
    names = R.COCO.parts
    for i, j in enumerate(R.COCO.flip_parts):
        assert names[j] == names[i].replace("left", "#").replace("right", "left").replace("#",
                                                                                          "right")
    for (a, b), k in zip(R.COCO.limbs, R.COCO.flip_limbs):
        assert tuple(R.COCO.limbs[k]) == (R.COCO.flip_parts[a], R.COCO.flip_parts[b])


def test_flipped_crop_mirrors_image_and_keypoints(toy):
    kset = R.load_keypoint_set(toy["train"], toy["train"].parent / "images")
    rec, image = kset.records[0], kset.image(0)
    plain = R.crop_person(image, None, rec, 0, toy_config(flip_prob=0.0), np.random.default_rng(3))
    mirrored = R.crop_person(image, None, rec, 0, toy_config(flip_prob=1.0),
                             np.random.default_rng(3))
    assert np.abs(mirrored.image.astype(int) - plain.image[:, ::-1].astype(int)).mean() < 1.0
    expect = plain.keypoints[:, R.COCO.flip_parts].copy()
    expect[..., 0] = 63 - expect[..., 0]
    assert np.allclose(mirrored.keypoints, expect, atol=1e-3)


def test_pasted_person_occludes_real_keypoints(toy):
    bank = R.load_keypoint_set(toy["bank"], toy["bank"].parent / "images")
    bank.preload()
    cfg = toy_config(input_size=64, paste_mean=0.0, paste_min=8, scale_range=(1.5, 1.6))
    rng = np.random.default_rng(0)
    kp = np.zeros((1, 18, 3), np.float32)
    kp[0, :, :2] = rng.uniform(0, 63, (18, 2))
    kp[0, :, 2] = 2
    sample = R.Sample(np.zeros((64, 64, 3), np.uint8), kp, np.zeros((0, 18, 3), np.float32),
                      np.full((64, 64), 255, np.uint8))
    out = R.paste_people(sample, bank, cfg, rng)
    # The real crop is black and pasted people are (200, 60, 60): brightness says how opaque they
    # are.
    xy = np.round(kp[0, :, :2]).astype(int)
    opacity = out.image.max(-1)[xy[:, 1], xy[:, 0]] / 200
    under, clear = opacity > 0.55, opacity < 0.45
    assert under.any() and clear.any()
    assert (out.keypoints[0, under, 2] == 1).all() and (out.keypoints[0, clear, 2] == 2).all()
    assert len(out.pasted) == 8 and (out.pasted[..., 2] > 0).any()


def test_paste_distance_follows_the_bin():
    rng = np.random.default_rng(0)
    for lo, hi in [(0, 10), (30, 40)]:
        centres = R.paste_centres(5, 128, rng, (lo, hi))
        dist = np.linalg.norm(centres - 63.5, axis=1)
        assert lo <= dist.min() < hi


# ---- Targets and loss masks ----------------------------------------------------------------------

def test_heatmap_and_paf_values():
    kp = torch.zeros(1, 1, 18, 3)
    # left shoulder on a cell centre (stride 4: 4i + 1.5)
    kp[0, 0, 5] = torch.tensor([9.5, 21.5, 2])
    kp[0, 0, 7] = torch.tensor([29.5, 21.5, 2])  # left elbow 20 px to its right
    heat = R.heatmap_targets(kp, 64, 4, sigma=3.0)
    assert heat.shape == (1, 19, 16, 16)
    def cell(x):
        return round((x - 1.5) / 4)
    assert heat[0, 5, cell(21.5), cell(9.5)] == pytest.approx(1.0) and heat[0, 0].max() == 0
    # background = 1 - max over parts
    assert heat[0, 18, cell(21.5), cell(9.5)] == pytest.approx(0.0)
    # truncated where the Gaussian drops below 0.01 (paper code)
    d = (R.grids(64, 4)[1] - 9.5).abs()
    assert torch.all((heat[0, 5, cell(21.5)] > 0) == (torch.exp(-d ** 2 / 18) >= 0.01))
    paf = R.paf_targets(kp, 64, 4, width=2.0, limbs=R.COCO.limbs)
    limb = [i for i, (a, b) in enumerate(R.COCO.limbs) if (a, b) == (5, 7)][0]
    px, py = paf[0, 2 * limb], paf[0, 2 * limb + 1]
    assert px[cell(21.5),
              cell(9.5):cell(29.5) + 1].min() == pytest.approx(1.0) and py.abs().max() == 0
    assert px[cell(21.5) + 2].abs().max() == 0  # 8 px off the limb, width 2
    assert paf[0, :2 * limb].abs().max() == 0


def test_paf_averages_overlapping_people():
    kp = torch.zeros(1, 2, 18, 3)
    # pointing right
    kp[0, 0, 5], kp[0, 0, 7] = torch.tensor([1.5, 9.5, 2]), torch.tensor([29.5, 9.5, 2])
    # pointing down
    kp[0, 1, 5], kp[0, 1, 7] = torch.tensor([13.5, 1.5, 2]), torch.tensor([13.5, 29.5, 2])
    paf = R.paf_targets(kp, 32, 4, width=2.0, limbs=R.COCO.limbs)
    limb = [i for i, (a, b) in enumerate(R.COCO.limbs) if (a, b) == (5, 7)][0]
    vec = paf[0, 2 * limb:2 * limb + 2, 2, 3]  # cell (3, 2) = pixel (13.5, 9.5), on both limbs
    assert torch.allclose(vec, torch.tensor([0.5, 0.5]))


def dense_heatmap_targets(keypoints, size, stride, sigma):
    """The reference: every person x part x grid cell, as repro.py computed it before its
    windows."""
    gy, gx = R.grids(size, stride)
    labelled = (keypoints[..., 2] > 0)[..., None]
    along_x = torch.exp(-(gx - keypoints[..., 0, None]) ** 2 / (2 * sigma ** 2)) * labelled
    along_y = torch.exp(-(gy - keypoints[..., 1, None]) ** 2 / (2 * sigma ** 2))
    heat = along_y[..., :, None] * along_x[..., None, :]
    heat = torch.where(heat >= 0.01, heat, 0.0)
    parts = heat.amax(1) if keypoints.shape[1] else heat.new_zeros(heat.shape[0],
                                                                   keypoints.shape[2], len(gy),
                                                                   len(gx))
    return torch.cat([parts, 1 - parts.amax(1, keepdim=True)], 1)


def dense_paf_targets(keypoints, size, stride, width, limbs):
    """The reference: every person x limb x grid cell, as repro.py computed it before its
    windows."""
    gy, gx = R.grids(size, stride)
    a, b = keypoints[:, :, limbs[:, 0]], keypoints[:, :, limbs[:, 1]]
    d = b[..., :2] - a[..., :2]
    length = torch.sqrt((d ** 2).sum(-1))
    valid = (a[..., 2] > 0) & (b[..., 2] > 0) & (length > 1e-3)
    u = d / length.clamp(min=1e-3)[..., None]
    rx = gx[None, :] - a[..., 0, None, None]
    ry = gy[:, None] - a[..., 1, None, None]
    along = rx * u[..., 0, None, None] + ry * u[..., 1, None, None]
    across = (rx * u[..., 1, None, None] - ry * u[..., 0, None, None]).abs()
    inside = (along >= -width) & (along <= length[..., None, None] + width) & (across <= width)
    inside = inside & valid[..., None, None]
    count = inside.sum(1).clamp(min=1)
    field_ = (inside[..., None, :, :] * u[..., None, None]).sum(1) / count[:, :, None]
    b_, l_, _, h_, w_ = field_.shape
    return field_.reshape(b_, 2 * l_, h_, w_)


@pytest.mark.parametrize("size, stride, sigma, width",
                         [(128, 4, 5.0, 5.0), (368, 8, 7.0, 8.0), ((72, 40), 4, 2.5, 2.0)])
def test_windowed_targets_equal_the_dense_ones(size, stride, sigma, width):
    """Random people, inside and beyond the crop, with unlabelled joints, zero-length and crossing
    limbs, up to 12 people on a cell: the windows change no value. Heatmaps are maxima of the same
    products, so bit-identical; a PAF's sum over people may add in another order (it is
    bit-identical on torch 2.14's CPU kernels)."""
    g = torch.Generator().manual_seed(stride)
    h, w = (size, size) if isinstance(size, int) else size
    for people in (0, 1, 5, 12):
        kp = torch.rand(4, people, 18, 3, generator=g)
        centre = torch.rand(4, people, 1, 2, generator=g) * 1.4 - 0.2
        kp[..., :2] = (centre + (kp[..., :2] - 0.5) * 0.6) * torch.tensor([w, h])
        kp[..., 2] = (kp[..., 2] > 0.2) * 2.0
        if people:
            kp[0, 0, 7, :2] = kp[0, 0, 5, :2]  # a zero-length limb has no field
            kp[1, :, :, :2] = kp[1, :1, :, :2]  # everyone on the same spot: the average over people
        for mine, dense in ((R.heatmap_targets(kp, size, stride, sigma),
                             dense_heatmap_targets(kp, size, stride, sigma)),
                            (R.paf_targets(kp, size, stride, width, R.COCO.limbs),
                             dense_paf_targets(kp, size, stride, width, R.COCO.limbs))):
            assert mine.shape == dense.shape and mine.dtype == dense.dtype
            assert (mine != 0).equal(dense != 0) and (mine - dense).abs().max() < 1e-6
        assert torch.equal(R.heatmap_targets(kp, size, stride, sigma),
                           dense_heatmap_targets(kp, size, stride, sigma))
        assert dense.abs().sum() > 0 or not people


def grad_of_loss(cfg, keypoints, pasted, ignore):
    _, target, mask = R.make_targets(keypoints, pasted, ignore, cfg)
    pred = torch.zeros_like(target, requires_grad=True)
    loss, _ = R.pose_loss([pred], target, mask)
    loss.backward()
    return pred.grad, target, mask


def test_pasted_people_masked_out_of_the_loss():
    cfg = toy_config()
    real = torch.zeros(1, 1, 18, 3)
    real[0, 0, :, :2], real[0, 0, :, 2] = torch.tensor([10.0, 10.0]), 2
    pasted = torch.zeros(1, 1, 18, 3)
    pasted[0, 0, :17, :2] = torch.as_tensor(TEMPLATE * 16 + [30, 20])
    pasted[0, 0, 17, :2] = pasted[0, 0, [5, 6], :2].mean(0)
    pasted[0, 0, :, 2] = 2
    ignore = torch.full((1, 64, 64), 255, dtype=torch.uint8)
    # mask mode: zero gradient wherever the pasted people's own heatmap / PAF exceeds 0.25 ...
    g, _, _ = grad_of_loss(cfg, real, pasted, ignore)
    own = torch.cat([R.paf_targets(pasted, 64, 4, cfg.paf_width, R.COCO.limbs),
                     R.heatmap_targets(pasted, 64, 4, cfg.sigma)], 1)
    paf_mag = own[:, :R.COCO.num_paf].reshape(1, R.COCO.num_limbs, 2, 16,
                                              16).norm(dim=2).repeat_interleave(2, 1)
    heat = own[:, R.COCO.num_paf:-1]
    under = torch.cat([paf_mag > 0.25, heat > 0.25, heat.amax(1, keepdim=True) > 0.25], 1)
    assert under.sum() > 50 and g[under].abs().max() == 0
    assert g[:, -1][under[:, -1]].numel() > 0  # the background channel is masked too
    # ... while include mode supervises them: their targets are drawn, as if they were real people
    include = R.dataclasses.replace(cfg, synthetic_loss="include")
    g_inc, target_inc, mask_inc = grad_of_loss(include, real, pasted, ignore)
    assert g_inc[under].abs().max() > 0 and (mask_inc == 1).all()
    assert torch.equal(target_inc,
                       R.make_targets(torch.cat([real, pasted], 1), pasted[:, :0], ignore,
                                      cfg).target)


def test_crowd_and_unlabelled_regions_get_zero_loss(toy):
    kset = R.load_keypoint_set(toy["train"], toy["train"].parent / "images")
    rec = kset.records[0]
    assert rec.ignore_rles, "the crowd annotation goes into the ignore mask"
    mask = R.ignore_mask(rec)
    assert (mask[:20, :20] == 0).all() and mask[40:, 40:].min() == 255
    cfg = toy_config(input_size=128)
    keypoints = torch.as_tensor(rec.keypoints[None])
    g, _, m = grad_of_loss(cfg, keypoints, keypoints[:, :0], torch.as_tensor(mask[None]))
    # cells inside the crowd box
    assert g[..., :4, :4].abs().max() == 0 and m[..., :4, :4].max() == 0
    assert g[..., 10:, 10:].abs().max() > 0


# ---- Batches: which samples a step trains on, built deterministically from (seed, step) ----------

@pytest.mark.parametrize("mode", ["real", "synthetic", "augmented"])
def test_batches_own_their_memory(toy, tmp_path, mode):
    """A CUDA loader pins every tensor of a batch, and pinning refuses aliased (expanded) memory."""
    cfg, _ = R.parse_args(toy_args(toy, tmp_path, "--mode", mode, "--synthetic-loss", "include"))
    maker = R.BatchMaker(R.load_data(cfg), cfg)
    rng = np.random.default_rng(0)
    batch = maker.batch(maker.plan(cfg.batch_size, rng), rng)
    assert all(v.is_contiguous() for v in vars(batch).values() if isinstance(v, torch.Tensor))


# ---- Networks: OpenPose's two-branch multi-stage design on two backbones -------------------------

def test_paper_student_trains_and_freezes_conv1_conv2_when_fine_tuning(toy, tmp_path):
    small = ("--preset", "paper", "--mode", "real", "--input-size", "64", "--stages", "2",
             "--batch-size", "2", "--steps", "2", "--eval-height", "64", "--max-val-images", "1")
    argv = toy_data_args(toy) + ["--out", str(tmp_path / "paper"), "--threads", "2", *small]
    assert R.main(argv) == 0
    cfg, _ = R.parse_args(argv + ["--init", str(tmp_path / "paper/ckpt.pt")])
    trainer = R.Trainer(cfg, R.load_data(cfg), torch.device("cpu"), tmp_path)
    frozen = [p.requires_grad for p in trainer.model.backbone[:R.VGG_FROZEN_LAYERS].parameters()]
    assert frozen and not any(frozen)
    assert all(p.requires_grad for p in trainer.model.backbone[R.VGG_FROZEN_LAYERS:].parameters())


# ---- Loss ----------------------------------------------------------------------------------------

def test_peak_hit_signal():
    kp = torch.zeros(1, 1, 18, 3)
    kp[0, 0, :, :2] = torch.tensor([29.5, 29.5])
    kp[0, 0, :2, 2] = 2
    heat = R.heatmap_targets(kp, 64, 4, 2.5)
    assert R.peak_hits(heat, kp, 4) == (2, 2)
    assert R.peak_hits(torch.roll(heat, 3, -1), kp, 4) == (0, 2)  # peaks 3 cells away
    assert R.peak_hits(heat * 0.05, kp, 4) == (0, 2)  # below the threshold


# ---- Teacher: an adversarial network that picks the bin the student sees next --------------------

def test_soft_target_rewards_and_punishes_the_picked_bin():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    rose = R.soft_target(p, 1, loss_rose=True)
    # paper code: p[k] *= 1 + alpha; p[other] -= p[k] * alpha / n; renormalised
    expect = p - 0.2 * 0.01 / 4
    expect[1] = 0.2 * 1.01
    assert np.allclose(rose, expect / expect.sum()) and rose[1] > p[1]
    fell = R.soft_target(p, 1, loss_rose=False)
    expect = p + 0.2 * 0.01 / 4
    expect[1] = 0.2 * 0.99
    assert np.allclose(fell, expect / expect.sum()) and fell[1] < p[1]
    for t in (rose, fell, R.soft_target(np.array([1.0, 0, 0, 0]), 0, True)):
        assert t.sum() == pytest.approx(1.0) and (t >= 0).all()


def test_teacher_step_scales_the_soft_label_update():
    p = np.full(4, 0.25)
    for step in (0.01, 0.1):
        t = R.soft_target(p, 2, loss_rose=True, step=step)
        expect = np.full(4, 0.25 - 0.25 * step / 4)
        expect[2] = 0.25 * (1 + step)
        assert np.allclose(t, expect / expect.sum())


def test_bins_follow_the_paper_edges():
    low, width = R.bin_edges("min_dist", np.array([1.0]), 10, 640)
    assert (low, round(width, 1)) == (0.0, 71.1)
    assert list(R.assign_bins(np.array([0, 71.0, 71.2, 600, 900]), low, width, 10)) == [0, 0, 1, 8,
                                                                                        9]
    low, width = R.bin_edges("camera_angle", np.array([1.0]), 10, 640)
    # the paper's step
    assert (round(low, 2), round(width, 2), round(low + 8 * width, 2)) == (3.68, 3.25, 29.70)
    low, width = R.bin_edges("scale", np.array([2.0, 4.0, 12.0]), 10, 640)
    assert (low, width) == (2.0, 1.0)


def test_paper_soft_label_leaves_the_picked_bin_when_the_loss_fell():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    fell = R.soft_target(p, 1, loss_rose=False, rule="paper")
    # paper code: p[picked] <= ... is a comparison: p[k] stays, p[other] += p[k] * beta / n
    assert np.allclose(fell, np.array([0.1005, 0.2, 0.3005, 0.4005]) / 1.0015)
    # a reward: as ours
    assert np.allclose(R.soft_target(p, 1, True, rule="paper"), R.soft_target(p, 1, True))
    uniform = np.full(10, 0.1)  # at p = 0.1 a punishment moves p[k] about 11x less than a reward
    assert R.soft_target(uniform, 0, False, rule="paper")[0] == pytest.approx(0.1 / 1.0009)
    assert R.soft_target(uniform, 0, True, rule="paper")[0] == pytest.approx(0.101 / 1.0001)


def test_teacher_update_and_lr_flags_reach_the_teacher(toy, tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(R.SharedAdam, "step", lambda self, lr, count: steps.append(lr))
    cfg, trainer = teacher_setup(toy, tmp_path, "--steps", "8", "--teacher-update", "paper",
                                 "--teacher-lr", "5e-5", "--lr", "2e-3")
    teacher = trainer.teacher
    # uniform p over 3 bins; the loss fell on bin 0: bins 1 and 2 rise by p * 0.01 / 3
    third = 1 / 3
    expect = np.array([third, third + third * 0.01 / 3, third + third * 0.01 / 3]) / (1 + 0.02 / 9)
    assert np.allclose(teacher.soft_target(0, loss_rose=False), expect)
    teacher.pools = [teacher.all] * cfg.bins  # no penalty step: every bin is large enough
    trainer.fit()
    assert steps == [5e-5] * 3  # not the student's 2e-3 schedule
    for bad in (dict(teacher_lr=-1.0), dict(teacher_bins="paper", teacher_attribute="scale"),
                dict(teacher_bins="paper", teacher_data="augmented")):
        with pytest.raises(R.ReproError, match="--teacher-"):
            R.check_config(R.Config(mode="student-teacher", **bad))


def test_paper_bins_are_np_digitize_on_the_papers_edges():
    x = np.array([-5.0, 0.0, 71.0, 71.2, 600.0, 900.0])
    low, width = R.bin_edges("min_dist", x, 10, 640, rule="paper")
    # bin 0: below 0, always empty
    assert list(R.assign_bins(x, low, width, 10)) == [0, 1, 1, 2, 9, 9]
    assert list(R.assign_bins(x, low, width, 10)) == list(np.digitize(x,
                                                                      np.linspace(0, 640, 10)[:-1]))
    # ours
    assert list(R.assign_bins(x, *R.bin_edges("min_dist", x, 10, 640), 10)) == [0, 0, 0, 1, 8, 9]
    angle = np.array([3.0, 3.7, 6.9, 7.0, 29.6, 29.8, 40.0])  # edges 3.68, 6.93, ..., 29.70 degrees
    low, width = R.bin_edges("camera_angle", angle, 10, 640, rule="paper")
    assert list(R.assign_bins(angle, low, width, 10)) == [0, 1, 1, 2, 8, 9, 9]
    assert list(R.assign_bins(angle, low, width, 10)) == list(
        np.digitize(angle, np.linspace(3.68161, 32.95209, 10)[:-1]))
    assert list(R.assign_bins(angle, *R.bin_edges("camera_angle", angle, 10, 640), 10)) == [0, 0, 0,
                                                                                            1, 7, 8,
                                                                                            9]


def test_teacher_heads_paper_without_batchnorm_and_relu_on_the_logits():
    for arch, paper_head in (("small", False), ("small-nobn", True), ("vgg19", True)):
        net = R.teacher_net(arch, 3, 64)
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) is not paper_head
        last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([-1.0, 2.0, -3.0]))
        logits = net(torch.zeros(1, 3, 64, 64))[0]
        assert torch.allclose(logits,
                              torch.tensor([0.0, 2.0, 0.0] if paper_head else [-1.0, 2.0, -3.0]))
    with pytest.raises(R.ReproError, match="small-nobn"):
        R.teacher_net("tiny", 3, 64)


def teacher_setup(toy, tmp_path, *extra):
    cfg, _ = R.parse_args(toy_args(toy, tmp_path, "--mode", "student-teacher", "--teacher-interval",
                                   "2", "--teacher-min-bin", "0", "--bins", "3", *extra))
    data = R.load_data(cfg)
    return cfg, R.Trainer(cfg, data, torch.device("cpu"), tmp_path)


def test_tiny_bins_are_penalised_and_never_trained_on(toy, tmp_path):
    cfg, trainer = teacher_setup(toy, tmp_path, "--teacher-min-bin", "3")
    teacher = trainer.teacher
    pool = teacher.pools[0][:1]
    teacher.pools = [pool[:0], pool.repeat(10, 0), pool.repeat(2, 0)]  # bins 0 and 2 too small
    teacher.pick_images = np.zeros((4, 64, 64, 3), np.uint8)
    before = teacher.probs.copy()
    picked = teacher.valid_pick(0, cfg.lr, 10)
    assert picked == 1
    assert not np.allclose(teacher.probs, before)  # the teacher learned from the penalty
    for _ in range(50):
        assert teacher.valid_pick(int(teacher.rng.integers(3)), cfg.lr, 10) == 1


def test_forced_teacher_trains_only_on_its_bin(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(R.Teacher, "output", lambda self, images: np.array([0.0, 0.0, 1.0]))
    cfg, trainer = teacher_setup(toy, tmp_path, "--teacher-attribute", "camera_angle", "--steps",
                                 "8")
    trainer.teacher.explore = 0.0  # every pick after the first window is the teacher's own
    teacher = trainer.teacher
    assert sum(teacher.counts) == len(trainer.maker.centres["synthetic"])
    seen = []
    real_batch = R.BatchMaker.batch
    def batch(self, specs, rng):
        seen.append(specs)
        return real_batch(self, specs, rng)
    monkeypatch.setattr(R.BatchMaker, "batch", batch)
    for step, batch in trainer.batches():
        result = trainer.train_step(batch, cfg.lr)
        teacher.observe(step, batch, result, cfg.lr)
        trainer.step = step + 1
    in_bin = {(int(i), int(p)) for i, p in teacher.pools[2]}
    after_first_window = seen[cfg.teacher_interval:]
    synthetic = [(s.index, s.person) for specs in after_first_window
                 for s in specs if s.source == "synthetic"]
    assert len(synthetic) == 6 * 2 and set(synthetic) <= in_bin
    assert [r["bin"] for r in teacher.records[1:]] == [2, 2, 2]


def crops(seed, n=4, size=64):
    return np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


def test_teacher_learns_on_the_crops_behind_its_previous_pick(toy, tmp_path):
    cfg, trainer = teacher_setup(toy, tmp_path)
    teacher, lr = trainer.teacher, 1e-3
    teacher.pools = [teacher.all] * cfg.bins  # no penalty steps in between
    old, new = crops(1), crops(2)
    teacher.window, teacher.hard_images = [1.0], old
    teacher.decide(2, lr)  # the first window: nothing to compare with, no step; p comes from `old`
    assert teacher.updates == 0 and teacher.pick_images is old
    assert np.allclose(teacher.probs, teacher.output(old))
    teacher.window, teacher.hard_images = [2.0], new  # the loss rose: reward the pick made on `old`
    target = R.soft_target(teacher.probs, teacher.picked, True, cfg.teacher_step)
    on_old, on_new = copy.deepcopy(teacher), copy.deepcopy(teacher)
    on_old.learn(target, old, lr, 4)
    on_new.learn(target, new, lr, 4)
    teacher.decide(4, lr)
    weights = [(a, b, c) for a, b, c in zip(teacher.net.parameters(), on_old.net.parameters(),
                                            on_new.net.parameters())]
    assert all(torch.equal(a, b) for a, b, _ in weights)
    assert not all(torch.equal(a, c) for a, _, c in weights)
    assert teacher.pick_images is new and teacher.updates == 1


def test_teacher_steps_with_the_students_learning_rate_betas_and_adam_counter(toy, tmp_path,
                                                                              monkeypatch):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = R.SharedAdam([p], betas=(0.8, 0.999))
    for count, g in ((41, torch.tensor([0.5, -1.0])), (62, torch.tensor([0.2, 0.3]))):
        before = p.detach().clone()
        p.grad = g
        opt.step(5e-5, count)
    # TF1's Adam, by hand
    m = 0.8 * (0.2 * torch.tensor([0.5, -1.0])) + 0.2 * torch.tensor([0.2, 0.3])
    v = 0.999 * (0.001 * torch.tensor([0.25, 1.0])) + 0.001 * torch.tensor([0.04, 0.09])
    lr_t = 5e-5 * math.sqrt(1 - 0.999 ** 62) / (1 - 0.8 ** 62)
    assert torch.allclose(p.detach(), before - lr_t * m / (v.sqrt() + 1e-8), rtol=0, atol=1e-9)
    steps = []
    monkeypatch.setattr(R.SharedAdam, "step", lambda self, lr, count: steps.append((lr, count)))
    cfg, trainer = teacher_setup(toy, tmp_path, "--steps", "8", "--beta1", "0.8", "--lr", "2e-3")
    assert trainer.teacher.optimizer.betas == (0.8,
                                               0.999) == trainer.optimizer.param_groups[0]["betas"]
    # no penalty step: every bin is large enough
    trainer.teacher.pools = [trainer.teacher.all] * cfg.bins
    trainer.fit()
    assert len(steps) == 3  # after windows 2-4
    for (lr, count), k in zip(steps, (4, 6, 8)):
        assert lr == R.learning_rate(cfg, k - 1, (k - 1) / cfg.steps) and count == k + (k // 2 - 1)


def test_teacher_starts_from_random_weights_under_init(toy, tmp_path):
    R.seed_everything(0)
    _, fresh = teacher_setup(toy, tmp_path / "a")
    state = fresh.state()
    state["teacher"]["net"] = {k: torch.full_like(v, 0.5) for k,
                               v in state["teacher"]["net"].items()}
    torch.save(state, tmp_path / "init.pt")
    R.seed_everything(0)
    _, from_init = teacher_setup(toy, tmp_path / "b", "--init", str(tmp_path / "init.pt"))
    for a, b in zip(from_init.teacher.net.state_dict().values(),
                    fresh.teacher.net.state_dict().values()):
        assert torch.equal(a, b)  # the teacher is built afresh; only the student comes from --init


def rigged_teacher(teacher, interval, updates, good, lr):
    """A student whose loss rises on bin `good` each time it trains on it, and falls a little on any
    other bin, without noise."""
    hard, level, probs = crops(0, 32), 1.0, []
    for u in range(updates):
        level += 0.01 if teacher.picked == good else -0.001
        teacher.window, teacher.hard_images = [level + 0.1 * (teacher.picked == good)], hard
        teacher.decide((u + 1) * interval, lr)
        probs.append(teacher.probs)
    return np.array(probs)


@pytest.mark.parametrize("seed", [0, 2])
def test_a_teacher_learns_the_bin_that_raises_the_students_loss(toy, tmp_path, seed):
    """The paper's update (1% soft-label steps, the student's Adam) at the grid's peak learning
    rate,
    10 bins: within the grid's 150 updates the rewarded bin must hold most of the probability (it
    did for each of seeds 0-5, after 25-150 updates)."""
    R.seed_everything(seed)
    cfg, trainer = teacher_setup(toy, tmp_path, "--bins", "10", "--teacher-interval", "20")
    teacher = trainer.teacher
    teacher.pools = [teacher.all] * 10
    probs = rigged_teacher(teacher, cfg.teacher_interval, 150, good=2, lr=3e-4)
    assert probs[0, 2] < 0.2 and probs[-1, 2] > 0.5 and probs[-1, 2] > 3 * np.delete(probs[-1],
                                                                                     2).max()


def test_stratified_control_draws_large_enough_bins_and_never_learns(toy, tmp_path):
    cfg, trainer = teacher_setup(toy, tmp_path, "--teacher-stratified", "--teacher-min-bin", "3")
    teacher = trainer.teacher
    pool = teacher.pools[0][:1]
    teacher.pools = [pool.repeat(2, 0), pool.repeat(10, 0), pool.repeat(8, 0)]  # bin 0 too small
    before = [q.detach().clone() for q in teacher.net.parameters()]
    picks = []
    for k in range(60):
        teacher.window, teacher.hard_images = [1.0 + k % 3], crops(k)
        teacher.decide(2 * (k + 1), cfg.lr)
        picks.append(teacher.picked)
        assert teacher.current_bin()[0] is teacher.pools[teacher.picked]
    assert set(picks) == {1, 2} and teacher.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.net.parameters()))
    with pytest.raises(R.ReproError, match="not both"):
        R.check_config(R.parse_args(toy_args(toy, tmp_path, "--mode", "student-teacher",
                                             "--teacher-stratified", "--teacher-uniform"))[0])


# ---- Trainer: the student's steps, the teacher beside them ---------------------------------------

DEVICES = ["cpu",
           pytest.param("cuda",
                        marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                 reason="no CUDA GPU"))]


@pytest.mark.parametrize("mode", ["real", "synthetic", "augmented"])
def test_each_mode_runs_end_to_end(toy, tmp_path, mode):
    out = tmp_path / mode
    assert R.main(toy_args(toy, out, "--mode", mode, "--steps", "3")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and 0.0 <= metrics["AP"] <= 1.0
    assert ((out / "config.json").is_file() and (out / "curves.png").is_file() and
            (out / "predictions.png").is_file())
    # 3 steps + the final evaluation
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_uniform_baseline_and_augmented_teacher_run(toy, tmp_path):
    common = ("--mode", "student-teacher", "--steps", "4", "--teacher-interval", "2",
              "--teacher-min-bin", "0", "--bins", "3")
    assert R.main(toy_args(toy, tmp_path / "uniform", *common, "--teacher-uniform")) == 0
    assert R.main(toy_args(toy, tmp_path / "aug", *common, "--teacher-data", "augmented")) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["real", "synthetic", "augmented"])
def test_loss_falls_on_a_repeated_batch(toy, tmp_path, mode, device):
    cfg, _ = R.parse_args(toy_args(toy, tmp_path, "--mode", mode, "--lr", "3e-3", "--device",
                                   device))
    data = R.load_data(cfg)
    trainer = R.Trainer(cfg, data, torch.device(device), tmp_path)
    specs = trainer.maker.plan(4, np.random.default_rng(0))
    batch = trainer.maker.batch(specs, np.random.default_rng(0))
    losses = [trainer.train_step(batch, cfg.lr).loss for _ in range(25)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile on CPU needs C++")
def test_compiled_student_trains_the_weights_that_checkpoints_save(toy, tmp_path):
    trainers, losses = [], []
    for flags in ((), ("--compile",)):
        cfg, _ = R.parse_args(toy_args(toy, tmp_path, "--mode", "real", "--no-amp", *flags))
        R.seed_everything(0)
        trainers.append(R.Trainer(cfg, R.load_data(cfg), torch.device("cpu"), tmp_path))
        batch = trainers[-1].maker.batch(trainers[-1].maker.plan(4, np.random.default_rng(0)),
                                         np.random.default_rng(0))
        losses.append([trainers[-1].train_step(batch, 1e-3).loss for _ in range(3)])
    compiled = trainers[1]
    assert compiled.net is not compiled.model
    assert all(p is q for p, q in zip(compiled.net.parameters(), compiled.model.parameters()))
    # later steps see the update
    assert np.allclose(losses[0], losses[1], rtol=1e-3) and losses[1][2] < losses[1][0]


def test_cpu_mixed_precision_only_where_the_cpu_has_native_bf16():
    layer = torch.nn.Linear(4, 4)
    with R.autocast(torch.device("cpu"), R.Config()):
        out = layer(torch.randn(2, 4))
    assert out.dtype == (torch.bfloat16 if R.cpu_has_native_bf16() else torch.float32)
    # autocast: the weights (and Adam's state) stay float32
    assert layer.weight.dtype == torch.float32
    with R.autocast(torch.device("cpu"), R.Config(amp=False)):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    assert R.precision(torch.device("cpu"), R.Config(amp=False)) == "float32"


def test_device_key_names_the_machine_its_instruction_set_precision_threads_and_torch():
    assert (R.device_key("AMD EPYC 7B13", "AVX2", "float32", 2, "2.5.1")
            == "AMD EPYC 7B13 (AVX2), float32, 2 threads, torch 2.5.1")
    assert [R.instruction_set(*flags) for flags in ((True, True, "AVX512"), (False, True, "AVX512"),
                                                     (False, False, "AVX512"),
                                                    (False, False, "AVX2"))] == [
        "AMX", "AVX-512 BF16", "AVX-512", "AVX2"]
    key = R.this_device_key(torch.device("cpu"), R.Config(amp=False))
    assert key.startswith(R.cpu_model() + " (") and ", float32, " in key
    assert key.endswith(f", {torch.get_num_threads()} threads, torch {torch.__version__}")


def test_runs_pair_only_within_one_device_key_and_old_summaries_still_read(tmp_path):
    def run(condition, seed, ap, **device):
        return dict(name=f"scarce/{condition}-s{seed}", condition=condition, regime="scarce",
                    seed=seed, ap=ap, **device)
    epyc = dict(device="cpu", device_key=R.device_key("AMD EPYC", "AVX2", "float32", 2, "2.5"))
    xeon = dict(device="cpu",
                device_key=R.device_key("Intel Xeon", "AMX", "bf16 autocast", 2, "2.5"))
    runs = [run("teacher-3000", s, 0.2, **epyc) for s in range(3)] + [
        run("synthetic-3000", 0, 0.21, **epyc), run("synthetic-3000", 1, 0.22, **xeon),
        run("synthetic-3000", 2, 0.23, device="cpu")]  # seed 2: a summary written before keys
    pairs, refused = C.seed_pairs(runs, "teacher-3000", "uniform-3000", "scarce")
    assert [a["seed"] for a, _ in pairs] == [0] and refused == [1, 2]
    assert C.paired_aps(runs, "teacher-3000", "uniform-3000", "scarce") == ([0.2], [0.21])
    stage = C.Stage("x", "q", (C.Arm("teacher-3000", ()),), 3000, 3,
                    (("teacher-3000", "uniform-3000"),), delta=0.003)
    (verdict,) = C.pair_tests(stage, C.RULE_V3, runs)
    assert verdict["n"] == 1 and verdict["not_paired"] == [1,
                                                           2] and verdict["verdict"] == ("pending "
                                                                                         "(1 of 3 "
                                                                                         "seeds)")
    old = [run(c, s, 0.2, device=d) for s,
           d in ((0, "cpu"), (1, "NVIDIA H200")) for c in ("real", "synthetic")]
    # as before keys
    assert C.paired_aps(old, "real", "synthetic", "scarce") == ([0.2] * 2, [0.2] * 2)
    assert (C.summary_device_key(old[0]) != C.summary_device_key(old[2]) and
            C.device_keys_note(old) == [])
    assert "Intel Xeon (AMX)" in C.device_keys_note(runs)[1]
    summary = dict(name="scarce/real-s0", condition="real", regime="scarce", seed=0, steps=800,
                   minutes=1.0, ap=0.3, ap50=0.6, ap75=0.2, device="cpu")
    (tmp_path / "scarce-real-s0.json").write_text(json.dumps(summary))
    # written before keys: still reads
    assert C.read_summary(tmp_path / "scarce-real-s0.json") == summary
    (tmp_path / "scarce-real-s0.json").write_text(json.dumps(summary | dict(device_key=3)))
    with pytest.raises(R.ReproError, match="device_key"):
        C.read_summary(tmp_path / "scarce-real-s0.json")
    (tmp_path / "config.json").write_text(json.dumps(dict(device="cpu", device_name="cpu",
                                                          precision="float32",
                                                          threads=2, torch="2.1")))
    assert C.run_device(tmp_path) == dict(device="cpu",
                                          device_key="cpu (instruction set unknown), float32, 2 "
                                                     "threads, torch 2.1")
    (tmp_path / "config.json").write_text(json.dumps(dict(device="cpu", device_name="cpu",
                                                          device_key="k")))
    assert C.run_device(tmp_path) == dict(device="cpu", device_key="k")


def interrupt_at_step(monkeypatch, stop):
    """Makes the training loop die (like a killed job) when it reaches step `stop`."""
    real_step = R.Trainer.train_step

    def step(self, batch, lr):
        if self.step == stop:
            raise KeyboardInterrupt
        return real_step(self, batch, lr)
    monkeypatch.setattr(R.Trainer, "train_step", step)


def test_resume_gives_the_same_weights(toy, tmp_path, monkeypatch):
    # no wall-clock lr
    common = ("--mode", "augmented", "--steps", "6", "--ckpt-every", "3", "--minutes", "0")
    assert R.main(toy_args(toy, tmp_path / "straight", *common)) == 0
    with monkeypatch.context() as m:
        interrupt_at_step(m, 5)  # step 4 is logged after the step-3 checkpoint, then the run dies
        assert R.main(toy_args(toy, tmp_path / "stopped", *common)) == 130
    assert torch.load(tmp_path / "stopped/ckpt.pt", weights_only=True)["step"] == 3
    assert R.main(toy_args(toy, tmp_path / "stopped", *common, "--resume")) == 0
    a = torch.load(tmp_path / "straight/ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped/ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    def logged(run):
        return [json.loads(line)
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    # nothing twice
    assert [r["step"] for r in logged("stopped")] == [r["step"] for r in logged("straight")]
    # the logging window is in the checkpoint: the line after a resume averages the same steps
    assert [r.get("loss") for r in logged("stopped")] == [r.get("loss") for r in logged("straight")]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("device", DEVICES)
def test_student_teacher_runs_and_resumes_exactly(toy, tmp_path, monkeypatch, device):
    common = ("--mode", "student-teacher", "--steps", "8", "--minutes", "0", "--ckpt-every", "4",
              "--teacher-interval", "2", "--teacher-min-bin", "0", "--bins", "3", "--device",
              device)
    assert R.main(toy_args(toy, tmp_path / "straight", *common)) == 0
    with monkeypatch.context() as m:
        interrupt_at_step(m, 5)
        assert R.main(toy_args(toy, tmp_path / "stopped", *common)) == 130
    assert R.main(toy_args(toy, tmp_path / "stopped", *common, "--resume")) == 0
    a = torch.load(tmp_path / "straight/ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped/ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["teacher"]["net"]:
        assert torch.equal(a["teacher"]["net"][k], b["teacher"]["net"][k]), k
    assert a["teacher"]["records"] == b["teacher"]["records"] and len(a["teacher"]["records"]) == 4
    assert (tmp_path / "straight/teacher_bins.png").is_file()
    logged = [json.loads(line)
              for line in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert any(r.get("teacher") and "probs" in r["teacher"] for r in logged)


# Run by torchrun in test_torchrun_*: repro.main on each rank, recording what the test checks. The
# network is the small one without its BatchNorm: SyncBatchNorm is GPU-only, and with plain
# BatchNorm each rank normalises its own share, which no single process on the joined batch does.
TORCHRUN_PROBE = """
import json, os, sys
import torch
sys.path.insert(0, {root!r})
torch.nn.BatchNorm2d = lambda channels: torch.nn.Identity()
import repro as R

rank, log = int(os.environ["RANK"]), os.environ["PROBE_LOG"]
out = os.path.realpath(os.environ["PROBE_OUT"])
writes, shares = [], []


def audit(event, args):  # every write into the run folder, by this rank
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        writing = any(c in args[1] for c in "wax+") if args[1] else args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and os.path.realpath(args[0]).startswith(out):
            writes.append(str(args[0]))
    if event in ("os.rename", "os.mkdir", "os.remove") and os.path.realpath(str(args[0])).startswith(out):
        writes.append(str(args[0]))


real_share, real_fit, real_save = R.rank_share, R.Trainer.fit, R.save_atomic


def rank_share(maker, batch_size, seed, step, rank=0, world=1):
    specs, rng = real_share(maker, batch_size, seed, step, rank, world)
    shares.append([step, [list(s[:3]) for s in specs]])
    return specs, rng


def fit(self):
    real_fit(self)
    torch.save(self.model.state_dict(), f"{{log}}/weights-{{rank}}.pt")
    with open(f"{{log}}/rank-{{rank}}.json", "w") as f:
        json.dump(dict(writes=writes, shares=shares, world=self.world), f)


def save_atomic(obj, path):
    real_save(obj, path)
    if rank == 0 and obj["step"] == int(os.environ.get("PROBE_KILL_AT", -1)):
        os._exit(9)  # killed right after a checkpoint


R.rank_share, R.Trainer.fit, R.save_atomic = rank_share, fit, save_atomic
sys.addaudithook(audit)
sys.exit(R.main(sys.argv[1:]))
"""


def torchrun(tmp_path, name, args, kill_at=-1):
    log = tmp_path / f"log-{name}"
    log.mkdir()
    probe = tmp_path / "probe.py"
    probe.write_text(TORCHRUN_PROBE.format(root=str(ROOT)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PROBE_LOG=str(log),
               PROBE_OUT=args[args.index("--out") + 1], PROBE_KILL_AT=str(kill_at))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2",
                           str(probe), *args], env=env, capture_output=True, text=True, timeout=300)
    return done, log


def joined(a: R.Batch, b: R.Batch) -> R.Batch:
    """Two ranks' batches as one process's batch."""
    def padded(x, y):  # people padded with unlabelled rows to the larger count
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        n = max(x.shape[1], y.shape[1])
        return [torch.cat([t, t.new_zeros((len(t), n - t.shape[1]) + t.shape[2:])], 1) for t in (x,
                                                                                                 y)]
    return R.Batch(image=np.concatenate([a.image, b.image]), source=a.source + b.source,
                   keypoints=torch.cat(padded(a.keypoints, b.keypoints)).numpy(),
                   pasted=torch.cat(padded(a.pasted, b.pasted)).numpy(),
                   ignore=np.concatenate([a.ignore, b.ignore]),
                   people=torch.cat(padded(a.people, b.people)),
                   target=torch.cat([a.target, b.target]),
                   loss_mask=torch.cat([a.loss_mask, b.loss_mask]))


def test_torchrun_ranks_share_each_step_and_train_like_one_process(toy, tmp_path, monkeypatch):
    """torchrun with 2 CPU processes (gloo): both ranks end with the same weights, which are those
    of one process trained on the two ranks' batches joined; each rank trains a disjoint half of
    each step's planned batch; only rank 0 writes the run folder; a run killed after a checkpoint
    and resumed under torchrun ends with the weights of the uninterrupted one."""
    common = ("--mode", "augmented", "--steps", "4", "--ckpt-every", "2", "--workers", "0",
              "--threads", "1", "--minutes", "0", "--eval-height", "32", "--no-amp")
    straight = toy_args(toy, tmp_path / "straight", *common)
    done, log = torchrun(tmp_path, "straight", straight)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((log / f"rank-{r}.json").read_text()) for r in (0, 1)]
    weights = [torch.load(log / f"weights-{r}.pt") for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    saved = torch.load(tmp_path / "straight/ckpt.pt", weights_only=False)
    assert saved["step"] == 4 and all(torch.equal(saved["model"][k],
                                                  weights[0][k]) for k in weights[0])
    # only rank 0 writes (and the audit hook does see writes)
    assert ranks[1]["writes"] == [] and any("ckpt" in w for w in ranks[0]["writes"])

    monkeypatch.setattr(R.nn, "BatchNorm2d", lambda channels: R.nn.Identity())
    cfg, _ = R.parse_args(straight)
    R.seed_everything(cfg.seed)
    single = R.Trainer(cfg, R.load_data(cfg), torch.device("cpu"), tmp_path / "single")
    plans = {t: single.maker.plan(cfg.batch_size,
                                  R.step_rng(cfg.seed, t)) for t in range(cfg.steps)}
    for r, rank in enumerate(ranks):
        assert rank["world"] == 2 and [s for s, _ in rank["shares"]] == list(range(cfg.steps))
        assert all(specs == [list(s[:3]) for s in plans[t][r::2]] for t, specs in rank["shares"])
    shares = [R.StepBatches(single.maker, cfg.batch_size, cfg.seed, 0, cfg.steps, r, 2)
              for r in (0, 1)]
    start = {k: v.clone() for k, v in single.model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in range(cfg.steps):
            single.train_step(joined(shares[0][t], shares[1][t]),
                              R.learning_rate(cfg, t, t / cfg.steps))
    finally:
        torch.set_num_threads(threads)
    mine = single.model.state_dict()
    def furthest(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].dtype.is_floating_point)
    # float order only (gloo's sum of two halves against one batch of 4), which Adam's first steps
    # magnify where gradients are near 0: 0.15% of the distance trained here, against 196% for a
    # single process on its own batches (--batch-size 4 without torchrun)
    assert furthest(mine, weights[0]) < 0.01 * furthest(mine, start)

    stopped = toy_args(toy, tmp_path / "stopped", *common)
    done, _ = torchrun(tmp_path, "stopped", stopped, kill_at=2)
    assert done.returncode != 0
    assert torch.load(tmp_path / "stopped/ckpt.pt", weights_only=False)["step"] == 2
    done, _ = torchrun(tmp_path, "resumed", stopped + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = torch.load(tmp_path / "stopped/ckpt.pt", weights_only=False)
    assert resumed["step"] == 4 and all(torch.equal(resumed["model"][k],
                                                    saved["model"][k]) for k in saved["model"])


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_through_the_loader_workers(toy, tmp_path, device):
    args = toy_args(toy, tmp_path / "run", "--mode", "synthetic", "--steps", "3", "--workers", "1",
                    "--device", device)
    assert R.main(args) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 3


# ---- Inference: multi-scale maps -> peaks -> greedy PAF grouping (paper's thresholds) ------------

def test_flat_maps_give_a_bounded_number_of_peaks():
    peaks = R.find_peaks(torch.full((18, 96, 128), 0.5))  # every pixel ties with its neighbours
    assert all(len(p) == R.MAX_PEAKS_PER_PART for p in peaks)
    kept = R.strongest(np.array([[0, 0, 0.1], [1, 0, 0.9], [2, 0, 0.5]]), 2)
    assert kept[:, 0].tolist() == [1, 2]  # the two strongest, in their original order


def test_grouping_merges_fragments_joined_by_a_later_limb():
    """Without a neck, arms and head start as separate fragments; the shoulder-ear limbs join
    them."""
    kp = torch.zeros(1, 1, 18, 3)
    kp[0, 0, :17, :2] = torch.as_tensor(TEMPLATE * 50 + [30, 10])
    kp[0, 0, :17, 2] = 2
    grid = torch.cat([R.paf_targets(kp, 128, 4, 3.0, R.COCO.limbs),
                      R.heatmap_targets(kp, 128, 4, 2.5)], 1)
    people = R.decode_maps(R.upsample_maps(grid, 4, (128, 128))[0], 1.0, R.COCO)
    # nose, ear, shoulders, right arm
    joined = [p for p, _ in people if p[[0, 4, 5, 6, 8, 10], 2].min() > 0]
    assert len(joined) == 1
    assert np.abs(joined[0][[0, 6, 10], :2] - kp[0, 0, [0, 6, 10], :2].numpy()).max() < 0.5


PREDICT_ARGS = ("--eval-height", "64", "--eval-scales", "1.0", "--threads", "2")


def tiny_checkpoint(path, skeleton="coco"):
    """An untrained tiny student (seeded): its noisy maps give many people, so comparisons are not
    vacuous."""
    cfg, _ = R.parse_args(["--input-size", "64", "--width", "16", "--stages", "2", "--skeleton",
                           skeleton])
    torch.manual_seed(0)
    torch.save(dict(model=R.build_model(cfg).state_dict(), config=R.dataclasses.asdict(cfg),
                    step=0), path)
    return path


def test_batched_frames_give_each_frame_its_own_maps(tmp_path):
    """Video frames go through the network in batches; each frame's maps are its maps alone."""
    cfg, _ = R.parse_args(list(PREDICT_ARGS) + ["--eval-flip", "--no-amp"])
    model, cfg, _ = R.model_from_checkpoint(cfg, tiny_checkpoint(tmp_path / "tiny.pt"),
                                            torch.device("cpu"))
    frames = np.random.default_rng(0).integers(0, 255, (3, 48, 80, 3), dtype=np.uint8)
    together, base = R.batch_maps(model.eval(), frames, cfg, torch.device("cpu"))
    for frame, maps in zip(frames, together):
        alone, base_alone = R.network_maps(model, frame, cfg, torch.device("cpu"))
        assert base == base_alone and torch.allclose(maps, alone, atol=1e-5)


# ---- Evaluation: COCO keypoint AP on whole images ------------------------------------------------

def perfect_people(kset, cfg):
    """Per record, the people decoded from grid maps built from the ground truth, exactly as
    network output would be."""
    sk, found = kset.skeleton, []
    for rec in kset.records:
        base = cfg.eval_height / rec.height
        hb, wb = round(rec.height * base), round(rec.width * base)
        kp = torch.as_tensor(rec.keypoints).clone()
        kp[..., :2] = (kp[..., :2] + 0.5) * base - 0.5
        size = (hb + (-hb % cfg.stride), wb + (-wb % cfg.stride))
        grid = torch.cat([R.paf_targets(kp[None], size, cfg.stride, cfg.paf_width, sk.limbs),
                          R.heatmap_targets(kp[None], size, cfg.stride, cfg.sigma)], 1)
        found.append(R.decode_maps(R.upsample_maps(grid, cfg.stride, (hb, wb))[0], base, sk))
    return found


def perfect_results(kset, cfg):
    results = [r for rec, people in zip(kset.records, perfect_people(kset, cfg))
               for r in R.coco_results(rec.image_id, people)]
    return R.coco_eval(kset.json_path, results, [r.image_id for r in kset.records])


@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_perfect_maps_give_ap_1(toy, preset):
    cfg, _ = R.parse_args(["--preset", preset])
    kset = R.load_keypoint_set(toy["train"], toy["train"].parent / "images")
    stats = perfect_results(kset, cfg)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)


@pytest.mark.skipif(not (SHARED / "real/coco").is_dir(),
                    reason="../shared/data/real/coco is absent")
def test_perfect_maps_on_real_coco_fixture():
    """Real COCO people: 0.99, not 1.0, because one person's wrist is labelled while its elbow is
    not: an orphan joint no tree-structured grouping (OpenPose's) can attach."""
    kset = R.load_keypoint_set(SHARED / "real/coco/test_coco.json", SHARED / "real/coco")
    cfg, _ = R.parse_args(["--preset", "paper"])
    stats = perfect_results(kset, cfg)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP"] >= 0.985


def test_occlusion_index_on_hand_made_people():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 10, 10], [100, 100, 10, 10]], np.float64)
    index = R.occlusion_index(boxes)
    # two half-overlapping people, one alone
    assert index == pytest.approx([50 / 150, 50 / 150, 0.0])
    assert R.occlusion_index(boxes[:1]).tolist() == [0.0]
    assert [name for name, (lo, hi) in R.OCCLUSION_BINS.items() if lo <= index[0] < hi] == ["heavy"]


def test_coco_ap_from_evaluated_images_matches_cocoeval_and_bins_split_the_people(toy):
    kset = R.load_keypoint_set(toy["val"], toy["val"].parent / "images")
    cfg, _ = R.parse_args(["--preset", "paper"])
    results = [r for rec, people in zip(kset.records, perfect_people(kset, cfg))
               for r in R.coco_results(rec.image_id, people)]
    # some imperfect
    results = [r | dict(keypoints=(np.array(r["keypoints"]) + (i % 3) * 2.0).tolist())
               for i, r in enumerate(results)]
    from pycocotools.coco import COCO
    gt = COCO(str(kset.json_path))
    ids = [r.image_id for r in kset.records]
    ev = R.coco_evaluator(gt, results, ids)
    assert R.coco_ap(ev) == pytest.approx(ev.stats[0], abs=1e-9) and 0 < ev.stats[0] < 1
    assert R.coco_ap(ev, np.array([2, 0, 1])) != pytest.approx(ev.stats[0])  # a resample differs
    stats = R.coco_eval(kset.json_path, results, ids, detail=True)
    assert set(stats["ap_by_occlusion"]) == set(R.OCCLUSION_BINS) and stats["ap_sd"] > 0
    people = R.person_occlusion(gt.dataset)
    for name, (lo, hi) in R.OCCLUSION_BINS.items():
        kept = [a
                for a in R.occlusion_subset(gt, lo,
                                            hi).dataset["annotations"] if not a.get("iscrowd")]
        assert all(lo <= people[a["id"]] < hi for a in kept)


# ==============================================================================================
# Part II: the tooling around the method (file formats, runs, protocol, reports, command line)
# ==============================================================================================

# ---- MPII Human Pose: annotation lists, the RELEASE split, the multi-person AP -------------------

MPII_DIR = SHARED / "real" / "mpii"


MPII_GT, MPII_PRED = (MPII_DIR / "mpii_val_multi_groundtruth.mat",
                      MPII_DIR / "mpii_val_multi_predictions.mat")


needs_mpii = pytest.mark.skipif(not MPII_GT.is_file(),
                                reason=f"MPII fixture not found in {MPII_DIR}")


@pytest.fixture(scope="module")
def mpii_gt():
    return R.read_annolist(MPII_GT,
                           image_names=R.read_image_list(MPII_DIR / "mpii_val_multi_images.json"))


@pytest.fixture(scope="module")
def mpii_pred():
    return R.read_annolist(MPII_PRED)


def _with_scores(groups, value=1.0):
    return [R.Group(g.image, g.joints.copy(), g.head_boxes, g.scales, g.objpos,
                    np.where(g.joints[..., 2] > 0, value, 0).astype(np.float32)) for g in groups]


@needs_mpii
def test_mpii_fixture_ground_truth_loads(mpii_gt):
    assert len(mpii_gt) == 350 and sum(len(g.joints) for g in mpii_gt) == 902
    sizes = [len(g.joints) for g in mpii_gt]
    assert min(sizes) == 2 and max(sizes) == 8
    g = mpii_gt[0]
    assert g.image == "015457215.jpg" and g.joints.shape == (3, 16, 3) and g.scores is None
    assert np.isfinite(np.concatenate([g.head_boxes for g in mpii_gt])).all()
    # absent ankles
    assert (g.joints[0, [0, 5], 2] == 0).all() and (g.joints[0, [8, 9], 2] == 2).all()


@needs_mpii
def test_mpii_fixture_predictions_score_like_a_published_model(mpii_gt, mpii_pred, capsys):
    result = R.score_mpii_files(MPII_PRED, MPII_GT)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"mAP {result['mAP']:.1f}" and "Shoulder" in out[-3]
    assert 60 < result["mAP"] < 85  # bottom-up models published on this split
    assert len(result["joints"]) == 14 and set(result["table"]) == {r for r,
                                                                    _ in R.MPII_TABLE} | {"Total"}
    assert result["table"]["Head"] > result["table"]["Ankle"]
    assert result["mAP"] == pytest.approx(np.mean(list(result["joints"].values())))


@needs_mpii
def test_mpii_ground_truth_as_predictions_scores_100_and_degrades(mpii_gt):
    assert R.evaluate_mpii(mpii_gt, _with_scores(mpii_gt))["mAP"] == pytest.approx(100)
    dropped = [R._subset(g, np.arange(len(g.joints)) % 2 == 0) for g in _with_scores(mpii_gt)]
    assert 0 < R.evaluate_mpii(mpii_gt, dropped)["mAP"] < 100
    for shift, low, high in ((0.45, 100, 100), (0.55, 0, 5)):  # head sizes to the right: PCKh 0.5
        moved = _with_scores(mpii_gt)
        for g in moved:
            g.joints[..., 0] += shift * R.head_sizes(g.head_boxes)[:, None]
        # beyond the threshold a joint may still land on a neighbour's joint: not quite 0
        assert low - 1e-9 <= R.evaluate_mpii(mpii_gt, moved)["mAP"] <= high + 1e-9


@needs_mpii
def test_mpii_duplicate_of_a_person_is_a_false_positive(mpii_gt):
    gt = mpii_gt[:20]
    preds = _with_scores(gt, 0.5)
    for g in preds:  # an identical second copy of person 0 ranked first: the tie goes to the first
        g.joints = np.concatenate([g.joints, g.joints[:1]])
        g.scores = np.concatenate([g.scores, g.scores[:1] * 0 + 0.9])
    result = R.evaluate_mpii(gt, preds)
    assert result["mAP"] < 100
    assert result["joints"]["head_top"] < 100


@needs_mpii
def test_mpii_prediction_files_round_trip(mpii_pred, mpii_gt, tmp_path):
    before = R.evaluate_mpii(mpii_gt, mpii_pred)["mAP"]
    for path, write in ((tmp_path / "pred.mat", R.write_pred_mat),
                        (tmp_path / "pred.json", R.write_pred_json)):
        write(path, mpii_pred)
        back = R.read_annolist(path)
        assert R.evaluate_mpii(mpii_gt, back)["mAP"] == pytest.approx(before, abs=1e-9)
        np.testing.assert_allclose(back[5].joints, mpii_pred[5].joints)
        np.testing.assert_allclose(back[5].scores, mpii_pred[5].scores)
        assert not list(tmp_path.glob("*.tmp"))
    raw = scipy.io.loadmat(tmp_path / "pred.mat", struct_as_record=False, squeeze_me=True)["pred"]
    point = np.atleast_1d(np.atleast_1d(raw[0].annorect)[0].annopoints.point)[0]
    assert set(point._fieldnames) == {"x", "y", "id", "score"}  # the toolkit's pred layout


def test_mpii_average_precision_hand_made_case():
    # ranked TP, FP, TP, FP with 3 positives: precision 1, 1/2, 2/3, 1/2 at recall 1/3, 1/3, 2/3,
    # 2/3; the envelope gives 1 x 1/3 + 2/3 x 1/3 = 5/9 (the third positive is never found)
    scores, labels = np.array([0.6, 0.9, 0.7, 0.8]), np.array([False, True, True, False])
    assert R.average_precision(scores, labels, 3) == pytest.approx(5 / 9)
    # ties: file order
    assert R.average_precision(np.ones(2), np.array([False, True]), 1) == pytest.approx(0.5)
    assert R.average_precision(np.ones(2), np.array([True, False]), 1) == pytest.approx(1.0)
    assert np.isnan(R.average_precision(np.zeros(0), np.zeros(0, bool), 0))


def _person(xy_by_id: dict, box=(0, 0, 10, 10)) -> R.Group:
    g = R.empty_group("x.jpg", with_scores=True)
    joints = np.zeros((1, 16, 3), np.float32)
    for j, (x, y) in xy_by_id.items():
        joints[0, j] = x, y, 2
    return R.Group("x.jpg", joints, np.float32([box]), np.ones(1, np.float32),
                   np.zeros((1, 2), np.float32), (joints[..., 2] > 0).astype(np.float32), g.rects)


def _stack(people):
    return R.Group("x.jpg", *(np.concatenate([getattr(p, f) for p in people]) for f in
                              ("joints", "head_boxes", "scales", "objpos", "scores")))


def test_mpii_assignment_rules():
    # head size 0.6 * sqrt(200) = 8.49 px: the threshold is 4.24 px
    a = _person({9: (0, 0), 8: (0, 10), 12: (-5, 15)})
    b = _person({9: (100, 0), 8: (100, 10)}, box=(100, 0, 110, 10))
    pred = _stack([_person({9: (100, 3), 8: (100, 10), 6: (0, 0)}),  # b; pelvis is not scored
                   _person({9: (0, 1), 8: (0, 30), 0: (50, 50)}),  # a: 1 of 3, ankle not in a
                   _person({9: (0, 0)})])  # a again, also 1 of 3: the first keeps a
    labels, has, n_gt = R.assign_group(_stack([a, b]), pred)
    col = {j: c for c, j in enumerate(R.MPII_SCORED)}
    assert n_gt[col[9]] == 2 and n_gt[col[12]] == 1 and n_gt.sum() == 5
    assert labels[0, col[9]] and labels[0, col[8]]
    assert labels[1, col[9]] and not labels[1, col[8]] and not labels[1, col[0]] and has[1, col[0]]
    assert not labels[2].any() and has[2, col[9]]  # the duplicate: all false positives
    assert has.sum() == 6  # the pelvis counts nowhere


# -- the official RELEASE struct, made up in miniature

def _records(rows: list[dict]) -> np.ndarray:
    arr = np.empty(len(rows), dtype=[(k, object) for k in rows[0]])
    for i, r in enumerate(rows):
        arr[i] = tuple(r.values())
    return arr


def _rect(x0: float, ids=range(16)) -> dict:
    rows = [dict(x=float(x0 + j), y=float(j), id=float(j), is_visible=1.0) for j in ids]
    return dict(x1=x0, y1=0.0, x2=x0 + 10, y2=10.0, scale=1.0, objpos=dict(x=x0, y=5.0),
                # MPII: [] when none
                annopoints=dict(point=_records(rows)) if rows else np.zeros((0, 0)))


def _release(path: Path, names, rects, img_train, single) -> Path:
    cells = np.empty(len(single), dtype=object)
    cells[:] = [np.array(s, np.float64) for s in single]
    annolist = _records([dict(image=dict(name=n), annorect=_records(r) if r else np.zeros((0, 0)))
                         for n, r in zip(names, rects)])
    scipy.io.savemat(path,
                     {"RELEASE": dict(annolist=annolist, img_train=np.array(img_train, np.float64),
                                            single_person=cells)})
    return path


def _tiny_release(tmp_path: Path, joint_ids=range(16)) -> Path:
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    rects = [[_rect(0), _rect(50)],  # train, both people well separated
             [_rect(0, joint_ids), _rect(50), _rect(60)],  # train, people 2 and 3 close together
             [_rect(0), _rect(10)],  # test image: never used
             [_rect(0, ids=[])],  # train, nobody annotated
             [_rect(5, ids=[9])]]  # train, one person with one point (squeezed to a bare struct)
    return _release(tmp_path / "release.mat", names, rects, [1, 1, 0, 1, 1],
                    [[1, 2], [1], [], [], [1]])


def test_mpii_release_split_follows_img_train(tmp_path):
    mat = _tiny_release(tmp_path)
    train, val = R.load_release(mat, val_images=["b.jpg"])
    assert [g.image for g in train] == ["a.jpg", "e.jpg"]  # held-out b gives nothing to train
    assert [len(g.joints) for g in train] == [2, 1] and train[1].joints[0, 9, 2] == 2
    assert [g.image for g in val] == ["b.jpg"] and list(val[0].rects) == [1, 2]
    np.testing.assert_allclose(val[0].head_boxes[0], [50, 0, 60, 10])
    train, val = R.load_release(mat, val_images=[])
    assert [g.image for g in train] == ["a.jpg", "b.jpg", "e.jpg"] and val == []
    train, val = R.load_release(mat)  # default: multi-person training images with crc32 % 10 == 0
    expect = ["b.jpg"] if zlib.crc32(b"b.jpg") % R.MPII_VAL_MODULUS == 0 else []
    assert [g.image for g in val] == expect
    scipy.io.savemat(tmp_path / "groups.mat", {"groups": np.array(
        [[], [np.array([1.0]), np.array([2.0, 3.0])], [], [], []], dtype=object)})
    _, val = R.load_release(mat, val_images=["b.jpg"], groups_mat=tmp_path / "groups.mat")
    # the group holding a single person is dropped
    assert len(val) == 1 and list(val[0].rects) == [1, 2]
    all_images = R.read_annolist(mat)  # RELEASE.annolist read as plain groups
    assert (len(all_images) == 5 and all_images[3].joints.shape == (1, 16, 3) and
            all_images[3].joints[..., 2].sum() == 0)


def test_mpii_bad_input_is_one_line(tmp_path):
    def one_line_error(fn, *args, match, **kw):
        with pytest.raises(R.ReproError, match=match) as e:
            fn(*args, **kw)
        assert "\n" not in str(e.value)

    scipy.io.savemat(tmp_path / "other.mat", {"foo": np.ones(3)})
    one_line_error(R.load_release, tmp_path / "other.mat", match="no RELEASE")
    one_line_error(R.read_annolist, tmp_path / "other.mat", match="no MPII annotation list")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all")
    one_line_error(R.read_annolist, tmp_path / "junk.mat", match="not a readable")
    one_line_error(R.load_release, _tiny_release(tmp_path, joint_ids=[0, 17]), match="joint id 17")
    mat = _tiny_release(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (images / name).write_bytes(b"")
    one_line_error(R.load_release, mat, images, val_images=[], match="image not found: .*e.jpg")
    one_line_error(R.load_release, mat, val_images=["c.jpg"], match="not MPII training images")
    one_line_error(R.evaluate_mpii, [R.empty_group()], [], match="pairs them by position")


def _gt_annolist(path: Path) -> Path:
    """One group of two people with head boxes, in the toolkit's ground-truth layout."""
    people = [{j: (10.0 + 3 * j + 50 * k, 20.0 + 2 * j) for j in range(16)} for k in range(2)]
    rects = [dict(x1=5.0 + 50 * k, y1=0.0, x2=25.0 + 50 * k, y2=20.0, scale=1.0,
                  objpos=dict(x=20.0, y=30.0),
                  annopoints=dict(point=_records([dict(x=x, y=y, id=float(j), is_visible=1.0)
                                                  for j, (x, y) in person.items()])))
             for k, person in enumerate(people)]
    scipy.io.savemat(path,
                     {"annolist": _records([dict(image=dict(name="a.jpg"),
                                                 annorect=_records(rects))])},
                     do_compression=True)
    return path


def test_mpii_scoring_refuses_what_would_score_silently_wrong(tmp_path, capsys):
    gt_path = _gt_annolist(tmp_path / "gt.mat")
    gt = R.read_annolist(gt_path)
    pred = [R.Group(g.image, g.joints.copy(), np.full_like(g.head_boxes, np.nan), g.scales,
                    g.objpos, np.ones(g.joints.shape[:2], np.float32), g.rects) for g in gt]
    R.write_pred_json(tmp_path / "pred.json", pred)
    assert R.main(["--score-mpii", str(tmp_path / "pred.json"), str(gt_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "mAP 100.0"
    assert "look swapped" in run_main_error(capsys,
                                            ["--score-mpii", str(gt_path),
                                             str(tmp_path / "pred.json")])
    shutil.copy(gt_path, tmp_path / "copy.mat")
    for twice in (gt_path, tmp_path / "copy.mat"):
        assert "are identical" in run_main_error(capsys, ["--score-mpii", str(twice), str(gt_path)])
    nan_xy, nan_score = [copy.deepcopy(pred) for _ in range(2)]
    nan_xy[0].joints[0, :5, 0] = np.nan
    nan_score[0].scores[1, 2] = np.nan
    for groups, words in ((nan_xy, "5 of 32 predicted joints have NaN or infinite coordinates "
                                   "and 0 a NaN score"),
                          (nan_score, "0 of 32 predicted joints have NaN or infinite coordinates "
                                      "and 1 a NaN")):
        R.write_pred_json(tmp_path / "nan.json", groups)
        assert words in run_main_error(capsys,
                                       ["--score-mpii", str(tmp_path / "nan.json"), str(gt_path)])
    # junk bytes inside a compressed variable: zlib's error, named like any other unreadable .mat
    raw = bytearray(gt_path.read_bytes())
    raw[200:204] = b"\xde\xad\xbe\xef"
    (tmp_path / "junk.mat").write_bytes(bytes(raw))
    line = run_main_error(capsys,
                          ["--score-mpii", str(tmp_path / "pred.json"), str(tmp_path / "junk.mat")])
    assert "is not a readable Matlab .mat file" in line


@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_mpii_perfect_maps_give_map_100(mpii_toy, preset):
    cfg, _ = R.parse_args(["--preset", preset, "--skeleton", "mpii"])
    kset = R.load_keypoint_set(mpii_toy["train"], mpii_toy["train"].parent / "images", R.MPII)
    assert kset.records[0].keypoints.shape[1:] == (15, 3)
    truth = R.groups_of_records(kset)
    predictions = [R.predicted_group(g, people) for g,
                   people in zip(truth, perfect_people(kset, cfg))]
    assert R.evaluate_mpii(truth, predictions)["mAP"] == pytest.approx(100)
    for p in predictions:  # every head top 50 px too high: that joint's AP drops to 0
        p.joints[:, 9, 1] -= 50
    result = R.evaluate_mpii(truth, predictions)
    assert (result["joints"]["head_top"] == 0 and
            result["joints"]["upper_neck"] == pytest.approx(100))


def test_mpii_demo_path_runs_end_to_end(mpii_toy, tmp_path):
    out = tmp_path / "run"
    argv = toy_args(mpii_toy, out, "--mode", "augmented", "--skeleton", "mpii", "--steps", "3")
    assert R.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["mAP"] <= 100 and {"Head", "Ankle"} <= set(metrics)
    back = R.read_annolist(out / "val_predictions.mat")  # the toolkit's pred struct
    assert len(back) == 3 and len(R.read_annolist(out / "val_predictions.json")) == 3


def test_the_mpii_rehearsal_set_trains_and_evaluates_as_the_real_release(mpii_toy, tmp_path):
    """write_mpii_rehearsal writes a set in MPII's own layout, which --preset paper --mpii-root
    reads as it reads the real release (train people, held-out multi-person groups, test images
    skipped), trains on, evaluates and predicts in the toolkit's format; here at 64 px and 2
    steps."""
    source = relabel_mpii(write_toy_set(tmp_path / "src", 40, people=(2, 4), seed=7))
    root = R.write_mpii_rehearsal(tmp_path / "mpii",
                                  R.load_keypoint_set(source, tmp_path / "src/images", R.MPII))
    # boxes x, y, w, h: 40 px apart is within half a height
    near, far = [0, 0, 10, 100], [500, 0, 10, 100]
    assert list(R.single_people(np.array([near, [50, 0, 10, 100], far], np.float32))) == [3]
    assert sorted(p.name for p in root.iterdir()) == ["images", R.MPII_RELEASE]
    release = R._loadmat(root / R.MPII_RELEASE)["RELEASE"]
    # every 10th image: a test image, people without joints
    assert list(release.img_train).count(0) == 4
    assert R._field(R._items(release.annolist[9].annorect)[0], "annopoints") is None
    train, val = R.load_release(root / R.MPII_RELEASE, root / "images")
    assert len(train) == 35 and [g.image for g in val] == ["0038.jpg"] and len(val[0].joints) >= 2
    # head top: no is_visible
    assert np.isfinite(val[0].head_boxes).all() and (val[0].joints[:, 9, 2] == 2).all()
    out = tmp_path / "run"
    argv = ["--preset", "paper", "--mpii-root", str(root), "--synthetic-json",
            str(mpii_toy["synthetic"]),
            "--bank-json", str(mpii_toy["bank"]), "--input-size", "64", "--stages", "2",
            "--batch-size", "2",
            "--steps", "2", "--eval-height", "64", "--eval-scales", "1.0", "--threads", "2",
            "--out", str(out)]
    assert R.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["steps"] == 2 and 0 <= metrics["mAP"] <= 100 and
            metrics["benchmark"].lower().startswith("mpii"))
    pred = R.read_annolist(out / "val_predictions.mat")  # the toolkit's pred struct
    assert [g.image for g in pred] == ["0038.jpg"]


@needs_mpii
def test_score_mpii_command_prints_the_table_and_map(capsys):
    assert R.main(["--score-mpii", str(MPII_PRED), str(MPII_GT)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("mAP ") and 60 < float(out[-1].split()[1]) < 85


@needs_mpii
def test_mpii_fixture_groups_become_records_and_evaluate(mpii_gt, tmp_path):
    listed = json.loads((MPII_DIR / "mpii_val_multi_images.json").read_text())["root"]
    (tmp_path / "images").mkdir()
    groups = mpii_gt[:4]
    for g, info in zip(groups, listed):  # the fixture has no images: blank ones of the listed sizes
        blank = np.zeros((int(info["im_height"]), int(info["im_width"]), 3), np.uint8)
        cv2.imwrite(str(tmp_path / "images" / g.image), blank)
    records = R.mpii_records(groups, tmp_path / "images")
    assert records[0].keypoints.shape == (len(groups[0].joints), 15,
                                          3) and (records[0].boxes[:, 3] > 0).all()
    kset = R.KeypointSet(None, records, R.MPII, groups=groups)
    cfg, _ = R.parse_args(["--skeleton", "mpii", "--input-size", "64", "--width", "16", "--stages",
                           "1", "--eval-scales", "1.0"])
    stats, predictions = R.evaluate(R.build_model(cfg), kset, cfg, torch.device("cpu"),
                                    progress=False)
    assert stats["images"] == 4 and 0 <= stats["mAP"] <= 100 and len(predictions) == 4


def test_an_mpii_annolist_as_the_val_set(mpii_toy, toy, tmp_path):
    kset = R.load_keypoint_set(mpii_toy["val"], mpii_toy["val"].parent / "images", R.MPII)
    entries = []
    for g in R.groups_of_records(kset):  # the toolkit's ground-truth layout, written with scipy
        rects = [dict(x1=float(b[0]), y1=float(b[1]), x2=float(b[2]), y2=float(b[3]),
                      scale=float(sc), objpos=dict(x=float(o[0]), y=float(o[1])),
                      annopoints=dict(point=_records([dict(x=float(x), y=float(y), id=float(j),
                                                           is_visible=1.0)
                                                      for j,
                                                      (x, y, v) in enumerate(person) if v > 0])))
                 for person, b, sc, o in zip(g.joints, g.head_boxes, g.scales, g.objpos)]
        entries.append(dict(image=dict(name=g.image), annorect=_records(rects)))
    scipy.io.savemat(tmp_path / "val.mat", {"annolist": _records(entries)})
    val = R.load_mpii_annolist(tmp_path / "val.mat", mpii_toy["val"].parent / "images")
    assert len(val.records) == len(kset.records) and np.isfinite(val.groups[0].head_boxes).all()
    out = tmp_path / "run"
    argv = toy_args(mpii_toy, out, "--mode", "real", "--skeleton", "mpii", "--steps", "1")
    argv[argv.index("--val-json") + 1] = str(tmp_path / "val.mat")
    assert (R.main(argv) == 0 and
            json.loads((out / "metrics.json").read_text())["images"] == len(kset.records))


# ---- Files: atomic writes, checkpoints, the shipped student --------------------------------------

@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                "unexpected pos 64 vs 0")])
def test_full_disk_while_checkpointing_leaves_no_partial_file(capsys, tmp_path, toy, monkeypatch,
                                                              error):
    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise error
    monkeypatch.setattr(R.torch, "save", full_disk)
    out = tmp_path / "run"
    line = run_main_error(capsys, toy_args(toy, out, "--mode", "real", "--steps", "2"))
    assert ("no space left on the device" in line and " MB needed, " in line and
            "MB free" in line), line
    assert "enforce fail" not in line
    assert not list(out.glob("*.tmp")) and not (out / "ckpt.pt").exists()
    assert not (out / R.LOCK_NAME).exists()  # the folder is released


def test_bad_init_leaves_no_run_folder(capsys, tmp_path, toy):
    out = tmp_path / "run"
    assert "checkpoint not found" in run_main_error(capsys,
                                                    toy_args(toy, out, "--mode", "real", "--init",
                                                                      str(tmp_path / "missing.pt")))
    assert not out.exists()


def test_crafted_checkpoints_are_refused_before_any_code_runs(capsys, tmp_path, toy):
    hit = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(dict(model={}, config={}, step=1, payload=_Touch(hit)), evil)
    run = tmp_path / "run"
    eval_argv = toy_data_args(toy) + ["--mode", "eval", "--ckpt", str(evil)]
    for argv in (eval_argv, toy_args(toy, run, "--mode", "real", "--init", str(evil)),
                 toy_args(toy, run, "--mode", "real", "--resume"),
                 ["--export-student", str(evil), "--out", str(run)]):
        if "--resume" in argv:
            run.mkdir()
            (run / "ckpt.pt").write_bytes(evil.read_bytes())
        line = run_main_error(capsys, argv)
        assert "refused checkpoint" in line and "it holds getattr" in line, line
        assert not hit.exists() and (not run.exists() or
                                     sorted(p.name for p in run.iterdir()) == ["ckpt.pt"])
    r = subprocess.run([sys.executable, str(ROOT / "repro.py"), *eval_argv], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "refused checkpoint" in r.stderr
    assert not hit.exists()
    torch.load(evil, weights_only=False)  # the unsafe loader runs it: the test would see it
    assert hit.exists()
    # a student-teacher checkpoint of an older version (numpy arrays in it): refused, saying what
    # to do
    torch.save(dict(model={}, teacher=dict(probs=np.full(3, 1 / 3))), tmp_path / "old.pt")
    line = run_main_error(capsys,
                          toy_data_args(toy) + ["--mode", "eval", "--ckpt",
                                                str(tmp_path / "old.pt")])
    assert "numpy._core.multiarray._reconstruct" in line and "trained again" in line


def test_a_strangers_checkpoint_is_checked_like_a_command_line(capsys, tmp_path, toy):
    """Every reader: predict, --init, eval, --export-onnx, --export-student, --resume."""
    good = torch.load(tiny_checkpoint(tmp_path / "tiny.pt"), weights_only=True)

    def config(**kw):
        return dict(good, config=dict(good["config"], **kw))
    crafted = {"model is an int": (dict(good, model=3), "holds no network weights"),
               "config is a string": (dict(good, config="coco"), "has a 'config' that is a str"),
               "unknown skeleton": (config(skeleton="bogus"), "--skeleton 'bogus'"),
               "stride 0": (config(stride=0), "multiple of --stride"),
               "negative width": (config(width=-4), "--width must be at least 1")}
    run, onnx_out, student = tmp_path / "run", tmp_path / "m.onnx", tmp_path / "student.pt"
    path, images = tmp_path / "crafted.pt", str(toy["val"].parent / "images")
    for name, (ckpt, words) in crafted.items():
        torch.save(ckpt, path)
        for argv in (["--mode", "predict", "--ckpt", str(path), "--input", images,
                      "--out", str(run), *PREDICT_ARGS],
                     toy_args(toy, run, "--mode", "real", "--init", str(path)),
                     toy_data_args(toy) + ["--mode", "eval", "--ckpt", str(path),
                                           "--out", str(run)],
                     ["--export-onnx", str(onnx_out), "--ckpt", str(path)],
                     ["--export-student", str(path), "--out", str(student)]):
            line = run_main_error(capsys, argv)
            assert words in line, (name, argv[:2], line)
            assert not run.exists() and not onnx_out.exists() and not student.exists()
        run.mkdir()
        shutil.copy(path, run / "ckpt.pt")
        assert words in run_main_error(capsys, toy_args(toy, run, "--mode", "real", "--resume"))
        shutil.rmtree(run)
    (tmp_path / "notes.txt").write_text("model weights, as text")
    notes = ["--export-student", str(tmp_path / "notes.txt"), "--out", str(student)]
    assert "is not a checkpoint (a file written by torch.save)" in run_main_error(capsys, notes)
    with open(path, "wb") as f:  # a raw pickle: torch's loader warns of its protocol first
        R.pickle.dump(dict(model={}, payload=R.Path("x")), f, protocol=4)
    r = subprocess.run([sys.executable, str(ROOT / "repro.py"), "--export-student", str(path),
                        "--out", str(student)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot read checkpoint" in r.stderr


def test_checkpoint_of_another_architecture(capsys, tmp_path, toy):
    assert R.main(toy_args(toy, tmp_path / "run", "--mode", "real", "--steps", "1")) == 0
    argv = toy_args(toy, tmp_path / "other", "--mode", "real", "--steps", "1", "--init",
                    str(tmp_path / "run/ckpt.pt"))
    argv[argv.index("--width") + 1] = "24"
    assert "another architecture" in run_main_error(capsys, argv)


def test_init_auto_takes_the_shipped_student_only_where_it_fits(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "SHIPPED_STUDENT", tmp_path / "student.pt")
    cfg, _ = R.parse_args(["--mode", "augmented"])
    assert cfg.init is None and cfg.lr == 1e-3  # nothing shipped: from scratch
    assert R.main(toy_args(toy, tmp_path / "run", "--mode", "real", "--steps", "1")) == 0
    R.export_student(str(tmp_path / "run/ckpt.pt"), tmp_path / "student.pt")
    half = torch.load(tmp_path / "student.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in half["model"].values() if v.is_floating_point())
    argv = ["--input-size", "64", "--width", "16", "--stages", "2"]  # the toy student's network
    cfg, _ = R.parse_args(["--mode", "augmented"] + argv)
    assert cfg.init == str(tmp_path / "student.pt") and (cfg.lr, cfg.lr_schedule) == (5e-5,
                                                                                      "constant")
    assert all(R.learning_rate(cfg, step, step / cfg.steps) == 5e-5 for step in (0, 30, cfg.steps))
    cosine = R.parse_args(["--mode", "augmented", "--lr-schedule", "cosine"] + argv)[0]
    # name one of FINETUNE's settings: set them all
    assert (cosine.lr, cosine.lr_schedule) == (1e-3, "cosine")
    student = R.load_checkpoint(tmp_path / "run/ckpt.pt")["model"]
    # BatchNorm's running statistics stay those of --init only when kept
    for stats in ("keep", "update"):
        out = tmp_path / f"bn-{stats}"
        assert R.main(toy_args(toy, out, "--mode", "real", "--steps", "2", "--init",
                               str(tmp_path / "run/ckpt.pt"),
                               "--bn-stats", stats, "--eval-steps", "1")) == 0
        after = R.load_checkpoint(out / "ckpt.pt")["model"]
        running = [k for k in after if k.endswith(("running_mean", "running_var"))]
        assert running and all(torch.equal(after[k],
                                           student[k]) for k in running) == (stats == "keep")
    assert R.parse_args(["--mode", "augmented", "--lr", "1e-3"] + argv)[0].lr == 1e-3
    assert R.parse_args(["--mode", "augmented", "--init", "none"] + argv)[0].init is None
    assert R.parse_args(["--mode", "augmented"])[0].init is None  # another network: from scratch
    # real data gets no shipped student
    assert R.parse_args(toy_data_args(toy) + argv)[0].init is None


def test_export_student_writes_out_and_never_replaces_a_file_unasked(capsys, tmp_path, toy,
                                                                     monkeypatch):
    shipped = tmp_path / "results" / "student-demo.pt"
    shipped.parent.mkdir()
    shipped.write_bytes(b"the committed student")
    monkeypatch.setattr(R, "SHIPPED_STUDENT", shipped)
    assert R.main(toy_args(toy, tmp_path / "tiny", "--mode", "real", "--steps", "1")) == 0
    ckpt = str(tmp_path / "tiny" / "ckpt.pt")
    assert R.main(["--export-student", ckpt, "--out", str(tmp_path / "exported.pt")]) == 0
    assert (R.load_checkpoint(tmp_path / "exported.pt")["step"] == 1 and
            shipped.read_bytes() == b"the committed student")
    assert "is not replaced unless named" in run_main_error(capsys, ["--export-student", ckpt])
    assert shipped.read_bytes() == b"the committed student"
    assert R.main(["--export-student", ckpt, "--out", str(shipped)]) == 0  # named: replaced
    assert R.load_checkpoint(shipped)["step"] == 1
    torch.save(dict(config={}, step=3), tmp_path / "nomodel.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for bad, words in (("nomodel.pt", "holds no network weights"),
                       ("tensor.pt", "holds a Tensor, not a repro.py")):
        line = run_main_error(capsys,
                              ["--export-student", str(tmp_path / bad), "--out",
                               str(tmp_path / "e2.pt")])
        assert words in line, line
    assert not (tmp_path / "e2.pt").exists()


def test_a_demo_fine_tune_of_the_shipped_student_points_to_the_values_to_expect(
        capsys, tmp_path, toy, monkeypatch):
    assert R.main(toy_args(toy, tmp_path / "first", "--mode", "real", "--steps", "1")) == 0
    shipped = tmp_path / R.SHIPPED_STUDENT.name
    shutil.copy(tmp_path / "first" / "ckpt.pt", shipped)
    load = R.load_data
    monkeypatch.setattr(R, "load_data", lambda cfg: R.dataclasses.replace(load(cfg), name="demo"))
    for init, expected in ((shipped, True), (tmp_path / "first" / "ckpt.pt", False)):
        capsys.readouterr()
        out = tmp_path / f"from-{init.stem}"
        argv = toy_args(toy, out, "--mode", "real", "--steps", "1", "--init", str(init))
        assert R.main(argv) == 0
        text = capsys.readouterr().out
        assert "from --init to the end of training" in text
        assert ("'The first run: what you should see'" in text) == expected


# ---- Run folders: a run's start, lock, signals and finish ----------------------------------------

def test_a_second_run_into_a_held_folder_is_refused(capsys, tmp_path, toy):
    out = tmp_path / "run"
    out.mkdir()
    with subprocess.Popen(["sleep", "60"]) as other:  # a live process holds the folder
        (out / R.LOCK_NAME).write_text(str(other.pid))
        assert "in use by another run" in run_main_error(capsys,
                                                         toy_args(toy, out, "--mode", "real",
                                                                  "--steps", "1"))
        other.kill()
    assert not (out / "metrics.jsonl").exists()
    # its process is gone: the lock is stale, the next run takes the folder over and releases it
    assert R.main(toy_args(toy, out, "--mode", "real", "--steps", "1")) == 0
    assert not (out / R.LOCK_NAME).exists()


def test_a_lock_whose_pid_now_names_another_program_is_stale(capsys, tmp_path, toy):
    out = tmp_path / "run"
    out.mkdir()
    # the lock's pid, reused by a program started later
    with subprocess.Popen(["sleep", "60"]) as other:
        (out / R.LOCK_NAME).write_text(json.dumps(dict(pid=other.pid, started="1",
                                                       host=os.uname().nodename)))
        assert R.lock_holder(out) is None
        assert R.main(toy_args(toy, out, "--mode", "real", "--steps", "1")) == 0
        (out / R.LOCK_NAME).write_text(json.dumps(dict(pid=other.pid,
                                                       started=R.process_started(other.pid),
                                                       host=os.uname().nodename)))
        assert R.lock_holder(out) == other.pid  # the same process: held
        (out / R.LOCK_NAME).write_text(json.dumps(dict(pid=1, host="another-host")))
        assert R.lock_holder(out) == 1  # another machine's run cannot be checked: held
        other.kill()


@pytest.mark.parametrize("pid", [10 ** 30, 0, -1, "junk", 2 ** 31])
def test_a_lock_with_an_impossible_pid_is_stale(capsys, tmp_path, toy, pid):
    out = tmp_path / "run"
    out.mkdir()
    (out / R.LOCK_NAME).write_text(json.dumps(dict(pid=pid, host=os.uname().nodename)))
    assert R.lock_holder(out) is None
    assert R.main(toy_args(toy, out, "--mode", "real", "--steps", "1")) == 0
    assert not (out / R.LOCK_NAME).exists()


def _children(pid: int) -> list[int]:
    return [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
            if p.read_text().rsplit(")", 1)[-1].split()[1:2] == [str(pid)]]


def test_loader_workers_take_sigterms_default_not_the_runs_handler(toy, tmp_path, monkeypatch):
    cfg, _ = R.parse_args(toy_args(toy, tmp_path, "--mode", "real", "--steps", "2", "--workers",
                                   "1"))
    trainer = R.Trainer(cfg, R.load_data(cfg), torch.device("cpu"), tmp_path)
    monkeypatch.setattr(R.StepBatches, "__getitem__",
                        lambda self, i: R.signal.getsignal(R.signal.SIGTERM) == R.signal.SIG_DFL)
    previous = R.signal.signal(R.signal.SIGTERM, R.on_sigterm)  # as main() installs it
    try:
        assert [batch for _, batch in trainer.batches()] == [True, True]  # made in the worker
    finally:
        R.signal.signal(R.signal.SIGTERM, previous)


def _running(pid: int) -> bool:
    """A process that exists and is not a zombie (its new parent may be slow to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_sigterm_during_training_ends_like_ctrl_c_and_no_kill_leaves_a_worker(tmp_path, toy, sig):
    out = tmp_path / "run"
    argv = toy_args(toy, out, "--mode", "real", "--steps", "100000", "--ckpt-every", "2",
                    "--workers", "1", "--minutes", "0")
    proc = subprocess.Popen([sys.executable, str(ROOT / "repro.py"), *argv],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    _wait_for(lambda: (out / "ckpt.pt").is_file() or proc.poll() is not None)
    workers = _children(proc.pid)
    assert workers  # the loader's worker
    proc.send_signal(getattr(R.signal, sig))
    err = proc.communicate(timeout=60)[1].strip().splitlines()
    if sig == "SIGTERM":
        assert proc.returncode == 143, err
        kept = "the last checkpoint is kept: rerun with --resume"
        assert err[-1:] == [f"repro.py: interrupted; {kept}"], err
        assert not (out / R.LOCK_NAME).exists() and R.load_checkpoint(out / "ckpt.pt")["step"] >= 2
    _wait_for(lambda: not any(_running(w) for w in workers), 10)  # no worker outlives its run


def test_a_users_default_run_eval_and_compare_write_into_runs_never_into_results(toy, tmp_path,
                                                                                 monkeypatch):
    """Without --out a training run writes runs/<mode>-<data>-s<seed>/, an eval of a checkpoint
    under results/ writes runs/eval-<data>/ (not beside it) and --compare runs/compare.png: a
    user's outputs never mix with the committed results/."""
    monkeypatch.chdir(tmp_path)
    argv = toy_args(toy, "unused", "--mode", "real", "--steps", "2")
    del argv[argv.index("--out"):argv.index("--out") + 2]
    assert R.main(argv) == 0
    run = Path("runs/real-annotations-s0")
    assert ((run / "ckpt.pt").is_file() and (run / "metrics.json").is_file() and
            not Path("results").exists())
    # a checkpoint in the committed folder, as the shipped students are
    tracked = Path("results/student.pt")
    tracked.parent.mkdir()
    shutil.copy(run / "ckpt.pt", tracked)
    argv = toy_args(toy, "unused", "--mode", "eval", "--ckpt", str(tracked))
    del argv[argv.index("--out"):argv.index("--out") + 2]
    assert R.main(argv) == 0
    assert R.main(["--compare", str(run)]) == 0
    assert [p.name for p in Path("results").iterdir()] == ["student.pt"]
    assert "AP" in json.loads(Path("runs/eval-annotations/eval-annotations.json").read_text())
    assert Path("runs/compare.png").is_file() and Path("runs/compare.md").is_file()


def test_eval_mode_and_init(toy, tmp_path):
    assert R.main(toy_args(toy, tmp_path / "run", "--mode", "real", "--steps", "2")) == 0
    ckpt = tmp_path / "run/ckpt.pt"
    assert R.main(toy_args(toy, tmp_path / "eval", "--mode", "eval", "--ckpt", str(ckpt))) == 0
    assert "AP" in json.loads((tmp_path / "eval" / "eval-annotations.json").read_text())
    cfg, _ = R.parse_args(toy_args(toy, tmp_path / "x", "--mode", "augmented", "--init", str(ckpt)))
    saved = torch.load(ckpt, weights_only=True)["model"]
    started = R.Trainer(cfg, R.load_data(cfg), torch.device("cpu"),
                        tmp_path / "x").model.state_dict()
    assert all(torch.equal(started[k], saved[k]) for k in saved)  # --init weights, not a fresh net
    assert R.main(toy_args(toy, tmp_path / "ft", "--mode", "augmented", "--steps", "1", "--init",
                           str(ckpt))) == 0
    assert R.main(["--compare", str(tmp_path / "run"), str(tmp_path / "ft"), "--out",
                   str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").is_file() and "| ft |" in (tmp_path / "cmp.md").read_text()


def test_compare_reads_past_a_cut_last_line_and_refuses_a_non_run(capsys, tmp_path, monkeypatch):
    run, out = tmp_path / "run", tmp_path / "cmp.png"
    argv = ["--compare", str(run), "--out", str(out)]
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(argv=["repro.py", "--mode", "real"])))
    records = [dict(step=s, minutes=s / 2, eval=dict(AP=s / 10)) for s in (1, 2)]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(lines + '{"step": 3, "minu')  # a killed run's last write
    assert R.main(argv) == 0
    printed = capsys.readouterr().out
    assert "its last line is cut off" in printed
    assert "| `python repro.py --mode real` | 1.0 | 2 | 0.2000" in printed
    out.unlink()
    out.with_suffix(".md").unlink()
    for text, words in ((lines.replace("\n", "\njunk\n", 1), "line 2 is not a metrics record"),
                        (lines + json.dumps(dict(step=3, eval={})) + "\n", "without its minutes")):
        (run / "metrics.jsonl").write_text(text)
        assert words in run_main_error(capsys, argv)
    (run / "metrics.jsonl").write_text(lines)
    (run / "config.json").unlink()
    assert "has no readable config.json" in run_main_error(capsys, argv)
    (run / "config.json").write_text("{}")
    read_only(monkeypatch, tmp_path)
    assert "is not writable" in run_main_error(capsys, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_steps_0_says_it_evaluates_the_start(toy, tmp_path, capsys):
    assert R.main(toy_args(toy, tmp_path / "run", "--mode", "real", "--steps", "0")) == 0
    assert "--steps 0: no training" in capsys.readouterr().out
    assert json.loads((tmp_path / "run/metrics.json").read_text())["steps"] == 0


def test_existing_run_is_not_overwritten(capsys, tmp_path, toy):
    assert R.main(toy_args(toy, tmp_path / "run", "--mode", "real", "--steps", "1")) == 0
    assert "--resume" in run_main_error(capsys,
                                        toy_args(toy, tmp_path / "run", "--mode", "real", "--steps",
                                                 "1"))


def test_resume_of_a_finished_run_is_refused_and_a_cut_final_evaluation_is_not_logged_twice(
        capsys, tmp_path, toy):
    out = tmp_path / "run"
    argv = toy_args(toy, out, "--mode", "real", "--steps", "2")
    assert R.main(argv) == 0
    logged = (out / "metrics.jsonl").read_text()
    assert "is finished (step 2 of --steps 2" in run_main_error(capsys, argv + ["--resume"])
    assert (out / "metrics.jsonl").read_text() == logged
    # cut off after the final evaluation's line, before metrics.json
    (out / "metrics.json").unlink()
    assert R.main(argv + ["--resume"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2,
                                          2] and [bool(r.get("final")) for r in lines] == [False,
                                                                                           False,
                                                                                           True]


def test_read_only_run_folder_gives_one_line(capsys, tmp_path, toy, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))
    monkeypatch.setattr(R.Path, "mkdir", refuse)
    out = tmp_path / "run"
    assert "Read-only file system" in run_main_error(capsys,
                                                     toy_args(toy, out, "--mode", "real", "--steps",
                                                              "1"))
    assert not out.exists()


def test_torchrun_batch_not_a_multiple_of_the_processes_is_one_line(toy, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert R.main(toy_args(toy, tmp_path / "run", "--batch-size", "5")) == 2
    assert "--batch-size 5 must be a multiple of the 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_mpii_val_mat_and_checkpoints_of_the_other_skeleton_are_named(capsys, tmp_path, toy,
                                                                      mpii_toy):
    gt_path = _gt_annolist(tmp_path / "val.mat")
    argv = toy_args(toy, tmp_path / "run", "--mode", "real", "--steps", "1")
    argv[argv.index("--val-json") + 1] = str(gt_path)
    assert ("is a Matlab .mat file, not COCO json: an MPII annotation list is read with --skeleton "
            "mpii") in \
        run_main_error(capsys, argv)
    assert R.main(toy_args(toy, tmp_path / "coco", "--mode", "real", "--steps", "1")) == 0
    assert R.main(toy_args(mpii_toy, tmp_path / "mpii", "--mode", "real", "--skeleton", "mpii",
                           "--steps", "1")) == 0
    for data, ckpt, words in ((toy, "mpii", "predicts the mpii skeleton but the val data is coco"),
                              (mpii_toy, "coco",
                               "predicts the coco skeleton but the val data is mpii")):
        extra = ["--skeleton", "mpii"] if data is mpii_toy else []
        line = run_main_error(capsys, toy_args(data, tmp_path / "eval", "--mode", "eval", *extra,
                                               "--ckpt", str(tmp_path / ckpt / "ckpt.pt")))
        assert words in line, line
    assert not (tmp_path / "eval").exists()


# ---- Benchmark: is the data pipeline ever the bottleneck? ----------------------------------------

def test_bench_runs_and_reports_every_figure(toy, tmp_path, capsys):
    run = tmp_path / "run"
    assert R.main(toy_args(toy, run, "--mode", "real", "--steps", "2")) == 0
    bench = [a
             for a in toy_args(toy, tmp_path / "unused") if a not in ("--out",
                                                                      str(tmp_path / "unused"))]
    # the bench logs nothing
    bench = bench[:bench.index("--log-every")] + bench[bench.index("--log-every") + 2:]
    assert R.main(bench + ["--bench", "--init", str(run / "ckpt.pt")]) == 0
    out = capsys.readouterr().out
    precision = R.precision(torch.device("cpu"), R.Config())
    for figure in ("pipeline_ratio", "train_img_s_end_to_end", "grouping_ms_per_image", precision):
        assert figure in out


def test_bench_at_the_paper_geometry_times_the_pipeline_for_every_worker_count(toy, capsys):
    """On a CPU the paper's network is not timed (minutes per step); the data pipeline is, with
    1 .. N loader workers for the N cores."""
    args = toy_data_args(toy) + ["--preset", "paper", "--bench", "--batch-size", "4",
                                 "--input-size", "96", "--device", "cpu"]
    assert R.main(args) == 0
    out = capsys.readouterr().out
    workers = [f"loader_samples_s_{w}_workers" for w in range(1, len(os.sched_getaffinity(0)) + 1)]
    for figure in ("crop_and_paste_ms_per_sample", "target_ms_per_sample", *workers):
        assert figure in out
    assert "preset paper, arch openpose, batch 4, input 96" in out and "network is not timed" in out
    assert "train_img_s" not in out and f"loader_samples_s_{len(workers) + 1}_workers" not in out


# ---- Predict: a trained student on your own images and videos; ONNX ------------------------------

def write_video(path, frames=6, size=(96, 64), fps=12.5):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for i in range(frames):
        writer.write(np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3),
                                                       dtype=np.uint8))
    writer.release()
    return path


def coco_named_copy(toy, folder):
    """The toy val images under COCO-style names (their image ids), so predict's ids are the
    json's."""
    folder.mkdir()
    for image in json.loads(toy["val"].read_text())["images"]:
        shutil.copy(toy["val"].parent / "images" / image["file_name"],
                    folder / f"{image['id']:012d}.jpg")
    return folder


def test_predict_folder_matches_evaluation_and_skips_a_broken_image(toy, tmp_path, capsys):
    from pycocotools.coco import COCO

    ckpt, images = tiny_checkpoint(tmp_path / "tiny.pt"), coco_named_copy(toy, tmp_path / "images")
    (images / "000000000099.jpg").write_bytes(b"not a jpeg")
    (images / "notes.txt").write_text("not an image either, and not one by its name: ignored")
    whole = (images / "000000000001.jpg").read_bytes()
    (images / "000000000096.jpg").write_bytes(whole[:len(whole) // 2])  # cv2 would decode half
    (images / "000000000097.jpg").symlink_to(tmp_path / "gone.jpg")
    (images / "000000000098.jpg").symlink_to(images / "000000000098.jpg")  # a loop
    out = tmp_path / "out"
    assert R.main(["--mode", "predict", "--ckpt", str(ckpt), "--input", str(images), "--out",
                   str(out), *PREDICT_ARGS]) == 0
    skipped = ", ".join(f"{i:012d}.jpg" for i in range(96, 100))
    assert f"skipped 4 of 7 images that do not decode: {skipped}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [f"{i:012d}.jpg" for i in (1, 2, 3)] + [
        "overview.png", "predictions.json"]
    assert cv2.imread(str(out / "overview.png")).shape == (R.OVERVIEW_BOX[1], 4 * R.OVERVIEW_BOX[0],
                                                           3)
    predicted = json.loads((out / "predictions.json").read_text())
    with R.contextlib.redirect_stdout(R.io.StringIO()):
        assert len(COCO(str(toy["val"])).loadRes(predicted).getAnnIds()) == len(predicted) > 0
    cfg, _ = R.parse_args(toy_data_args(toy) + list(PREDICT_ARGS))
    model, cfg, _ = R.model_from_checkpoint(cfg, ckpt, torch.device("cpu"))
    _, evaluated = R.evaluate(model, R.load_data(cfg).val, cfg, torch.device("cpu"), progress=False)
    assert [(r["image_id"], r["score"]) for r in predicted] == [(r["image_id"],
                                                                 r["score"]) for r in evaluated]
    mine = np.array([r["keypoints"] for r in predicted], np.float32).reshape(len(predicted), 17, 3)
    theirs = np.array([r["keypoints"] for r in evaluated], np.float32).reshape(len(evaluated), 17,
                                                                               3)
    # the same float32 values, only written shorter
    assert np.array_equal(mine[..., :2], theirs[..., :2])
    # peak scores
    assert np.array_equal(mine[..., 2] > 0, theirs[..., 2] == 1) and (mine[..., 2] <= 1).all()
    assert {r["file_name"] for r in predicted} <= {f"{i:012d}.jpg" for i in (1, 2, 3)}


def test_image_ids_are_coco_numbers_or_positions():
    assert R.image_ids([Path("000000000785.jpg"), Path("000000040083.png")]) == [785, 40083]
    assert R.image_ids([Path("785.jpg"), Path("holiday.jpg")]) == [1, 2]
    assert R.image_ids([Path("01.jpg"), Path("1.jpg")]) == [1, 2]  # the same number twice


def test_predict_video_keeps_frame_count_and_rate(tmp_path):
    video, out = write_video(tmp_path / "clip.avi"), tmp_path / "out"
    assert R.main(["--mode", "predict", "--ckpt", str(tiny_checkpoint(tmp_path / "tiny.pt")),
                   "--input", str(video), "--out", str(out), *PREDICT_ARGS]) == 0
    drawn = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = 0
    while drawn.read()[0]:
        frames += 1
    assert frames == 6 and drawn.get(cv2.CAP_PROP_FPS) == pytest.approx(12.5)
    predicted = json.loads((out / "predictions.json").read_text())
    assert (predicted and {r["frame"] for r in predicted} <= set(range(6)) and
            len({r["frame"] for r in predicted}) > 1)
    assert all(r["image_id"] == r["frame"] and r["file_name"] == "clip.avi" for r in predicted)
    # no temporary file left
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4", "predictions.json"]


def test_predict_with_the_shipped_student_on_one_image(toy, tmp_path, capsys):
    image, out = toy["val"].parent / "images" / "0000.jpg", tmp_path / "out"
    assert R.main(["--mode", "predict", "--input", str(image), "--out", str(out),
                   *PREDICT_ARGS]) == 0
    assert cv2.imread(str(out / "0000.jpg")).shape == cv2.imread(str(image)).shape
    predicted = json.loads((out / "predictions.json").read_text())
    # "0000"
    assert predicted and all(r["image_id"] == 0 and len(r["keypoints"]) == 51 for r in predicted)
    cfg, _ = R.parse_args(list(PREDICT_ARGS))
    model, cfg = R.predictor(cfg, torch.device("cpu"))  # no --ckpt: the shipped student
    people = R.decode_maps(*R.network_maps(model, cv2.imread(str(image)), cfg, torch.device("cpu")),
                           R.COCO)
    assert [round(score, 5) for _, score in people] == [r["score"] for r in predicted]


def test_predict_mpii_writes_16_joints_and_the_toolkits_pred(toy, tmp_path, monkeypatch):
    person = np.zeros((16, 3), np.float32)
    person[[0, 9, 12]] = [[10, 50, 0.7], [12, 8, 0.9], [11, 20, 0.8]]
    monkeypatch.setattr(R, "decode_maps", lambda maps, base, sk: [(person.copy(), 0.6)])
    images, out = coco_named_copy(toy, tmp_path / "images"), tmp_path / "out"
    assert R.main(["--mode", "predict", "--skeleton", "mpii", "--ckpt",
                   str(tiny_checkpoint(tmp_path / "m.pt", "mpii")),
                   "--input", str(images), "--out", str(out), *PREDICT_ARGS]) == 0
    predicted = json.loads((out / "predictions.json").read_text())
    # 48 values
    assert len(predicted) == 3 and all(np.allclose(r["keypoints"],
                                                   person.flatten()) for r in predicted)
    groups = R.read_annolist(out / "predictions.mat")
    assert [g.image for g in groups] == [f"{i:012d}.jpg" for i in (1, 2, 3)]
    assert np.allclose(groups[0].joints[0, [0, 9, 12], :2], person[[0, 9, 12], :2])
    assert np.allclose(groups[0].scores[0, [0, 9, 12]], person[[0, 9, 12], 2])


def test_onnx_export_matches_torch_and_predicts_the_same_people(toy, tmp_path, capsys):
    """The shipped student (the default): an untrained net's flat maps would make sub-pixel peaks
    hang on the 1e-6 differences."""
    pytest.importorskip("onnxruntime")
    ckpt, model_path = R.SHIPPED_STUDENT, tmp_path / "student.onnx"
    assert R.main(["--export-onnx", str(model_path)]) == 0
    printed = capsys.readouterr().out
    diffs = [float(d) for d in printed.rsplit(":", 1)[1].split(",")]
    assert (len(diffs) == 3 and max(diffs) <= R.ONNX_TOLERANCE and
            "dynamic batch and input size" in printed)
    images = toy["val"].parent / "images"
    runs = {}
    for name, flag in (("torch", ["--ckpt", str(ckpt), "--no-amp"]),
                       ("onnx", ["--onnx", str(model_path)])):
        assert R.main(["--mode", "predict", "--input", str(images), "--out", str(tmp_path / name),
                       *flag, *PREDICT_ARGS]) == 0
        runs[name] = json.loads((tmp_path / name / "predictions.json").read_text())
    assert len(runs["torch"]) == len(runs["onnx"]) > 0
    for a, b in zip(runs["torch"], runs["onnx"]):
        assert a["image_id"] == b["image_id"] and a["score"] == pytest.approx(b["score"], abs=1e-3)
        mine, theirs = np.reshape(a["keypoints"], (17, 3)), np.reshape(b["keypoints"], (17, 3))
        assert np.array_equal(mine[:, 2] > 0, theirs[:, 2] > 0) and np.allclose(mine, theirs,
                                                                                atol=0.02)


def test_predict_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, toy):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.mp4").write_text("not a video")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "bad.onnx").write_text("not a model")
    whole = (toy["val"].parent / "images" / "0000.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[:1000])
    (tmp_path / "photo.mp4").write_bytes(whole)
    (tmp_path / "clash").mkdir()
    cv2.imwrite(str(tmp_path / "clash" / "overview.png"), np.zeros((8, 8, 3), np.uint8))
    images = toy["val"].parent / "images"
    out = tmp_path / "out"
    cases = [([], "needs --input"),
             (["--input", str(tmp_path / "nope.jpg")], "does not exist"),
             (["--input", str(tmp_path / "notes.txt")], "is not an image"),
             (["--input", str(tmp_path / "empty")], "no images in this folder"),
             (["--input", str(tmp_path / "broken.jpg")], "cannot decode image"),
             (["--input", str(tmp_path / "broken.mp4")], "cannot read video"),
             (["--input", str(tmp_path / "cut.jpg")], "cannot decode image"),
             (["--input", str(tmp_path / "photo.mp4")], "is an image named as a video"),
             (["--input", str(images), "--threads", "-3"], "--threads must be 0 (torch's default)"),
             (["--input", str(images), "--steps", "3"], "--mode predict does not take --steps"),
             (["--input", str(images), "--ckpt", str(tmp_path / "none.pt"),
               "--onnx", str(tmp_path / "bad.onnx")], "give --onnx or --ckpt, not both"),
             (["--input", str(images), "--skeleton", "mpii"],
              "predicts the coco skeleton, not mpii"),
             (["--input", str(images), "--ckpt", str(tmp_path / "none.pt")],
              "checkpoint not found"),
             (["--input", str(images), "--onnx", str(tmp_path / "bad.onnx")],
              "cannot read ONNX model"),
             (["--input", str(tmp_path / "clash")], "an image named overview.png")]
    for extra, words in cases:
        assert words in run_main_error(capsys,
                                       ["--mode", "predict", "--out", str(out), *PREDICT_ARGS,
                                        *extra])
        assert not out.exists(), extra
    assert "input's own folder" in run_main_error(capsys,
                                                  ["--mode", "predict", "--input", str(images),
                                                           "--out", str(images)])
    assert sorted(p.name for p in images.iterdir()) == ["0000.jpg", "0001.jpg", "0002.jpg"]
    assert "is for --mode predict" in run_main_error(capsys,
                                                     ["--mode", "eval", "--onnx",
                                                      str(tmp_path / "bad.onnx")])
    missing_folder = str(tmp_path / "x" / "m.onnx")
    assert ".onnx file in an existing folder" in run_main_error(capsys,
                                                                ["--export-onnx", missing_folder])


def test_predicts_out_is_checked_first_and_never_mixes_two(capsys, tmp_path, toy, monkeypatch):
    images, ckpt = toy["val"].parent / "images", tiny_checkpoint(tmp_path / "tiny.pt")
    argv = ["--mode", "predict", "--ckpt", str(ckpt), *PREDICT_ARGS, "--input"]
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "ro").mkdir()
    with monkeypatch.context() as m:
        read_only(m, tmp_path / "ro")
        m.setattr(R, "predictor", lambda *args: pytest.fail("inference started"))
        for out, words in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "o", "is under"),
                           (tmp_path / "ro" / "o", "ro is not writable")):
            assert words in run_main_error(capsys, argv + [str(images), "--out", str(out)])
        assert (tmp_path / "file").read_text() == "not a folder"
        assert not list((tmp_path / "ro").iterdir())
    out = tmp_path / "out"
    assert R.main(argv + [str(images), "--out", str(out)]) == 0
    assert R.main(argv + [str(images / "0001.jpg"), "--out", str(out)]) == 0
    assert f"{out} held an earlier prediction: replaced whole" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["0001.jpg", "overview.png", "predictions.json"]
    (out / "notes.txt").write_text("mine")
    line = run_main_error(capsys, argv + [str(images), "--out", str(out)])
    assert "holds files predict did not write (notes.txt)" in line
    (out / "notes.txt").unlink()
    monkeypatch.setattr(R, "decode_maps", lambda *args: (_ for _ in ()).throw(R.Terminated()))
    for target in (out, tmp_path / "new"):  # SIGTERM: nothing of the cut prediction is left
        capsys.readouterr()
        assert R.main(argv + [str(images), "--out", str(target)]) == 143
        assert capsys.readouterr().err == "repro.py: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out", "ro", "tiny.pt"]
    assert sorted(p.name for p in out.iterdir()) == ["0001.jpg", "overview.png", "predictions.json"]
    monkeypatch.setattr(R, "load_data", lambda cfg: None)
    monkeypatch.setattr(R, "bench", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert R.main(["--bench"]) == 130 and capsys.readouterr().err == "repro.py: interrupted\n"


def test_an_onnx_model_of_another_network_is_refused_whatever_its_metadata(capsys, tmp_path, toy):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path, out = tmp_path / "other.onnx", tmp_path / "out"
    with R.warnings.catch_warnings():
        R.warnings.simplefilter("ignore")
        axes = {0: "b", 2: "h", 3: "w"}
        torch.onnx.export(torch.nn.Conv2d(3, 5, 3, padding=1).eval(), (torch.zeros(1, 3, 32, 32),),
                          str(path), dynamo=False, opset_version=R.ONNX_OPSET,
                          input_names=["image"], output_names=["maps"],
                          dynamic_axes=dict(image=axes, maps=axes))
    copied = dict(arch="small", stages=2, width=16, input_size=64, stride=4, skeleton="coco")
    for config, words in ((copied, "gives maps of shape (1, 5, 32, 32), not the (1, 57, 8, 8)"),
                          (copied | dict(stride=0), "has a config that cannot run")):
        model = onnx.load(str(path))
        onnx.helper.set_model_props(model, dict(repro_config=json.dumps(config)))
        onnx.save(model, str(path))
        line = run_main_error(capsys, ["--mode", "predict", "--onnx", str(path), "--out", str(out),
                                       "--input", str(toy["val"].parent / "images"), *PREDICT_ARGS])
        assert words in line, line
        assert not out.exists()


# ---- The command line: one job per call, each with only its own flags ----------------------------

def readme_commands(script: str = "repro.py") -> list[list[str]]:
    """The complete `python SCRIPT ...` commands of the README and the results' READMEs it links:
    code-block lines and one-line inline spans, without placeholders (`--seed S`), alternatives
    ([a | b]) or --help."""
    import re
    import shlex

    found, fenced, name = [], False, re.escape(script)
    readmes = [ROOT / "README.md", *sorted((ROOT / "results").glob("*/README.md"))]
    for line in "\n".join(p.read_text() for p in readmes).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced and re.match(rf"\s*(\$ )?python {name}( |$)", line):
            found.append(line.split(f"python {script}", 1)[1].split("#")[0])
        elif not fenced:
            found += re.findall(rf"`python {name}((?: [^`]*)?)`", line)
    placeholders = ("[", "--help", " S ", " T ")
    commands = [shlex.split(c) for c in found if not any(p in c for p in placeholders)]
    return [c for c in commands if c]


README_JOB_COMMANDS = {  # the READMEs' job commands that wrap over lines there
    "repro.py": [["--bench", "--stages", "2"], ["--bench", "--width", "48"],
                 ["--bench", "--preset", "paper", "--mpii-root", "data/mpii-rehearsal"],
                 ["--write-mpii-release", "data/mpii-rehearsal"]],
    "results/protocol/claims.py": [["--probe", "v2", "--init", "results/student-demo-scarce.pt"]],
    "results/speed/speed.py": [["--gpu-report", "--preset", "paper", "--input-size", "64",
                                "--batch-size", "4", "--stages", "2", "--demo-size", "small",
                                "--device", "cpu", "--out", "/tmp/gpurep"]]}


def test_the_readme_commands_parse_to_the_config_they_always_did():
    commands = {path: readme_commands(path) + README_JOB_COMMANDS.get(path, []) for path in SCRIPTS}
    assert len(commands["repro.py"]) > 40 and ["--mode", "augmented"] in commands["repro.py"]
    assert ["--report"] in commands["results/protocol/claims.py"]
    for path, script in SCRIPTS.items():  # none is refused, and each job is shown at least once
        assert {script.parse_args(argv)[1].job for argv in commands[path]} == set(script.JOBS), path
    probe = README_JOB_COMMANDS["results/protocol/claims.py"][0]
    asdict, paper = R.dataclasses.asdict, R.PRESETS["paper"]
    cfg, args = R.parse_args(["--mode", "augmented"])
    assert args.job == R.TRAIN and cfg == R.resolve_init(R.Config(), False)
    cfg, _ = R.parse_args(["--mode", "real", "--minutes", "20", "--eval-minutes", "5", "10", "15",
                           "--seed", "0", "--out", "runs/curve-s0"])
    assert cfg == R.resolve_init(R.Config(mode="real", minutes=20.0, eval_minutes=(5.0, 10.0, 15.0),
                                          out="runs/curve-s0"), False)
    cfg, _ = R.parse_args(["--mode", "real", "--preset", "paper", "--mpii-root", "DIR", "--out",
                           "runs/mpii-real"])
    assert cfg == R.Config(**asdict(R.Config()) | paper | dict(preset="paper", mode="real",
                                                               mpii_root="DIR",
                                                               skeleton="mpii",
                                                               out="runs/mpii-real", init=None))
    cfg, args = C.parse_args(probe)
    assert (args.probe == "v2" and
            cfg == R.resolve_init(R.Config(init="results/student-demo-scarce.pt"), False))
    cfg, args = R.parse_args(["--export-student", "runs/real/ckpt.pt", "--out",
                              "results/student-demo.pt"])
    assert (args.export_student, cfg.out) == ("runs/real/ckpt.pt", "results/student-demo.pt")
    cfg, args = R.parse_args(["--score-mpii", "PRED.mat", "GT.mat"])
    # reads no Config, loads nothing
    assert args.score_mpii == ["PRED.mat", "GT.mat"] and cfg == R.Config()
    cfg, args = G.parse_args(["--domain-gap", "120", "--eval-scales", "1.0"])
    assert args.domain_gap == 120 and cfg == R.Config(eval_scales=(1.0,))
    cfg, _ = S.parse_args(README_JOB_COMMANDS["results/speed/speed.py"][0])
    assert cfg == R.resolve_init(R.Config(**asdict(R.Config()) | paper | dict(
        preset="paper", input_size=64, batch_size=4, stages=2, demo_size="small", device="cpu",
        out="/tmp/gpurep")), False)


@pytest.mark.parametrize("argv, words", [
    (["--mode", "augmented", "--only", "x"], "a --mode run does not take --only (--only is a flag "
     "of python results/protocol/claims.py)"),
    (["--jobs", "2"], "a --mode run does not take --jobs (--jobs is a flag of python "
     "results/protocol/claims.py)"),
    (["--bench", "--report"], "--bench does not take --report (--report is a flag of python "
     "results/protocol/claims.py)"),
    (["--report", "--seed", "3"], "--report does not take --seed 3 (--seed is a flag of --probe)"),
    (["--mode", "real", "--report"], "--report does not take --mode real"),
    (["--score-mpii", "P", "G", "--out", "x"], "--score-mpii does not take --out x"),
    (["--bench", "--mode", "real"], "--bench does not take --mode real"),
    (["--probe", "--teacher-uniform"], "--probe does not take --teacher-uniform"),
    (["--report", "--bench"], "--report does not take --bench (--bench is a flag of repro.py's "
     "--bench)"),
    (["--report", "--mode", "real"], "--mode is a flag of repro.py's --mode runs"),
    (["--reproduce", "--jobs", "2", "--probe", "v2"],
     "argument --probe: not allowed with argument --reproduce"),
    (["--export-onnx", "m.onnx", "--compare", "a"], "not allowed with argument --export-onnx"),
])
def test_each_job_takes_only_its_own_flags_and_one_job_at_a_time(capsys, argv, words):
    assert words in run_main_error(capsys, argv)  # argparse's refusal: exit status 2, one line


def test_the_protocols_flags_are_checked_by_its_parser(capsys):
    line = run_main_error(capsys, ["--reproduce", "--only", "full/*", "scarce/nothing-*"])
    assert "argument --only: 'scarce/nothing-*' matches no protocol run" in line
    for jobs in ("0", "-1", "two"):
        assert "argument --jobs: must be a whole number of 1 or more" in run_main_error(
            capsys, ["--reproduce", "--jobs", jobs])
    _, args = C.parse_args(["--reproduce", "--jobs", "6", "--only", "scarce/*", "probe"])
    assert (args.job, args.jobs, args.only) == ("--reproduce", 6, ["scarce/*", "probe"])
    assert C.parse_args(["--reproduce"])[1].only == ["*"]


def test_a_refused_command_line_is_one_line_and_exit_status_2_from_the_shell():
    for script, argv in (("results/protocol/claims.py", ["--report", "--seed", "3"]),
                         ("repro.py", ["--bench", "--report"])):
        r = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True,
                           text=True, timeout=300)
        assert (r.returncode == 2 and r.stdout == "" and
                r.stderr.startswith(f"{Path(script).name}: error: ")), r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.count("error:") == 1


def test_help_lists_every_job_and_every_config_flag_in_groups(capsys):
    fields = [f.name for f in R.dataclasses.fields(R.Config)]
    # each once
    assert sorted(n for names in R.FLAG_GROUPS.values() for n in names) == sorted(fields)
    readers = {job for f in R.dataclasses.fields(R.Config) for job in f.metadata["jobs"]}
    jobs = {job for script in SCRIPTS.values() for job in script.JOBS}
    assert readers <= jobs | {"predict"}, readers  # a misspelt job would read nothing
    assert R.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {R.config_flag(n)} " in out or f"  {R.config_flag(n)}," in out for n in fields)
    assert all(f"\n  {flag}" in out.split("the other jobs")[1] for flag in R.JOBS if flag)
    for flag, job in R.JOBS.items():
        assert (set(job.fields) <= set(fields) and
                (flag == R.TRAIN) == (set(job.fields) == set(fields)))
        if flag:
            # also where the flag wants a value: --compare --help
            assert R.main([flag, "--help"]) == 0
            assert capsys.readouterr().out.startswith(f"usage: repro.py {flag}")


# ==============================================================================================
# The experiments' scripts beside their results (results/*/*.py), in the README's order
# ==============================================================================================

def test_each_script_lists_its_jobs_and_a_command_without_one_is_one_line(capsys):
    for path, script in SCRIPTS.items():
        if script is R:
            continue
        assert script.main(["--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: {path} JOB") and all(flag in out for flag in script.JOBS)
        assert script.main([]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"give one of {', '.join(script.JOBS)}" in err, err
        assert script.PROG == path and set(R.ELSEWHERE[path]) == {
            name for job in script.JOBS.values() for name, _ in job.own}  # what repro.py refuses
    assert R.main(["--help"]) == 0  # repro.py's --help says where the scripts' jobs are
    out = capsys.readouterr().out
    assert all(f"{path}: " in out for path in SCRIPTS if path != "repro.py")
    assert R.main(["--report", "--help"]) == 2  # a moved job's --help says where it went
    assert "(--report is a flag of python results/protocol/claims.py)" in capsys.readouterr().err
    assert C.main(["--jobs", "4"]) == 2  # a job's flag without its job: whose flag it is
    assert "give one of --reproduce, --report, --probe (--jobs is a flag of --reproduce)" in (
        capsys.readouterr().err)


def test_a_script_run_from_a_folder_inside_the_repository_is_refused(monkeypatch, capsys):
    monkeypatch.chdir(ROOT / "results" / "protocol")  # results/ and runs/ would be looked up here
    before = sorted(p.name for p in Path.cwd().iterdir())
    assert C.main(["--report"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "run it from the repository's root" in err[0], err
    assert sorted(p.name for p in Path.cwd().iterdir()) == before


# ---- results/protocol/claims.py: the claims protocol --------------------------------------------

def test_protocol_conditions_mean_what_their_names_say():
    cfgs = {name: R.parse_args(c.flags)[0] for name, c in C.CONDITIONS.items()}
    gap = next(r for r in C.protocol_runs() if r.condition == "synthetic-only")
    cfgs["synthetic-only"] = R.parse_args(gap.argv)[0]
    real_crops = {name: R.batch_sources(cfg, 16).count(R.REAL) for name, cfg in cfgs.items()}
    assert real_crops == dict(real=16, synthetic=8, **{"augmented-include": 8, "augmented-mask": 8},
                              teacher=8, uniform=8, **{"teacher-fast": 8, "synthetic-only": 0})
    # the domain gap: no real crop
    assert R.batch_sources(cfgs["synthetic-only"], 16) == [R.SYNTHETIC] * 16
    # what the claims table prints
    assert all(C.real_crops_per_step(c) == n for c, n in real_crops.items())
    assert [cfgs[c].synthetic_loss for c in ("augmented-include", "augmented-mask")] == ["include",
                                                                                         "mask"]
    teachers = [cfgs[c] for c in ("teacher", "uniform", "teacher-fast")]
    assert all(c.mode == "student-teacher" and c.teacher_attribute == "min_dist" for c in teachers)
    assert [(c.teacher_uniform, c.teacher_step) for c in teachers] == [(False, 0.01), (True, 0.01),
                                                                       (False, 0.1)]
    # the teacher ranks real crops: a batch without any is refused
    with pytest.raises(R.ReproError):
        R.check_config(R.dataclasses.replace(cfgs["teacher"], real_share=0.0))


def test_every_protocol_condition_records_the_real_crops_its_flags_give():
    """The claims table prints each condition's recorded real crops per step: they are what its
    runs' flags give (parsed here once per condition, never by the report)."""
    seen = {}
    # round 3's: test_round_3_...
    for run in [r for r in C.protocol_runs() if not r.name.startswith("r3/")]:
        if run.condition not in seen:
            cfg, _ = R.parse_args(run.argv)
            seen[run.condition] = R.batch_sources(cfg, cfg.batch_size).count(R.REAL)
    records = C.STUDENT_CONDITIONS | C.CONDITIONS | C.LONG_CONDITIONS
    assert set(seen) == set(records) - set(C.SAME_RUNS)
    assert all(records[c].real_crops == n for c, n in seen.items())
    assert all(C.real_crops_per_step(c) == C.real_crops_per_step(C.SAME_RUNS[c])
               for c in C.SAME_RUNS)


def test_round_2_runs_are_round_1s_flags_on_new_seeds_and_longer_teachers():
    first = {r.name: r for r in C.scratch_runs() + C.stage_runs(C.ROUND1.stages[0], C.ROUND1)}
    assert len(first) == 39 and [r.name for r in C.protocol_runs()[:39]] == list(first)
    second = [r for r in C.protocol_runs() if r.name not in first and not r.name.startswith("r3/")]
    assert all(r.init == f"{r.regime}/student" for r in second)
    short = [r for r in second if "3000" not in r.condition]
    assert {(r.regime, r.condition, r.seed) for r in short} == (
        {("full", c, 3) for c in ("augmented-mask", "synthetic")}
        | {("scarce", c, s) for s in (3, 4, 5, 6) for c in ("augmented-mask", "synthetic")}
        | {("scarce", "augmented-include", s) for s in (3, 4)})
    for r in short:  # the same command as round 1's runs of the condition, with another seed
        argv, twin = list(r.argv), first[f"{r.regime}/{r.condition}-s0"]
        argv[argv.index("--seed") + 1] = "0"
        assert argv == twin.argv
    long = [r for r in second if "3000" in r.condition]
    assert len(long) == 3 * 5 and all(r.regime == "scarce" for r in long)
    for r in long:
        cfg, _ = R.parse_args(r.argv)
        assert cfg.steps == 3000 and cfg.steps // cfg.teacher_interval >= 150
        assert (cfg.mode, cfg.teacher_stratified) == {"teacher-3000": ("student-teacher", False),
                                                      "stratified-3000": ("student-teacher", True),
                                                      "synthetic-3000": ("synthetic",
                                                                         False)}[r.condition]


def test_the_uniform_teacher_loop_trains_on_the_synthetic_conditions_batches(toy, tmp_path):
    batches = []
    for name in ("synthetic", "uniform"):
        cfg, _ = R.parse_args(toy_args(toy, tmp_path / name, *C.CONDITIONS[name].flags, "--steps",
                                       "3", "--workers", "0"))
        trainer = R.Trainer(cfg, R.load_data(cfg), torch.device("cpu"), tmp_path / name)
        batches.append([])
        for step, batch in itertools.islice(trainer.batches(), 3):
            batches[-1].append(batch)
            # as fit() does: the teacher's loop draws each step's data from it
            trainer.step = step + 1
    assert len(batches[0]) == len(batches[1]) == 3
    for a, b in zip(*batches):
        assert a.source == b.source and R.SYNTHETIC in a.source
        assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("image", "keypoints",
                                                                          "ignore"))
        assert torch.equal(a.target, b.target) and torch.equal(a.loss_mask, b.loss_mask)
    assert C.SAME_RUNS == {"uniform": "synthetic", "uniform-3000": "synthetic-3000"}
    assert C.LONG_CONDITIONS["synthetic-3000"] == C.CONDITIONS["synthetic"]
    # read from synthetic's runs
    assert not any(r.condition in C.SAME_RUNS for r in C.protocol_runs())
    runs = [dict(condition=c, regime="full", seed=s, ap=ap) for s in range(3) for c, ap in
            (("synthetic", 0.3 + 0.01 * s), ("teacher", 0.2))]
    assert C.paired_aps(runs, "teacher", "uniform", "full") == ([0.2] * 3, [0.3, 0.31, 0.32])


def test_teacher_drift_counts_every_update_of_the_checkpoint(tmp_path):
    records = [dict(step=20 * k, probs=[0.5 + 0.1 * k, 0.5 - 0.1 * k]) for k in range(3)]
    drift = C.teacher_drift(records)
    assert (drift["updates"] == 3 and drift["l1"] == pytest.approx(0.4) and
            drift["max_prob"] == pytest.approx(0.7))
    assert "entropy_first" not in drift  # round 1's records began with the placeholder: no entropy
    # round 2's: the network's outputs only
    new = C.teacher_drift([dict(r, next_bin=0) for r in records])
    assert (new["entropy_first"] == pytest.approx(math.log(2)) and
            new["entropy_min"] == pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3))))
    assert new["series"] == [[r["step"], *r["probs"]] for r in records]
    assert C.teacher_drift([dict(step=1)]) is None
    # the metric lines carry only the latest update at each line: the checkpoint's records win
    R.append_jsonl(tmp_path / "metrics.jsonl", dict(step=50, teacher=records[-1]))
    assert C.teacher_records(tmp_path) == records[-1:]
    torch.save(dict(teacher=dict(records=records)), tmp_path / "ckpt.pt")
    assert C.teacher_records(tmp_path) == records


def test_runner_skips_finished_runs_and_rebuilds_a_missing_student(tmp_path, monkeypatch):
    _report_sandbox(tmp_path, monkeypatch)
    monkeypatch.setattr(R, "SHIPPED_STUDENT", tmp_path / "results" / "student-demo.pt")
    runs = C.protocol_runs()
    done = [r for r in runs if r.name in ("full/student", "full/real-s0")]
    for r in done:
        C.PROTOCOL_RESULTS.mkdir(parents=True, exist_ok=True)
        R.write_json(dict(name=r.name, condition=r.condition, regime=r.regime, seed=r.seed, steps=1,
                          minutes=0.1,
                          ap=0.3, ap50=0.6, ap75=0.2, ap_sd=0.01, ap_by_occlusion=None, init=r.init,
                          command="x", teacher=None), C.summary_path(r))
    for name in ("probe", "probe-v2"):  # finished probes: the runner skips them
        shutil.copy(ROOT / "results" / f"{name}.json", tmp_path / "results")
    _probe_v3_results(tmp_path / "results", np.random.default_rng(0).normal(0, 1, (3, 4, 5, 3)))
    # a file without a result is not one
    assert not C.probe_done(tmp_path / "results" / "claims.json")
    trained = []

    def train(run, python):
        trained.append(run.name)
        if run.condition == "student":
            C.regime_student(run.regime).write_bytes(b"")
    monkeypatch.setattr(C, "train_protocol_run", train)
    C.run_protocol()
    assert "full/real-s0" not in trained and trained[0] == "scarce/student"
    # full/student finished before, but its exported weights are gone: rebuilt before its first user
    assert trained.index("full/student") < trained.index("full/synthetic-s0")
    # each run once, the rebuilt student twice
    assert collections.Counter(trained) == collections.Counter(
        [r.name for r in runs if r not in done] + ["full/student"])
    first_of = {name: next(i for i, n in enumerate(trained) if pattern in n)
                for name, pattern in (("round 2", "full/augmented-mask-s3"),
                                      ("b", "r3/scarce/real-3000"), ("c", "-from-"),
                                      ("d", "teacher-paper-3000"))}
    round1 = [i for i, n in enumerate(trained) if n.endswith(("-s0", "-s1", "-s2"))
              and not n.startswith("r3/") and "3000" not in n]
    # round by round, stage by stage
    assert max(round1) < first_of["round 2"] < first_of["b"] < first_of["c"] < first_of["d"]
    claims = json.loads((tmp_path / "results" / "claims.json").read_text())
    assert len(claims["runs"]) == 2 and set(claims["frozen"]["round1"]["verdicts"]) == {"1", "2",
                                                                                        "3", "4"}
    third = sum(r.name.startswith("r3/") for r in runs)
    assert claims["progress"] == {
        "1": dict(finished=2, planned=39, probes=1, probes_planned=1),
        "2": dict(finished=0, planned=len(runs) - 39 - third, probes=1, probes_planned=1),
        "3": dict(finished=0, planned=third, probes=3, probes_planned=3)}
    assert "round 1: 2 of 39 runs" in (tmp_path / "results" / "claims.md").read_text()


def _report_sandbox(tmp_path, monkeypatch):
    """An empty results/protocol beside the committed frozen rounds, as cwd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "protocol").mkdir(parents=True)
    shutil.copy(ROOT / C.FROZEN_ROUNDS, tmp_path / C.FROZEN_ROUNDS)


FAKE_RUN = """#!{python}
import json, os, pathlib, sys, time
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True)
running = pathlib.Path("running")
(running / out.name).mkdir(parents=True)
time.sleep(0.5)
with open("concurrency.txt", "a") as f:
    f.write(f"{{len(list(running.iterdir()))}} {{os.environ['OMP_NUM_THREADS']}}\\n")
(running / out.name).rmdir()
if out.name == "teacher-s1":
    sys.exit(3)
(out / "config.json").write_text(json.dumps(dict(device="cpu")))
(out / "metrics.json").write_text(json.dumps(dict(steps=800, train_minutes=0.1, AP=0.2, AP50=0.5, AP75=0.1)))
"""


def _protocol_sandbox(tmp_path, monkeypatch, script):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(R, "SHIPPED_STUDENT", tmp_path / "results" / "student-demo.pt")
    for regime in C.PROTOCOL_REGIMES:
        C.regime_student(regime).parent.mkdir(parents=True, exist_ok=True)
        C.regime_student(regime).write_bytes(b"")
    fake = tmp_path / "fake-python"
    fake.write_text(script.format(python=sys.executable, root=str(ROOT)))
    fake.chmod(0o755)
    return fake


def test_the_runner_starts_the_probe_with_a_command_that_runs_on_any_machine(tmp_path, monkeypatch,
                                                                             capsys):
    fake = _protocol_sandbox(tmp_path, monkeypatch, "#!{python}\nimport json, sys\n"
                             "open('argv.json', 'w').write(json.dumps(sys.argv[2:]))\n")
    C.run_probe_once(C.PROBES["v2"], 0, {r.name: r for r in C.protocol_runs()}, str(fake))
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:6] == ["--probe", "v2", "--init", "results/student-demo-scarce.pt", "--seed", "0"]
    assert f"the probe: python {C.PROG} " + " ".join(argv) in capsys.readouterr().out


def test_runner_trains_matching_runs_in_parallel_and_reports_a_failed_one(tmp_path, monkeypatch):
    fake = _protocol_sandbox(tmp_path, monkeypatch, FAKE_RUN)
    with pytest.raises(R.ReproError, match="scarce/teacher-s1 failed .exit status 3"):
        # round 1's seed 1
        C.run_protocol(str(fake), jobs=2, only=("scarce/*[!0-9]-s1", "scarce/nothing"))
    summaries = sorted(p.name for p in C.PROTOCOL_RESULTS.glob("*.json"))
    assert summaries == sorted(f"scarce-{c}-s1.json"
                               for c in C.CONDITIONS if c not in C.SAME_RUNS and c != "teacher")
    seen = [line.split() for line in (tmp_path / "concurrency.txt").read_text().splitlines()]
    assert len(seen) == 6 and max(int(n) for n, _ in seen) == 2  # two at a time, never more
    assert {threads for _, threads in seen} == {str(max(1, (os.cpu_count() or 1) // 2))}
    assert json.loads((C.PROTOCOL_RESULTS / "scarce-real-s1.json").read_text())["device"] == "cpu"
    assert (C.PROTOCOL_RUNS / "scarce" / "real-s1.log").is_file()
    assert C.main(["--jobs", "4"]) == 2  # without --reproduce: one line, nothing runs


LIVE_RUN = """#!{python}
import os, pathlib, signal, sys, time
sys.path.insert(0, {root!r})
import repro
signal.signal(signal.SIGTERM, repro.on_sigterm)  # as repro.py's main does
repro.watch_parent(0.1)
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
(out / "pid").write_text(str(os.getpid()))
try:
    time.sleep(120)
except KeyboardInterrupt:
    (out / "ended").write_text("checkpoint kept")
    sys.exit(143)
"""


@pytest.mark.parametrize("kill", ["SIGKILL", "SIGTERM"])
def test_runs_end_with_their_runner_and_a_live_run_is_never_deleted(tmp_path, monkeypatch, kill):
    fake = _protocol_sandbox(tmp_path, monkeypatch, LIVE_RUN)
    runner = (f"import functools, sys; sys.path.insert(0, {str(ROOT / 'results' / 'protocol')!r}); "
              f"import claims as C; C.R.SHIPPED_STUDENT = C.Path({str(R.SHIPPED_STUDENT)!r}); "
              f"C.run_protocol = functools.partial(C.run_protocol, {str(fake)!r}); "
              "sys.exit(C.main(['--reproduce', '--jobs', '2', '--only', 'scarce/real-s[01]']))")
    folders = [C.PROTOCOL_RUNS / "scarce" / f"real-s{s}" for s in (0, 1)]
    proc = subprocess.Popen([sys.executable, "-c", runner], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: all((f / "pid").is_file() for f in folders))
    children = [int((f / "pid").read_text()) for f in folders]
    os.kill(proc.pid, getattr(R.signal, kill))
    proc.wait(120)
    if kill == "SIGTERM":  # one line, and its runs were told to checkpoint and end
        assert proc.returncode == 143 and proc.stderr.read().strip().count("\n") == 0
    _wait_for(lambda: not any(R.process_alive(pid) and R.process_started(pid) for pid in children),
              90)
    # ended through SIGTERM: the checkpoint kept
    assert all((f / "ended").is_file() for f in folders)
    # a rerun while a live process holds a folder neither deletes it nor starts a second writer
    # there
    folder = folders[0]
    with subprocess.Popen(["sleep", "60"]) as other:
        (folder / R.LOCK_NAME).write_text(json.dumps(dict(pid=other.pid,
                                                          started=R.process_started(other.pid),
                                                          host=os.uname().nodename)))
        for jobs in (1, 2):
            with pytest.raises(R.ReproError,
                               match=f"real-s0 is still running .pid {other.pid} holds"):
                C.run_protocol(str(fake), jobs=jobs, only=("scarce/real-s0",))
            assert (folder / "ended").is_file() and (folder / "pid").read_text() == str(children[0])
        other.kill()


def test_corrupt_run_summaries_are_named_and_their_runs_redone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = {r.name: r for r in C.protocol_runs()}
    C.PROTOCOL_RESULTS.mkdir(parents=True)
    good = dict(name="full/real-s0", condition="real", regime="full", seed=0, steps=800,
                minutes=1.0, ap=0.3,
                ap50=0.6, ap75=0.2, ap_sd=0.01, ap_by_occlusion=None, init="full/student",
                command="x", teacher=None)
    R.write_json(good, C.summary_path(runs["full/real-s0"]))
    bad = C.summary_path(runs["scarce/real-s0"])
    for text, words in (('{"name": "scarce/real-s0", "condi', "not a readable run summary"),
                        ("[1, 2]", "bad or missing name"),
                        (json.dumps(good | dict(name="scarce/real-s0", ap="high")),
                         "bad or missing ap"),
                        *((json.dumps(good | dict(name="scarce/real-s0", ap=ap)), "ap out of range")
                          for ap in (float("nan"), 7.5)),
                        # another run's summary under this name
                        (json.dumps(good), "bad or missing name"),
                        (json.dumps({k: v for k, v in good.items() if k != "condition"}
                                    | dict(name="scarce/real-s0")),
                         "bad or missing condition")):
        bad.write_text(text)
        line = run_main_error(capsys, ["--report"])
        assert str(bad) in line and words in line, line
        # nothing written from a partial set
        assert not (tmp_path / "results" / "claims.json").exists()
        trained = []
        monkeypatch.setattr(C, "train_protocol_run", lambda run, python: trained.append(run.name))
        monkeypatch.setattr(C, "report_protocol", lambda: None)
        capsys.readouterr()
        C.run_protocol(only=("*/real-s0",))
        assert (trained == ["scarce/real-s0"] and
                f"protocol: {bad} is not" in capsys.readouterr().out)
        monkeypatch.undo()
        monkeypatch.chdir(tmp_path)
    bad.unlink()
    # the frozen rounds: missing, then without what the report reads
    assert "git checkout results/rounds-1-2.json" in run_main_error(capsys, ["--report"])
    (tmp_path / C.FROZEN_ROUNDS).write_text(json.dumps(dict(round1={}, round2={})))
    assert "bad or missing round1, round2" in run_main_error(capsys, ["--report"])
    shutil.copy(ROOT / C.FROZEN_ROUNDS, tmp_path / C.FROZEN_ROUNDS)
    (tmp_path / "results" / "probe.json").write_text("{")
    assert "probe.json is not readable json" in run_main_error(capsys, ["--report"])


def test_rule_v2_reads_a_paired_t_interval_against_delta():
    from scipy.stats import ttest_1samp
    d = [0.004, 0.006, 0.005, 0.0055]
    t = C.paired_test(d, 0.003)
    assert t["p"] == pytest.approx(ttest_1samp(d, 0).pvalue) and t["verdict"] == "reproduced"
    ci = ttest_1samp(d, 0).confidence_interval(0.95)
    assert (t["lo"], t["hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert C.paired_test([-x for x in d], 0.003)["verdict"] == "contradicted"
    assert C.paired_test([0.0005, -0.0004, 0.0002, -0.0001],
                         0.003)["verdict"] == "no effect of delta or more"
    assert C.paired_test([0.004, -0.004, 0.003, -0.002], 0.003)["verdict"] == "inconclusive"
    assert C.paired_test([0.01, 0.02], 0.003)["verdict"] == "inconclusive"  # fewer than 3 pairs


def test_rule_v2_seeds_come_from_the_power_calculation_on_round_1():
    planned = [s for s in C.ROUND2.stages if s.sd]
    assert [s.seeds for s in planned] == [4, 7, 3, 5, 5]
    assert all(C.RULE_V2.seeds(s.sd, s.delta) == s.seeds for s in planned)
    from scipy.stats import t
    rng = np.random.default_rng(0)  # the formula against simulated paired differences
    for n in (3, 5, 7):
        d = rng.normal(0.001, 0.0017, (20000, n))
        half = t.ppf(0.975, n - 1) * d.std(1, ddof=1) / np.sqrt(n)
        assurance = C.precision_assurance(n, 0.0017, 0.003)
        assert (half < 0.003).mean() == pytest.approx(assurance, abs=0.01)
    summaries = sorted((Path(R.__file__).parent / "results" / "protocol").glob("*-s[012].json"))
    if not summaries:
        pytest.skip("round 1's summaries are not here")
    runs = [json.loads(p.read_text()) for p in summaries]
    # the pilot sd is round 1's (claim 4: teacher - uniform at 800 steps), as committed
    for s in planned:
        (better, worse), regime = s.comparisons[0], s.arms[0].regime
        d = np.subtract(*C.paired_aps(runs, better.removesuffix("-3000"),
                                      worse.removesuffix("-3000"), regime, (0, 1, 2)))
        assert d.std(ddof=1) == pytest.approx(s.sd, abs=0.000006), s.key


def test_the_frozen_rounds_re_derive_from_their_summaries():
    """Rounds 1 and 2's verdicts are data (results/rounds-1-2.json), which the report reprints: each
    is what its rule gives on the committed summaries and probe results, recomputed here (rule v1
    and probe v1's rule written out, as the code no longer computes them), so the file cannot
    drift."""
    from scipy.stats import f_oneway, kendalltau
    frozen = C.read_frozen(ROOT / C.FROZEN_ROUNDS)
    runs = [C.read_summary(p) for p in sorted((ROOT / C.PROTOCOL_RESULTS).glob("*.json"))]
    runs = [r for r in runs if not r["name"].startswith("r3/")]

    def overall(words):  # both rules: a verdict in one regime, and the other way in none
        for word, other in (("reproduced", "contradicted"), ("contradicted", "reproduced")):
            if word in words and other not in words:
                return word
        return words[0] if words and all(w == "no effect of delta or more"
                                         for w in words) else "inconclusive"
    first = frozen["round1"]["verdicts"]
    for claim, v in first.items():
        if claim == "3":
            continue
        # rule v1: the mean paired difference against 2 SE, seeds 0-2
        for regime in C.PROTOCOL_REGIMES:
            d = np.subtract(*C.paired_aps(runs, v["better"], v["worse"], regime, (0, 1, 2)))
            mean, two_se = d.mean(), 2 * d.std(ddof=1) / np.sqrt(3)
            word = ("reproduced" if mean > two_se else "contradicted" if mean < -two_se
                    else "inconclusive")
            assert v["per_regime"][regime] == word
            reading = f"mean paired AP difference {mean:+.4f}, 2 SE {two_se:.4f}, 3 seeds"
            assert f"{regime}: {word} ({reading})" in v["reason"]
        assert v["verdict"] == overall(list(v["per_regime"].values()))
    use = np.array(json.loads((ROOT / "results" / "probe.json").read_text())["usefulness"],
                   np.float64)
    ok = np.isfinite(use).all((0, 2))  # probe v1's rule: a one-way ANOVA per point, tau first-last
    p = [f_oneway(*point[ok]).pvalue for point in use]
    tau = kendalltau(use[0, ok].mean(1), use[-1, ok].mean(1)).statistic
    assert first["3"]["reason"] == (f"bins unequal (ANOVA p < 0.01) at {sum(x < 0.01 for x in p)} "
                                    "of 3 points "
                                    f"(p = {', '.join(f'{x:.2g}' for x in p)}); rank tau "
                                    f"first-last {tau:.2f}")
    unequal = any(x < 0.01 for x in p)
    assert first["3"]["verdict"] == ("reproduced" if unequal and tau < 0.5 else
                                     "contradicted" if not unequal or tau >= 0.8 else
                                     "inconclusive")
    second = frozen["round2"]
    assert second["delta"] == C.DELTA and set(first) == {"1", "2", "3", "4"}
    assert {name: set(v["per_regime"]) for name, v in second["verdicts"].items()} == {
        "1": {"full", "scarce"}, "2": {"full", "scarce"}, "4": {"scarce"},
        "teacher - stratified": {"scarce"}, "stratified - uniform": {"scarce"}}
    planned = {(s.comparisons[0], s.arms[0].regime): s.seeds for s in C.ROUND2.stages if s.sd}
    for name, v in second["verdicts"].items():
        # rule v2: the paired t-test, at every seed both have
        for regime, t in v["per_regime"].items():
            delta = second["delta"][regime]
            pairs, _ = C.seed_pairs(runs, v["better"], v["worse"], regime)
            new = C.paired_test([a["ap"] - b["ap"] for a, b in pairs], delta)
            assert {k: t[k] for k in new} == pytest.approx(new) and t["delta"] == delta
            # claim 4's two parts: its 5
            seeds = planned.get(((v["better"], v["worse"]), regime), 5)
            assert t["planned_seeds"] == seeds == t["n"]
            assert t["power_now"] == pytest.approx(C.t_test_power(seeds, t["sd"], delta))
            assert t["assurance_now"] == pytest.approx(C.precision_assurance(seeds, t["sd"], delta))
            assert t["seeds_needed_now"] == C.RULE_V2.seeds(t["sd"], delta)
        assert v["verdict"] == overall([t["verdict"] for t in v["per_regime"].values()])
    probe = json.loads((ROOT / "results" / "probe-v2.json").read_text())
    new = C.probe_test(np.array(probe["usefulness"], np.float64))
    assert {k: new[k] for k in ("bins_differ", "ranking_changes")} == {
        k: second["probe"][k] for k in ("bins_differ", "ranking_changes")}
    numbers = ("f_bins", "p_bins", "f_interaction", "p_interaction", "tau", "tau_lo", "tau_hi")
    assert [second["probe"][k] for k in numbers] == pytest.approx([new[k] for k in numbers])


def test_t_test_power_is_the_rejection_rate_at_delta_and_matches_the_audits_values():
    from scipy.stats import ttest_1samp
    rng = np.random.default_rng(1)
    for n, sd, delta in ((5, 0.0055, 0.003), (7, 0.0022, 0.003), (12, 0.0055, 0.005)):
        d = rng.normal(delta, sd, (20000, n))
        rejected = (ttest_1samp(d, 0, axis=1).pvalue < 0.05).mean()
        assert rejected == pytest.approx(C.t_test_power(n, sd, delta), abs=0.01)
    # claim 4's measured paired sd (round 2): the audit's 0.16 at delta, 0.93 at -0.0116
    sd = 0.005547690140022593
    assert C.t_test_power(5, sd, 0.003) == pytest.approx(0.156, abs=0.001)
    assert C.t_test_power(5, sd, 0.011634921956770794) == pytest.approx(0.931, abs=0.001)


def test_round_3_seeds_come_from_rule_v3s_power_calculation_on_the_measured_spreads():
    stages = {s.key: s for s in C.ROUND3.stages}
    assert list(stages) == ["a", "b", "c", "d"]
    for s in stages.values():
        if s.sd is None:  # the probe: no spread between trajectories measured yet
            assert s.probe and s.seeds == len(s.probe.trajectories) == C.RULE_V3.min_seeds
            continue
        n = s.seeds
        assert n == C.RULE_V3.seeds(s.sd, s.delta), s.key
        at_n, below = (min(f(k, s.sd, s.delta) for f in (C.t_test_power, C.precision_assurance))
                       for k in (n, n - 1))
        assert at_n >= 0.8 > below  # both reach 0.8 at n, one of them not at n - 1
    summaries = sorted((Path(R.__file__).parent / "results" / "protocol").glob("scarce-*.json"))
    if not summaries:
        pytest.skip("round 2's summaries are not here")
    runs = [json.loads(p.read_text()) for p in summaries]
    pairs = (("teacher-3000", "uniform-3000"), ("teacher-3000", "stratified-3000"),
             ("real", "synthetic"), ("augmented-mask", "augmented-include"))
    sd = [np.subtract(*C.paired_aps(runs, *pair, "scarce")).std(ddof=1) for pair in pairs]
    assert stages["d"].sd == pytest.approx(sd[0], abs=0.00001)
    assert stages["b"].sd == pytest.approx(max(sd[1], sd[2]), abs=0.00005)
    assert stages["c"].sd == pytest.approx(math.sqrt((0.00177 ** 2 + sd[3] ** 2) / 2), abs=0.00001)


def test_round_3_runs_parse_to_the_flags_their_names_say_and_collide_with_no_summary():
    old = {C.summary_path(r) for r in C.protocol_runs() if not r.name.startswith("r3/")}
    twins = {r.name: r for r in C.protocol_runs()}
    runs = [r for r in C.protocol_runs() if r.name.startswith("r3/")]
    assert len({r.name for r in runs}) == len(runs) and not {C.summary_path(r) for r in runs} & old
    assert all(r.name.startswith("r3/") and C.matches(r.name, ("r3/*",)) for r in runs)
    assert [n for n, _, _ in C.probe_jobs()] == ["probe", "probe-v2", "r3/probe-v3-t0",
                                                 "r3/probe-v3-t1", "r3/probe-v3-t2"]
    for r in runs:
        cfg, _ = R.parse_args(C.protocol_argv(r))
        R.check_config(cfg)
        assert (cfg.seed, cfg.train_subset) == (r.seed, C.PROTOCOL_REGIMES[r.regime])
        assert cfg.steps == (800 if "-from-" in r.condition else 3000)
        student = r.condition.split("-from-")[1] if "-from-" in r.condition else "scarce"
        assert cfg.init == R.tracked_name(C.regime_student(student))
        assert r.init == f"{student}/student"
        if r.condition.startswith("augmented-"):
            assert (cfg.mode, cfg.synthetic_loss) == ("augmented", r.condition.split("-")[1])
        elif r.condition == "real-3000":
            assert cfg.mode == "real" and R.batch_sources(cfg, 16).count(R.REAL) == 16
        elif r.condition == "teacher-paper-3000":
            teacher = (cfg.mode, cfg.teacher_update, cfg.teacher_arch, cfg.teacher_bins)
            assert teacher == ("student-teacher", "paper", "small-nobn", "paper")
            assert (cfg.teacher_lr, cfg.beta1) == (5e-5, 0.8)
        elif r.condition == "uniform-paper-3000":  # the identical loop at the student's same beta1
            assert (cfg.mode, cfg.beta1) == ("synthetic", 0.8)
        else:  # round 2's 3000-step conditions, again, on one device key
            twin = list(twins[f"scarce/{r.condition}-s0"].argv)
            twin[twin.index("--seed") + 1] = str(r.seed)
            assert r.argv == twin
    cells = {(r.regime, r.condition) for r in runs if "-from-" in r.condition}
    assert len(cells) == 8  # the 2x2 of images x student, for mask and include
    probe, _ = C.parse_args(["--probe", "v3", "--seed", "2", "--train-subset", "100"])
    assert C.probe_name(C.PROBES["v3"], 2) == "probe-v3-t2" and probe.seed == 2


def test_the_report_shows_every_round_3_stage_pending_with_its_cost(tmp_path, monkeypatch):
    _report_sandbox(tmp_path, monkeypatch)
    claims = C.report_protocol()
    table = (tmp_path / "results" / "claims.md").read_text()
    rows = [line for line in table.splitlines()
            if line.startswith(("| a |", "| b |", "| c |", "| d |"))]
    assert [row[2] for row in rows] == ["a", "b", "c", "d"]
    for stage, row, status in zip(C.ROUND3.stages, rows, claims["round3"]):
        cost = C.stage_cost(stage)
        assert status["status"] == "pending" and status["finished"] == 0 and "**pending**" in row
        assert f"| {cost['cpu_hours']} h | {cost['gpu_minutes']} min |" in row
        assert cost["cpu_hours"] > 0
    # 76 runs of 3000 steps at 2.3 s, 7 minutes of evaluation each
    b = C.stage_cost(C.ROUND3.stages[1])
    assert b["cpu_hours"] == pytest.approx(76 * (3000 * 2.3 / 60 + 7) / 60, abs=0.05)
    assert b["gpu_minutes"] == round(13 * (3000 * 0.057 / 60 + 0.75))


def _summary(name, condition, seed, ap, key="k", regime="scarce", steps=3000):
    R.write_json(dict(name=name, condition=condition, regime=regime, seed=seed, steps=steps,
                      minutes=1.0, ap=ap, ap50=0.5, ap75=0.2, device="cpu", device_key=key),
                 C.PROTOCOL_RESULTS / f"{name.replace('/', '-')}.json")


def _probe_v3_results(folder, uses):
    design = C.PROBES["v3"]
    for t, use in zip(design.trajectories, uses):
        R.write_json(dict(design=design.name, trajectory=t, points=list(design.points),
                          probe_lr=design.lr, keep_bn=design.keep_bn, train_subset=100,
                          usefulness=use.tolist()), folder / f"probe-v3-t{t}.json")


def test_the_report_reads_a_finished_round_3_stage_into_the_answer_table(tmp_path, monkeypatch):
    """Stages a and d finished (made-up results): --report reads them by rule v3, over round 3's
    runs at their planned seeds only, and their rows replace claims 3 and 4's round-2 rows in
    the README's answer; stage d waits for stage b's uniform-3000 runs it compares with."""
    _report_sandbox(tmp_path, monkeypatch)
    stages = {s.key: s for s in C.ROUND3.stages}
    d = stages["d"]
    for seed in range(d.seeds):
        for condition, ap in (("teacher-paper-3000", 0.215), ("uniform-paper-3000", 0.205)):
            _summary(f"r3/scarce/{condition}-s{seed}", condition, seed,
                     ap + 0.0005 * (seed % 3) * (condition == "teacher-paper-3000"))
    for seed in range(5):  # round 2's uniform-3000: never read by round 3
        _summary(f"scarce/synthetic-3000-s{seed}", "synthetic-3000", seed, 0.9)
    for condition in ("teacher-paper-3000", "uniform-paper-3000"):  # past the plan: never read
        ap = 0.9 if condition.startswith("teacher") else 0.0
        _summary(f"r3/scarce/{condition}-s{d.seeds}", condition, d.seeds, ap)
    rng = np.random.default_rng(0)  # bins that differ, the same ranking at every point
    uses = [np.linspace(0, 1, 5)[None, :, None] + rng.normal(0, 0.05, (4, 5, 3)) + 0.1 * t
            for t in range(3)]
    _probe_v3_results(tmp_path / "results", uses)
    claims = C.report_protocol()
    status = {s["key"]: s for s in claims["round3"]}
    assert not status["d"]["decided"]
    assert "uniform-3000: pending (0 of 12 seeds)" in status["d"]["status"]
    rows = {line[2]: line for line in C.answer_table(claims).splitlines()
            if line[:3] in ("| 3", "| 4")}
    assert "round 3" not in rows["4"] and C.TESTED[4] in rows["4"]  # round 2's row stays
    for seed in range(d.seeds):
        _summary(f"r3/scarce/synthetic-3000-s{seed}", "synthetic-3000", seed, 0.210)
    claims = C.report_protocol()
    status = {s["key"]: s for s in claims["round3"]}
    assert status["b"]["status"] == status["c"]["status"] == "pending" and not status["b"]["tests"]
    first, second = status["d"]["tests"]
    assert first["label"] == "teacher-paper-3000 - uniform-paper-3000" and status["d"]["decided"]
    assert first["verdict"] == "reproduced" and first["n"] == d.seeds
    assert first["mean"] == pytest.approx(0.0105) and first["seeds_needed_now"] >= 3
    assert second["worse"] == "uniform-3000" and second["mean"] == pytest.approx(0.0055)
    want = C.probe_test(np.stack([u.mean(2) for u in uses], 2))  # trajectories as the replicates
    assert status["a"]["tests"][0]["f_bins"] == pytest.approx(want["f_bins"])
    assert status["a"]["tests"][0]["bins_differ"] == "supported"
    assert "3 replicates" in want["reason"]
    answer = {line[2]: line for line in C.answer_table(claims).splitlines()
              if line[:3] in ("| 3", "| 4")}
    assert "(round 3, stage d)" in answer["4"]
    assert "teacher-paper-3000 - uniform-paper-3000 +0.0105" in answer["4"]
    assert "**bins differ: supported" in answer["3"] and "(probe v3)" in answer["3"]
    row = (tmp_path / "results" / "claims.md").read_text().split("| d |")[1].split("\n")[0]
    assert "**pending**" not in row and "reproduced" in row
    probe = json.loads((tmp_path / "results" / "probe-v3-t1.json").read_text())
    R.write_json(probe | dict(design="probe-v2"), tmp_path / "results" / "probe-v3-t1.json")
    with pytest.raises(R.ReproError,
                       match="probe-v3-t1.json is not a result of probe-v3, trajectory 1"):
        C.report_protocol()


def test_a_stage_is_read_at_its_planned_seeds_and_the_2x2_separates_images_from_student():
    stage = C.Stage("x", "q", (C.Arm("teacher-3000", ()),), 3000, 5,
                    (("teacher-3000", "uniform-3000"),), delta=0.003, sd=0.002)
    runs = [dict(name=f"r3/scarce/{c}-s{s}", condition=c, regime="scarce", seed=s,
                 ap=0.2 + (0.01 + 0.001 * s) * (c == "teacher-3000")) for s in range(4)
            for c in ("teacher-3000", "synthetic-3000")]
    (t,) = C.pair_tests(stage, C.RULE_V3, runs)
    # no early reading
    assert t["verdict"] == "pending (4 of 5 seeds)" and t["mean"] == pytest.approx(0.0115)
    runs += [dict(r, seed=4, name=r["name"][:-1] + "4") for r in runs[:2]]
    (t,) = C.pair_tests(stage, C.RULE_V3, runs)
    assert t["verdict"] == "reproduced" and t["planned_seeds"] == 5
    assert t["seeds_needed_now"] == C.RULE_V3.seeds(t["sd"], 0.003) and 0 < t["power_now"] <= 1
    # mask - include: +0.01 with 1000 images, -0.01 with 100, and 0.004 more from the full student
    c = next(s for s in C.ROUND3.stages if s.key == "c")
    d = {"full": 0.01, "scarce": -0.01}
    noise = np.random.default_rng(5).normal(0, 0.0005, (2, 2, 7))
    runs = [dict(name=f"r3/{images}/augmented-{loss}-from-{student}-s{s}", regime=images, seed=s,
                 condition=f"augmented-{loss}-from-{student}", device_key="k",
                 ap=0.2 + (d[images] + 0.004 * (student == "full") + noise[i, j, s]
                           if loss == "mask" else 0))
            for i, images in enumerate(C.PROTOCOL_REGIMES)
            for j, student in enumerate(C.PROTOCOL_REGIMES)
            for loss in ("mask", "include") for s in range(7)]
    images, student = C.contrast_tests(c, C.RULE_V3, runs)
    assert images["mean"] == pytest.approx(0.02 + noise[0].mean() - noise[1].mean())
    assert images["verdict"] == "reproduced" and images["better"] == "d on 1000 images"
    assert student["mean"] == pytest.approx(0.004 + noise[:, 0].mean() - noise[:, 1].mean())
    assert student["verdict"] == "reproduced"
    assert student["label"] == "student: d from full - d from scarce"
    images, _ = C.contrast_tests(c, C.RULE_V3, runs[:-1])  # a seed with a missing cell is left out
    assert images["verdict"] == "pending (6 of 7 seeds)"
    for k in (0, 7):  # one cell of seed 0 (mask and include) under another key than its other cells
        runs[k] = dict(runs[k], device_key="other")
    assert runs[0]["name"] == "r3/full/augmented-mask-from-full-s0"
    assert runs[7]["name"] == "r3/full/augmented-include-from-full-s0"
    images, _ = C.contrast_tests(c, C.RULE_V3, runs)
    assert images["n"] == 6 and images["not_paired"] == [0]


@pytest.mark.parametrize("equal_people", [False, True])
def test_probe_runs_on_a_tiny_model(toy, tmp_path, equal_people):
    design = C.ProbeDesign("probe-tiny", "scarce", (0, 2), (0, 1), steps=2, val_crops=4,
                           equal_people=equal_people)
    cfg, _ = R.parse_args(toy_args(toy, tmp_path, "--bins", "3", "--teacher-min-bin", "0"))
    data = R.load_data(cfg)
    probe = C.run_probe(cfg, data, torch.device("cpu"), tmp_path, design)
    use = np.array(probe["usefulness"])
    assert use.shape == (2, 3, 2) and probe["points"] == [0, 2]
    assert np.isfinite(use[:, np.array(probe["counts"]) > 0]).all()
    people = [n for n in probe["probed_people"] if n]
    assert len(set(people)) == 1 if equal_people else people == [n for n in probe["counts"] if n]
    assert probe["test"]["bins_differ"] in ("supported", "not supported")
    C.save_probe_figure(probe, tmp_path / "probe.png")
    assert (tmp_path / "probe.png").is_file()


def test_a_probe_cut_off_resumes_after_its_last_point_to_the_same_result(toy, tmp_path,
                                                                         monkeypatch):
    design = C.ProbeDesign("probe-tiny", "scarce", (0, 2, 4), (0, 1), steps=2, val_crops=4,
                           equal_people=True)
    cfg, _ = R.parse_args(toy_args(toy, tmp_path, "--bins", "3", "--teacher-min-bin", "0"))
    data = R.load_data(cfg)

    def probe(out, design=design, cfg=cfg):  # seeded as --probe's start_job seeds it
        R.seed_everything(cfg.seed)
        return C.run_probe(cfg, data, torch.device("cpu"), tmp_path / out, design)
    whole = probe("whole")
    probe_bins, calls = C.bin_usefulness, []

    def cut_at_the_second_point(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return probe_bins(*args)
    monkeypatch.setattr(C, "bin_usefulness", cut_at_the_second_point)
    with pytest.raises(KeyboardInterrupt):
        probe("cut")
    assert not (tmp_path / "cut" / R.LOCK_NAME).exists()
    monkeypatch.setattr(C, "bin_usefulness", probe_bins)
    assert [p["step"] for p in R.load_checkpoint(tmp_path / "cut" / C.PROBE_STATE)["points"]] == [0]
    def same(a, b):  # bins not probed are NaN, which == would not match; wall time is no result
        return json.dumps(a | dict(wall_minutes=0)) == json.dumps(b | dict(wall_minutes=0))
    assert same(probe("cut"), whole)
    assert same(probe("cut"), whole)  # a finished probe's state gives its result again
    with pytest.raises(R.ReproError, match="holds a probe with other settings"):
        probe("cut", design._replace(seeds=(0,)))
    with pytest.raises(R.ReproError, match=rf"--seed {cfg.seed} \(here: {cfg.seed + 1}\)"):
        probe("cut", cfg=R.dataclasses.replace(cfg, seed=cfg.seed + 1))


def test_the_probe_job_writes_its_result_with_its_command_device_and_commit(toy, tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    design = C.ProbeDesign("probe-tiny", "scarce", (0, 2), (0, 1), steps=1, val_crops=4,
                           equal_people=True)
    monkeypatch.setitem(C.PROBES, "v2", design)
    assert C.main(toy_args(toy, tmp_path / "probe", "--bins", "3", "--teacher-min-bin",
                           "0") + ["--probe", "v2"]) == 0
    probe = json.loads((tmp_path / "results" / "probe-tiny.json").read_text())
    assert probe["command"].startswith(f"python {C.PROG} ") and probe["command"].endswith("--probe "
                                                                                         "v2")
    assert (probe["device"] == "cpu" and probe["code"] == R.code_version() and
            probe["wall_minutes"] >= 0)
    assert ((tmp_path / "results" / "probe-tiny.png").is_file() and
            (tmp_path / "probe" / C.PROBE_STATE).is_file())


@pytest.mark.parametrize("keep_bn", [True, False])
# a toy probe's one trajectory leaves its ANOVA no spread to divide by: NaN, with numpy's and
# scipy's warnings
@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore:.*arrays have length 1",
                            "ignore:.*too small")
def test_probe_v3_steps_at_its_fixed_lr_and_reads_with_untouched_batchnorm_statistics(
        toy, tmp_path, monkeypatch, keep_bn):
    design = C.ProbeDesign("probe-tiny", "scarce", (0, 2), (0,), steps=2, val_crops=4,
                           equal_people=True, lr=7e-4, keep_bn=keep_bn)
    cfg, _ = R.parse_args(toy_args(toy, tmp_path, "--bins", "3", "--teacher-min-bin", "0"))
    probing, lrs, moved = [], [], []
    step, usefulness, read = R.Trainer.train_step, C.bin_usefulness, C.val_loss

    def train_step(self, batch, lr):
        if probing:
            lrs.append(lr)
        return step(self, batch, lr)

    def bin_usefulness(trainer, *args):
        keys = C.batchnorm_keys(trainer.model)
        probing.append({k: v.clone() for k, v in trainer.model.state_dict().items() if k in keys})
        try:
            return usefulness(trainer, *args)
        finally:
            probing.clear()

    def val_loss(model, *args):
        if probing:  # every reading inside a probe: are the running statistics the point's own?
            now = model.state_dict()
            moved.append(any(not torch.equal(now[k], v) for k, v in probing[0].items()))
        return read(model, *args)
    monkeypatch.setattr(R.Trainer, "train_step", train_step)
    monkeypatch.setattr(C, "bin_usefulness", bin_usefulness)
    monkeypatch.setattr(C, "val_loss", val_loss)
    probe = C.run_probe(cfg, R.load_data(cfg), torch.device("cpu"), tmp_path / "probe", design)
    probed = sum(n > 0 for n in probe["probed_people"])
    assert len(lrs) == 2 * probed * 2 and set(lrs) == {7e-4}  # points x bins x steps, fixed lr
    # each point reads the loss once before its probes, then once after each bin's steps
    assert len(moved) == 2 * (1 + probed)
    assert (probe["probe_lr"], probe["keep_bn"]) == (7e-4, keep_bn)
    assert sum(moved) == (0 if keep_bn else 2 * probed)  # without keep_bn the probe moves them


def test_probe_v2_pools_are_equal_sized_fixed_subsets():
    pools = [np.arange(2 * n).reshape(n, 2) for n in (40, 7, 100, 33)]
    out = C.probe_pools(pools, 32, equal_people=True)
    assert out[1] is None and [len(q) for q in out if q is not None] == [33, 33, 33]
    assert all(set(map(tuple, q)) <= set(map(tuple, p)) for p,
               q in zip(pools, out) if q is not None)
    again = C.probe_pools(pools, 32, equal_people=True)
    assert all(np.array_equal(a, b) for a, b in zip(out, again) if a is not None)
    assert [len(q) for q in C.probe_pools(pools, 32, equal_people=False) if q is not None] == [40,
                                                                                               100,
                                                                                               33]


def test_the_probes_anova_matches_a_regression_and_reads_both_parts():
    rng = np.random.default_rng(3)
    P, B, S = 5, 4, 6
    noise = rng.normal(0, 0.3, (P, B, S))
    stable = np.linspace(0, 2, B)[None, :, None] + noise
    crossing = np.linspace(-1, 1, P)[:, None, None] * np.linspace(-2, 2, B)[None, :, None] + noise

    def rss(use, interaction):  # an independent F for the interaction: full against additive model
        y = use.reshape(-1)
        p, b = np.meshgrid(np.arange(P), np.arange(B), indexing="ij")
        p, b = np.repeat(p.reshape(-1), S), np.repeat(b.reshape(-1), S)
        cols = [np.ones_like(y)] + [(p == i) * 1.0 for i in range(1, P)] + [(b == j) * 1.0
                                                                            for j in range(1, B)]
        if interaction:
            cols += [((p == i) & (b == j)) * 1.0 for i in range(1, P) for j in range(1, B)]
        X = np.stack(cols, 1)
        return float(((y - X @ np.linalg.lstsq(X, y, rcond=None)[0]) ** 2).sum())

    for use in (stable, crossing):
        full, additive = rss(use, True), rss(use, False)
        f = ((additive - full) / ((P - 1) * (B - 1))) / (full / (P * B * (S - 1)))
        assert C.two_way_anova(use)["f_interaction"] == pytest.approx(f)
    assert C.probe_test(stable) | {} == C.probe_test(stable)  # deterministic bootstrap
    v = C.probe_test(stable)
    assert (v["bins_differ"], v["ranking_changes"]) == ("supported",
                                                        "contradicted") and v["tau_lo"] > 0.6
    v = C.probe_test(crossing)
    assert (v["bins_differ"], v["ranking_changes"]) == ("not supported", "shown")
    v = C.probe_test(noise)
    assert (v["bins_differ"], v["ranking_changes"]) == ("not supported", "not shown")


def test_the_answer_table_reads_each_interval_and_the_report_writes_it_into_the_readme(tmp_path,
                                                                                       monkeypatch):
    def test(verdict, mean, lo, hi):
        return dict(verdict=verdict, mean=mean, lo=lo, hi=hi, n=5, delta=0.003)
    verdicts = {1: dict(better="a", worse="b", verdict="reproduced",
                        per_regime=dict(full=test("reproduced", 0.01, 0.004, 0.016),
                                        scarce=test("inconclusive", 0.001, -0.002, 0.004))),
                4: dict(better="t", worse="u", verdict="contradicted",
                        per_regime=dict(scarce=test("contradicted", -0.01, -0.02, -0.005)))}
    table = C.answer_table(dict(frozen=dict(round2=dict(verdicts={str(k): v for k,
                                                                  v in verdicts.items()})),
                                runs=[], round3=[]))
    rows = {line.split(":")[0].strip("| "): line for line in table.splitlines()
            if line[:3] in ("| 1", "| 2", "| 3", "| 4")}
    assert ("**reproduced** | full +0.0100 [+0.0040, +0.0160] (5); scarce +0.0010 [-0.0020, "
            "+0.0040] (5)") in rows["1"]
    assert ("full: a ahead by 0.004 to 0.016 AP; scarce: cannot tell (-0.002 to +0.004 AP)"
            in rows["1"])
    assert "| **not tested** | - | pending |" in rows["2"]  # no verdict yet
    assert C.WITHDRAWN[3] in rows["3"] and "**not tested**" in rows["3"]
    assert ("**contradicted** for the teacher tested" in rows["4"] and
            "u ahead by 0.005 to 0.020 AP" in rows["4"])
    assert "no finished pairs yet" in table
    decided = dict(key="d", claim=4, read="pairs", decided=True,
                   status="teacher-paper-3000 - uniform-paper-3000: contradicted",
                   tests=[dict(test("contradicted", -0.01, -0.02, -0.005), label="tp - up",
                               better="tp", worse="up")])
    table = C.answer_table(dict(frozen=dict(round2=dict(verdicts={"4": verdicts[4]})), runs=[],
                                round3=[decided]))
    row = next(line for line in table.splitlines() if line.startswith("| 4"))
    assert ("(round 3, stage d) | tp - up -0.0100 [-0.0200, -0.0050] (5) | tp - up: up ahead by "
            "0.005") in row
    assert C.TESTED[4] not in row  # round 2's teacher is not the one stage d tested
    _report_sandbox(tmp_path, monkeypatch)
    (tmp_path / "README.md").write_text(f"intro\n{C.README_MARKERS[0]}\nold\n"
                                        f"{C.README_MARKERS[1]}\nrest\n")
    claims = C.report_protocol()
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    # the answer, not claims.md's table
    assert C.answer_table(claims) in text and "| claim |" not in text


def test_the_v2_table_gives_claim_3_its_two_parts_with_their_tests():
    noise = np.random.default_rng(4).normal(0, 0.3, (5, 4, 6))
    crossing = np.linspace(-1, 1, 5)[:, None, None] * np.linspace(-2, 2, 4)[None, :, None] + noise
    v2 = C.probe_test(crossing)
    differ, changes = C.probe_rows("scarce", "contradicted (probe v1, full)", v2, "6 (6)")
    assert differ.startswith("| 3: bins differ | scarce | contradicted (probe v1, full) | **not "
                             "supported** |")
    assert f"p = {v2['p_bins']:.2g}" in differ and "6 (6)" in differ
    assert f"| **shown** | bin x point interaction F = {v2['f_interaction']:.2f}" in changes
    assert f"tau first-last {v2['tau']:.2f} [{v2['tau_lo']:.2f}, {v2['tau_hi']:.2f}]" in changes
    assert all("**pending**" in row for row in C.probe_rows("scarce", "-", None, "-"))


def test_report_files_agree_and_each_writer_has_its_own_temp_name(tmp_path, monkeypatch):
    _report_sandbox(tmp_path, monkeypatch)
    for stale in ("claims.png", "probe.png"):
        (tmp_path / "results" / stale).write_bytes(b"an older report's figure")
    claims = C.report_protocol()
    assert claims["progress"]["1"]["finished"] == 0
    assert "round 1: 0 of 39" in (tmp_path / "results" / "claims.md").read_text()
    assert (not (tmp_path / "results" / "claims.png").exists() and
            not (tmp_path / "results" / "probe.png").exists())
    target = tmp_path / "x.json"
    with R.atomic_path(target) as a, R.atomic_path(target) as b:  # two --report at once
        assert a != b and a.name.endswith(".tmp") and b.name.endswith(".tmp")
        a.write_text("1")
        b.write_text("2")
    assert target.read_text() == "1" and not list(tmp_path.glob("*.tmp"))


def test_the_report_keeps_each_teacher_update_once_in_its_runs_summary(tmp_path, monkeypatch):
    summary = Path(R.__file__).parent / "results" / "protocol" / "scarce-teacher-3000-s0.json"
    _report_sandbox(tmp_path, monkeypatch)
    shutil.copy(summary, tmp_path / "results" / "protocol")
    C.report_protocol()
    text = (tmp_path / "results" / "claims.json").read_text()
    claims = json.loads(text)
    (run,) = claims["runs"]
    assert len(run["teacher"]["series"]) == run["teacher"]["updates"] == 150
    assert "series" not in claims["teacher"]["scarce/teacher-3000-s0"]
    assert text.count('"series"') == 1 and (tmp_path / "results" / "teacher-vs-probe.png").is_file()


def test_claims_table_keeps_each_devices_minutes_apart():
    runs = [dict(name=f"scarce/real-s{s}", condition="real", regime="scarce", seed=s, steps=800,
                 minutes=m,
                 ap=0.1, ap50=0.3, ap75=0.05, ap_sd=0.005, ap_by_occlusion=None,
                 init="scarce/student",
                 teacher=None, device=d) for s, m,
            d in ((0, 8.0, "cpu"), (1, 0.6, "GPU X"), (2, 0.8, "GPU X"))]
    claims = dict(runs=runs, progress={}, teacher={}, frozen=C.read_frozen(ROOT / C.FROZEN_ROUNDS))
    table = C.claims_table(claims)
    assert "| 0.7 (GPU X), 8.0 (cpu) |" in table  # never the 3.1 of all three averaged
    assert "Where the runs trained: GPU X: scarce seed 1 + seed 2; cpu: scarce seed 0." in table


def test_the_claims_table_parses_no_flags_and_loads_no_checkpoint(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a table row parsed a command line or loaded a checkpoint")

    for name in ("parse_args", "build_parser", "resolve_init", "load_checkpoint"):
        monkeypatch.setattr(R, name, refuse)
    for name in ("parse_args", "load_checkpoint"):  # the script's own bindings of them
        monkeypatch.setattr(C, name, refuse)
    monkeypatch.setattr(R.torch, "load", refuse)
    conditions = ("student", "synthetic-only", "real", "augmented-mask", "synthetic",
                  "synthetic-3000")
    runs = [dict(name=f"scarce/{c}-s0", condition=c, regime="scarce", seed=0, steps=800,
                 minutes=1.0, ap=0.1,
                 ap50=0.3, ap75=0.05, ap_sd=0.005, ap_by_occlusion=None, teacher=None, device="cpu",
                 init=None if c in ("student", "synthetic-only") else
                 "scarce/student") for c in conditions]
    claims = dict(runs=runs, progress={}, teacher={}, frozen=C.read_frozen(ROOT / C.FROZEN_ROUNDS))
    rows = [line.split(" | ") for line in C.claims_table(claims).splitlines()
            if line.startswith("| scarce | ")]
    assert {row[1]: row[2] for row in rows} == {
        "student": "16", "synthetic-only": "0", "real": "16", "augmented-mask": "8",
        "synthetic": "8",
        "uniform (= synthetic's runs)": "8", "synthetic-3000": "8",
        "uniform-3000 (= synthetic-3000's runs)": "8"}


# ---- results/domain-gap/domain_gap.py: one style factor switched at a time ----------------------

def test_domain_gap_runner_end_to_end_and_its_commands_give_its_numbers(tmp_path, monkeypatch,
                                                                        capsys):
    import shlex
    small = {k: dict(v, image_size=64) for k, v in G.GAP_GEOMETRIES.items()}
    cfg, _ = R.parse_args(["--eval-scales", "1.0", "--out", str(tmp_path / "gap"), "--threads",
                           "2"])
    report = G.run_domain_gap(cfg, 2, torch.device("cpu"), factors=("lighting",),
                              argv=["--domain-gap", "2"], geometries=small)
    names = [r["name"] for r in report["sets"]]
    assert names == ["synthetic", "synthetic-lighting", "synthetic-geometry", "standin",
                     "standin-lighting", "standin-geometry"]
    saved = json.loads((tmp_path / "gap" / "domain-gap.json").read_text())
    assert saved["sets"] == json.loads(json.dumps(report["sets"])) and saved["rule"] == G.GAP_RULE
    md = (tmp_path / "gap" / "domain-gap.md").read_text()
    assert (G.GAP_RULE in md and md.count("| standin-") == 2 and
            not list((tmp_path / "gap").glob("*.tmp")))
    rows = {r["name"]: r for r in report["sets"]}
    assert (rows["standin-lighting"]["style_factors"] == ["lighting=synthetic"] and
            "dAP" not in rows["standin"])
    assert rows["standin-lighting"]["dAP"] == pytest.approx(
        rows["standin-lighting"]["AP"] - rows["standin"]["AP"])
    assert rows["standin"]["images"] == 2 and rows["standin"]["people"] >= 2
    # the json's two commands for a set give that set's images and AP on their own
    render, evaluate = rows["synthetic-lighting"]["commands"]
    folder = Path(rows["synthetic-lighting"]["folder"])
    argv = shlex.split(render)[2:]
    argv[0] = str(tmp_path / "again")
    rh.main(argv)
    assert ((tmp_path / "again/annotations.json").read_bytes() ==
            (folder / "annotations.json").read_bytes())
    argv = shlex.split(evaluate)[2:] + ["--threads", "2"]
    assert R.main(argv) == 0
    stats = json.loads((folder / "eval" / "eval-annotations.json").read_text())
    assert stats["AP"] == pytest.approx(rows["synthetic-lighting"]["AP"])


def test_domain_gap_reading_follows_the_rule():
    draws = np.zeros(200)
    rows = {"synthetic": dict(AP=0.03, _draws=draws), "standin": dict(AP=0.28, _draws=draws)}
    spread = np.random.default_rng(0).normal(0, 0.01, 200)  # paired sd 0.01

    def word(style, ap, switched="yaw"):
        return G.gap_reading(dict(style=style, switched=switched), dict(AP=ap, _draws=spread),
                             rows)["reading"]

    # +0.03, over 2 sd towards the stand-in
    assert word("synthetic", 0.06) == "carries part of the gap"
    assert word("synthetic", 0.045) == "no measured effect"       # +0.015: within 2 sd
    assert word("synthetic", 0.0) == "works against the gap"
    # towards the synthetic style: down
    assert word("standin", 0.20) == "carries part of the gap"
    assert word("standin", 0.32) == "works against the gap"
    assert word("synthetic", 0.27, "all") == "covers the style"
    assert word("synthetic", 0.15, "all") == "does not cover the style"
    share = G.gap_reading(dict(style="standin", switched="yaw"), dict(AP=0.155, _draws=spread),
                          rows)["share"]
    assert share == pytest.approx(0.5)


def test_domain_gap_bad_input_is_one_line(capsys, tmp_path):
    assert "N >= 1" in run_main_error(capsys, ["--domain-gap", "0", "--out", str(tmp_path / "g")])
    assert "checkpoint not found" in run_main_error(capsys,
                                                    ["--domain-gap", "2", "--ckpt",
                                                     str(tmp_path / "no.pt"),
                                                             "--out", str(tmp_path / "g")])
    assert not (tmp_path / "g").exists()


# ---- results/speed/speed.py: the GPU report, targets against the peer's --------------------------

def test_gpu_report_parts_flops_per_image_and_the_childs_data_flags(toy, tmp_path):
    """The device report's pieces that can silently go wrong on a CPU: FLOPs are per image (the
    same at batch 2 and 4, forward + backward about 3x the forward), a torchrun child gets this
    run's data, and the peak table reads the names torch reports."""
    cfg, _ = R.parse_args(toy_args(toy, tmp_path / "x", "--mode", "real"))
    trainer = R.Trainer(cfg, R.load_data(cfg), torch.device("cpu"), tmp_path)
    rng = np.random.default_rng(0)
    batches = [trainer.maker.batch(trainer.maker.plan(n, rng), rng) for n in (2, 4)]
    per_image = [S.train_flops_per_image(trainer, b) for b in batches]
    assert per_image[0] == pytest.approx(per_image[1], rel=1e-6) and per_image[0] > 0
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        trainer.model(R.to_input(batches[0].image, torch.device("cpu")))
    assert 2.5 < per_image[0] * 2 / forward.get_total_flops() < 3.5
    child, _ = R.parse_args(S.data_argv(cfg))
    data_flags = ("train_json", "val_images", "synthetic_json", "bank_json")
    assert all(getattr(child, f) == getattr(cfg, f) for f in data_flags)
    assert [S.bf16_peak_tflops(torch.device("cpu"))] == [("cpu", None)]
    assert [p for part, p in S.GPU_BF16_PEAK_TFLOPS if part in "NVIDIA H100 PCIe"][0] == 756.0


def test_the_peers_targets_as_reimplemented_for_the_bench():
    """The side-by-side timing compares like with like: for lone joints the peer's Gaussians are
    ours, and its PAF points along the limb."""
    kp = torch.zeros(1, 1, 18, 3)
    # 40 px apart
    kp[0, 0, 5], kp[0, 0, 7] = torch.tensor([41.5, 61.5, 2]), torch.tensor([81.5, 61.5, 2])
    heat, paf = S.peer_targets(kp[0].numpy(), 128, 4, 5.0, 1.25, R.COCO.limbs)
    assert np.allclose(heat, R.heatmap_targets(kp, 128, 4, 5.0)[0].numpy(),
                       atol=1e-6) and heat[5].max() > 0.9
    limb = [i for i, (a, b) in enumerate(R.COCO.limbs) if (a, b) == (5, 7)][0]
    assert (paf[2 * limb, 15, 11:20] == 1).all() and paf[2 * limb + 1].max() == 0
    assert np.abs(np.delete(paf, [2 * limb, 2 * limb + 1], 0)).max() == 0


def test_bench_targets_times_ours_and_the_peers_on_the_same_people(toy, capsys):
    cfg, _ = R.parse_args(toy_data_args(toy))
    threads = torch.get_num_threads()
    figures = S.bench_targets(cfg, R.load_data(cfg), people=(1, 3), batch=2)
    assert torch.get_num_threads() == threads  # timed on one thread, then given back
    assert set(figures) == {f"{g}_{n}_people" for g in ("demo", "paper") for n in (1, 3)}
    assert all(v > 0 for row in figures.values() for v in row.values())
    assert "paper geometry (368 px, stride 8, sigma 7.0" in capsys.readouterr().out
