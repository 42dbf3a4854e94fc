"""Tests for the reproduction (CPU only; run with `python -m pytest -x -q test_repro.py`)."""
import errno
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"

import repro as R  # noqa: E402

# ==============================================================================================
# Renderer (render_humans.py)
# ==============================================================================================
import render_humans as rh  # noqa: E402

TINY = dict(image_size=96, mean_people=2.0, min_people=2, camera_distance=(9.0, 0.1), progress=False)


@pytest.fixture(scope="module")
def gl():
    """Body model and GL context, loaded once; skip (with the reason) where headless GL is missing."""
    try:
        rh.get_renderer()
    except rh.RenderError as e:
        pytest.skip(f"no headless OpenGL: {e}")
    return rh.get_body_model("anny", None)


@pytest.fixture(scope="module")
def scenes(gl, tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    ann = rh.render_dataset(out, num_images=3, seed=1, **{**TINY, "image_size": 160, "mean_people": 4.0})
    return out, json.loads(ann.read_text())


def _two_people(body, behind: float, shift_x: float = 0.0, size: int = 128):
    """Two identical people facing the camera, the second `behind` metres further back."""
    cfg = rh.RenderConfig(style="standin")
    rng = np.random.default_rng(0)
    shape, world, _, albedo = rh.sample_people(body, rng, 1, cfg)
    world[:] = rh.canonical_fk(rh.angles_to_local(rh._pose_angles(np.random.default_rng(0), "stand")[None]))
    verts, kps = rh.build_people(body, np.repeat(shape, 2, 0), np.repeat(world, 2, 0), np.zeros(2))
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
        assert len(a["keypoints"]) == 51 and a["num_keypoints"] == sum(v > 0 for v in a["keypoints"][2::3])
        assert isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0
        for k in ("min_dist", "camera_angle", "visibility_ratio", "truncation", "scale", "num_people"):
            assert k in a
    for im in coco["images"]:
        assert (out / "images" / im["file_name"]).is_file()
    dets = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
            for a in coco["annotations"]]
    ev = COCOeval(gt, gt.loadRes(dets), "keypoints")
    ev.evaluate(); ev.accumulate(); ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_visible_keypoints_lie_on_their_persons_silhouette(scenes):
    from pycocotools import mask as mask_utils

    _, coco = scenes
    n_visible = 0
    for a in coco["annotations"]:
        m = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
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
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
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
    with pytest.raises(SystemExit) as e:
        rh.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("render_humans: error: ") and "\n" not in msg
    return msg


def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert "SMPL_NEUTRAL.pkl" in _main_error([str(out), "--body-model", "smpl"], capsys)
    assert "smplx/SMPLX_NEUTRAL.npz" in _main_error(
        [str(out), "--body-model", "smplx", "--model-path", str(tmp_path)], capsys)
    assert "does not exist" in _main_error([str(out), "--backgrounds", str(tmp_path / "nope")], capsys)
    (tmp_path / "empty").mkdir()
    assert "no images" in _main_error([str(out), "--backgrounds", str(tmp_path / "empty")], capsys)
    (tmp_path / "bvh").mkdir()
    (tmp_path / "bvh" / "broken.bvh").write_text("HIERARCHY\nROOT Hips\n{ OFFSET 0 0 0\n")
    assert "broken.bvh" in _main_error([str(out), "--poses", str(tmp_path / "bvh")], capsys)
    assert not out.exists()
    r = subprocess.run([sys.executable, str(ROOT / "render_humans.py"), str(out), "--body-model", "smplh",
                        "--model-path", str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "render_humans: error:" in r.stderr
    assert not out.exists()


def test_help_explains_every_flag():
    r = subprocess.run([sys.executable, str(ROOT / "render_humans.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    flags = set(__import__("re").findall(r"--[a-z][a-z-]+", r.stdout))
    assert {"--kind", "--num-images", "--style", "--image-size", "--mean-people", "--min-people",
            "--camera-distance", "--seed", "--backgrounds", "--poses", "--body-model", "--model-path",
            "--workers", "--num-shards", "--shard", "--bench", "--grid"} <= flags
    assert all(a.help and len(a.help) > 10 for a in rh.build_parser()._actions)


def test_smpl_pickles_load_without_chumpy(tmp_path):
    import scipy.sparse

    fake = types.ModuleType("chumpy"); fake_ch = types.ModuleType("chumpy.ch")

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


def _fake_smpl(root: Path):
    """A stick-figure stand-in with SMPL's array layout (6890 vertices, 24 joints), for smoke tests."""
    par = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]
    J = np.array([[0, .9, 0], [.08, .82, 0], [-.08, .82, 0], [0, 1.0, 0], [.1, .45, 0], [-.1, .45, 0], [0, 1.15, 0],
                  [.1, .08, 0], [-.1, .08, 0], [0, 1.25, 0], [.1, .02, .12], [-.1, .02, .12], [0, 1.45, 0],
                  [.08, 1.38, 0], [-.08, 1.38, 0], [0, 1.6, .02], [.18, 1.4, 0], [-.18, 1.4, 0], [.45, 1.4, 0],
                  [-.45, 1.4, 0], [.7, 1.4, 0], [-.7, 1.4, 0], [.78, 1.4, 0], [-.78, 1.4, 0]])
    V, rng = 6890, np.random.default_rng(0)
    owner = np.arange(V) % 24
    Jr = np.zeros((24, V)); Jr[owner, np.arange(V)] = 1; Jr /= Jr.sum(1, keepdims=True)
    W = np.zeros((V, 24)); W[np.arange(V), owner] = 1
    data = dict(v_template=J[owner] + rng.normal(0, 0.04, (V, 3)), shapedirs=rng.normal(0, 1e-3, (V, 3, 10)),
                posedirs=np.zeros((V, 3, 207)), J_regressor=Jr, weights=W,
                kintree_table=np.array([[2**32 - 1 if p < 0 else p for p in par], list(range(24))]),
                f=np.array([[i, i + 24, i + 48] for i in range(V - 48)]))
    (root / "smpl").mkdir(parents=True)
    (root / "smpl" / "SMPL_NEUTRAL.pkl").write_bytes(pickle.dumps(data, protocol=2))


def test_smpl_body_model_path_renders(gl, tmp_path):
    _fake_smpl(tmp_path / "models")
    ann = rh.render_dataset(tmp_path / "out", num_images=1, body_model="smpl", model_path=tmp_path / "models",
                            **{**TINY, "image_size": 64})
    coco = json.loads(ann.read_text())
    assert coco["images"] and all(len(a["keypoints"]) == 51 for a in coco["annotations"])


# ==============================================================================================
# repro.py: targets, flips, masks, compositing, grouping, evaluation, training regimes
# ==============================================================================================
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]

# A standing stick figure in a 1 x 2 box (x right, y down), COCO order.
TEMPLATE = np.array([[0.5, 0.14], [0.58, 0.08], [0.42, 0.08], [0.66, 0.12], [0.34, 0.12], [0.72, 0.3], [0.28, 0.3],
                     [0.74, 0.52], [0.26, 0.52], [0.78, 0.74], [0.22, 0.74], [0.6, 0.98], [0.4, 0.98],
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
            kp = stick_figure(rng, h) + [j * size / count + rng.uniform(0, size / count - h / 2), rng.uniform(0, size - h)]
            draw_figure(img, kp, tuple(int(c) for c in rng.integers(120, 255, 3)))
            full = np.concatenate([kp, np.full((17, 1), 2, np.float32)], 1)
            x0, y0 = kp.min(0)
            x1, y1 = kp.max(0)
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=1, iscrowd=0, num_keypoints=17,
                             keypoints=full.flatten().tolist(), bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                             area=float((x1 - x0) * (y1 - y0)), min_dist=float(rng.uniform(0, size)),
                             camera_angle=float(rng.uniform(0, 37))))
        if crowd:
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=1, iscrowd=1, num_keypoints=0,
                             keypoints=[0] * 51, bbox=[0, 0, 20, 20], area=400.0,
                             segmentation=[[0, 0, 20, 0, 20, 20, 0, 20]]))
        cv2.imwrite(str(root / "images" / f"{i:04d}.jpg"), img)
        images.append(dict(id=i + 1, file_name=f"{i:04d}.jpg", width=size, height=size))
    categories = [dict(id=1, name="person", supercategory="person", keypoints=list(R.COCO_KEYPOINTS),
                       skeleton=rh.COCO_SKELETON)]
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
        images.append(dict(id=i + 1, file_name=f"{i:04d}.png", width=rgba.shape[1], height=rgba.shape[0]))
        anns.append(dict(id=i + 1, image_id=i + 1, category_id=1, iscrowd=0, num_keypoints=17,
                         keypoints=full.flatten().tolist(), bbox=[0, 0, rgba.shape[1], rgba.shape[0]], area=1.0))
    path = root / "annotations.json"
    path.write_text(json.dumps(dict(images=images, annotations=anns, categories=[dict(id=1, name="person")])))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return dict(train=write_toy_set(root / "train", 6, seed=0, crowd=True), val=write_toy_set(root / "val", 3, seed=1),
                synthetic=write_toy_set(root / "synthetic", 6, people=(2, 4), seed=2), bank=write_toy_bank(root / "bank"))


def toy_data_args(toy):
    return ["--train-json", str(toy["train"]), "--train-images", str(toy["train"].parent / "images"),
            "--val-json", str(toy["val"]), "--val-images", str(toy["val"].parent / "images"),
            "--synthetic-json", str(toy["synthetic"]), "--bank-json", str(toy["bank"])]


def toy_args(toy, out, *extra):
    return toy_data_args(toy) + [
            "--out", str(out), "--batch-size", "4", "--input-size", "64", "--width", "16", "--stages", "2",
            "--eval-height", "64", "--eval-scales", "1.0", "--log-every", "1", "--threads", "2", *extra]


def toy_config(**kw):
    cfg, _ = R.parse_args(["--input-size", "64", "--batch-size", "4"])
    return R.dataclasses.replace(cfg, **kw)


def perfect_results(kset, cfg):
    """Grid maps built from the ground truth, decoded exactly as network output would be."""
    results = []
    for rec in kset.records:
        base = cfg.eval_height / rec.height
        hb, wb = round(rec.height * base), round(rec.width * base)
        kp = torch.as_tensor(rec.keypoints).clone()
        kp[..., :2] = (kp[..., :2] + 0.5) * base - 0.5
        size = (hb + (-hb % cfg.stride), wb + (-wb % cfg.stride))
        grid = torch.cat([R.paf_targets(kp[None], size, cfg.stride, cfg.paf_width),
                          R.heatmap_targets(kp[None], size, cfg.stride, cfg.sigma)], 1)
        results += R.coco_results(rec.image_id, R.decode_maps(R.upsample_maps(grid, cfg.stride, (hb, wb))[0], base))
    return R.coco_eval(kset.json_path, results, [r.image_id for r in kset.records])


# ---- targets, grouping and evaluation pinned together -----------------------------------------

@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_perfect_maps_give_ap_1(toy, preset):
    cfg, _ = R.parse_args(["--preset", preset])
    kset = R.load_keypoint_set(toy["train"], toy["train"].parent / "images")
    stats = perfect_results(kset, cfg)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)


@pytest.mark.skipif(not (SHARED / "real/coco").is_dir(), reason="../shared/data/real/coco is absent")
def test_perfect_maps_on_real_coco_fixture():
    """Real COCO people: 0.99, not 1.0, because one person's wrist is labelled while its elbow is not:
    an orphan joint no tree-structured grouping (OpenPose's) can attach."""
    kset = R.load_keypoint_set(SHARED / "real/coco/test_coco.json", SHARED / "real/coco")
    cfg, _ = R.parse_args(["--preset", "paper"])
    stats = perfect_results(kset, cfg)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP"] >= 0.985


def test_heatmap_and_paf_values():
    kp = torch.zeros(1, 1, 18, 3)
    kp[0, 0, 5] = torch.tensor([9.5, 21.5, 2])  # left shoulder on a cell centre (stride 4: 4i + 1.5)
    kp[0, 0, 7] = torch.tensor([29.5, 21.5, 2])  # left elbow 20 px to its right
    heat = R.heatmap_targets(kp, 64, 4, sigma=3.0)
    assert heat.shape == (1, 19, 16, 16)
    cell = lambda x: round((x - 1.5) / 4)
    assert heat[0, 5, cell(21.5), cell(9.5)] == pytest.approx(1.0) and heat[0, 0].max() == 0
    assert heat[0, 18, cell(21.5), cell(9.5)] == pytest.approx(0.0)  # background = 1 - max over parts
    # truncated where the Gaussian drops below 0.01 (paper code)
    d = (R.grids(64, 4)[1] - 9.5).abs()
    assert torch.all((heat[0, 5, cell(21.5)] > 0) == (torch.exp(-d ** 2 / 18) >= 0.01))
    paf = R.paf_targets(kp, 64, 4, width=2.0)
    limb = [i for i, (a, b) in enumerate(R.LIMBS) if (a, b) == (5, 7)][0]
    px, py = paf[0, 2 * limb], paf[0, 2 * limb + 1]
    assert px[cell(21.5), cell(9.5):cell(29.5) + 1].min() == pytest.approx(1.0) and py.abs().max() == 0
    assert px[cell(21.5) + 2].abs().max() == 0  # 8 px off the limb, width 2
    assert paf[0, :2 * limb].abs().max() == 0


def test_paf_averages_overlapping_people():
    kp = torch.zeros(1, 2, 18, 3)
    kp[0, 0, 5], kp[0, 0, 7] = torch.tensor([1.5, 9.5, 2]), torch.tensor([29.5, 9.5, 2])  # pointing right
    kp[0, 1, 5], kp[0, 1, 7] = torch.tensor([13.5, 1.5, 2]), torch.tensor([13.5, 29.5, 2])  # pointing down
    paf = R.paf_targets(kp, 32, 4, width=2.0)
    limb = [i for i, (a, b) in enumerate(R.LIMBS) if (a, b) == (5, 7)][0]
    vec = paf[0, 2 * limb:2 * limb + 2, 2, 3]  # cell (3, 2) = pixel (13.5, 9.5), on both limbs
    assert torch.allclose(vec, torch.tensor([0.5, 0.5]))


# ---- flips ------------------------------------------------------------------------------------

def test_flip_of_targets_equals_targets_of_flipped_keypoints():
    rng = np.random.default_rng(0)
    size, stride = 64, 4
    kp = np.zeros((2, 3, 18, 3), np.float32)
    kp[..., :2] = rng.uniform(0, size - 1, (2, 3, 18, 2))
    kp[..., 2] = rng.choice([0, 1, 2], (2, 3, 18))
    flipped = kp[:, :, R.FLIP_PARTS].copy()
    flipped[..., 0] = size - 1 - flipped[..., 0]
    targets = lambda k: torch.cat([R.paf_targets(torch.as_tensor(k), size, stride, 3.0),
                                   R.heatmap_targets(torch.as_tensor(k), size, stride, 2.5)], 1)
    assert torch.allclose(R.flip_maps(targets(kp)), targets(flipped), atol=1e-5)


def test_flip_swaps_left_and_right():
    names = R.PARTS
    for i, j in enumerate(R.FLIP_PARTS):
        assert names[j] == names[i].replace("left", "#").replace("right", "left").replace("#", "right")
    for (a, b), k in zip(R.LIMBS, R.FLIP_LIMBS):
        assert tuple(R.LIMBS[k]) == (R.FLIP_PARTS[a], R.FLIP_PARTS[b])


def test_flipped_crop_mirrors_image_and_keypoints(toy):
    kset = R.load_keypoint_set(toy["train"], toy["train"].parent / "images")
    rec, image = kset.records[0], kset.image(0)
    plain = R.crop_person(image, None, rec, 0, toy_config(flip_prob=0.0), np.random.default_rng(3))
    mirrored = R.crop_person(image, None, rec, 0, toy_config(flip_prob=1.0), np.random.default_rng(3))
    assert np.abs(mirrored.image.astype(int) - plain.image[:, ::-1].astype(int)).mean() < 1.0
    expect = plain.keypoints[:, R.FLIP_PARTS].copy()
    expect[..., 0] = 63 - expect[..., 0]
    assert np.allclose(mirrored.keypoints, expect, atol=1e-3)


# ---- loss masks and compositing ---------------------------------------------------------------

def grad_of_loss(cfg, keypoints, pasted, mask_miss):
    target, mask = R.make_targets(keypoints, pasted, mask_miss, cfg)
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
    own = torch.cat([R.paf_targets(pasted, 64, 4, cfg.paf_width), R.heatmap_targets(pasted, 64, 4, cfg.sigma)], 1)
    paf_mag = own[:, :R.NUM_PAF].reshape(1, R.NUM_LIMBS, 2, 16, 16).norm(dim=2).repeat_interleave(2, 1)
    under = torch.cat([paf_mag > 0.25, own[:, R.NUM_PAF:-1] > 0.25, own[:, R.NUM_PAF:-1].amax(1, keepdim=True) > 0.25], 1)
    assert under.sum() > 50 and g[under].abs().max() == 0
    assert g[:, -1][under[:, -1]].numel() > 0  # the background channel is masked too
    # ... while include mode supervises them: their targets are drawn, as if they were real people
    include = R.dataclasses.replace(cfg, synthetic_loss="include")
    g_inc, target_inc, mask_inc = grad_of_loss(include, real, pasted, ignore)
    assert g_inc[under].abs().max() > 0 and (mask_inc == 1).all()
    assert torch.equal(target_inc, R.make_targets(torch.cat([real, pasted], 1), pasted[:, :0], ignore, cfg)[0])


def test_crowd_and_unlabelled_regions_get_zero_loss(toy):
    kset = R.load_keypoint_set(toy["train"], toy["train"].parent / "images")
    rec = kset.records[0]
    assert rec.ignore_rles, "the crowd annotation goes into the ignore mask"
    mask = R.mask_miss(rec)
    assert (mask[:20, :20] == 0).all() and mask[40:, 40:].min() == 255
    cfg = toy_config(input_size=128)
    keypoints = torch.as_tensor(rec.keypoints[None])
    g, _, m = grad_of_loss(cfg, keypoints, keypoints[:, :0], torch.as_tensor(mask[None]))
    assert g[..., :4, :4].abs().max() == 0 and m[..., :4, :4].max() == 0  # cells inside the crowd box
    assert g[..., 10:, 10:].abs().max() > 0


def test_person_without_keypoints_goes_into_mask_miss(tmp_path):
    path = write_toy_set(tmp_path, 1, people=(1, 1))
    data = json.loads(path.read_text())
    data["annotations"].append(dict(id=99, image_id=1, category_id=1, iscrowd=0, num_keypoints=0, keypoints=[0] * 51,
                                    bbox=[100, 100, 20, 20], area=400.0, segmentation=[[100, 100, 120, 100, 120, 120, 100, 120]]))
    path.write_text(json.dumps(data))
    rec = R.load_keypoint_set(path, tmp_path / "images").records[0]
    assert len(rec.keypoints) == 1 and (R.mask_miss(rec)[105:115, 105:115] == 0).all()


def test_pasted_person_occludes_real_keypoints(toy):
    bank = R.load_keypoint_set(toy["bank"], toy["bank"].parent / "images")
    bank.preload()
    cfg = toy_config(input_size=64, paste_mean=0.0, paste_min=8, scale_range=(1.5, 1.6))
    rng = np.random.default_rng(0)
    kp = np.zeros((1, 18, 3), np.float32)
    kp[0, :, :2] = rng.uniform(0, 63, (18, 2))
    kp[0, :, 2] = 2
    sample = R.Sample(np.zeros((64, 64, 3), np.uint8), kp, np.zeros((0, 18, 3), np.float32), np.full((64, 64), 255, np.uint8))
    out = R.paste_people(sample, bank, cfg, rng)
    # The real crop is black and pasted people are (200, 60, 60): brightness says how opaque they are.
    xy = np.round(kp[0, :, :2]).astype(int)
    opacity = out.image.max(-1)[xy[:, 1], xy[:, 0]] / 200
    under, clear = opacity > 0.55, opacity < 0.45
    assert under.any() and clear.any()
    assert (out.keypoints[0, under, 2] == 1).all() and (out.keypoints[0, clear, 2] == 2).all()
    assert len(out.pasted) == 8 and (out.pasted[..., 2] > 0).any()


# ---- training regimes -------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["real", "synthetic", "augmented"])
def test_loss_falls_on_a_repeated_batch(toy, tmp_path, mode, device):
    cfg, _ = R.parse_args(toy_args(toy, tmp_path, "--mode", mode, "--lr", "3e-3", "--device", device))
    data = R.load_data(cfg)
    trainer = R.Trainer(cfg, data, torch.device(device), tmp_path)
    specs = trainer.maker.plan(4, np.random.default_rng(0))
    batch = trainer.maker.batch(specs, np.random.default_rng(0))
    losses = [trainer.train_step(batch, cfg.lr)["loss"] for _ in range(25)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])


def test_cpu_mixed_precision_only_where_the_cpu_has_native_bf16():
    layer = torch.nn.Linear(4, 4)
    with R.autocast(torch.device("cpu"), R.Config()):
        out = layer(torch.randn(2, 4))
    assert out.dtype == (torch.bfloat16 if R.cpu_has_native_bf16() else torch.float32)
    assert layer.weight.dtype == torch.float32  # autocast: the weights (and Adam's state) stay float32
    with R.autocast(torch.device("cpu"), R.Config(amp=False)):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    assert R.precision(torch.device("cpu"), R.Config(amp=False)) == "float32"


@pytest.mark.parametrize("mode", ["real", "synthetic", "augmented"])
def test_each_mode_runs_end_to_end(toy, tmp_path, mode):
    out = tmp_path / mode
    assert R.main(toy_args(toy, out, "--mode", mode, "--steps", "3")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and 0.0 <= metrics["AP"] <= 1.0
    assert (out / "config.json").is_file() and (out / "curves.png").is_file() and (out / "predictions.png").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # 3 steps + the final evaluation


def interrupt_at_step(monkeypatch, stop):
    """Makes the training loop die (like a killed job) when it reaches step `stop`."""
    real_step = R.Trainer.train_step

    def step(self, batch, lr):
        if self.step == stop:
            raise KeyboardInterrupt
        return real_step(self, batch, lr)
    monkeypatch.setattr(R.Trainer, "train_step", step)


def test_resume_gives_the_same_weights(toy, tmp_path, monkeypatch):
    common = ("--mode", "augmented", "--steps", "6", "--ckpt-every", "3")
    assert R.main(toy_args(toy, tmp_path / "straight", *common)) == 0
    with monkeypatch.context() as m:
        interrupt_at_step(m, 5)  # step 4 is logged after the step-3 checkpoint, then the run dies
        assert R.main(toy_args(toy, tmp_path / "stopped", *common)) == 130
    assert torch.load(tmp_path / "stopped/ckpt.pt", weights_only=False)["step"] == 3
    assert R.main(toy_args(toy, tmp_path / "stopped", *common, "--resume")) == 0
    a = torch.load(tmp_path / "straight/ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "stopped/ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    def logged(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged("stopped")] == [r["step"] for r in logged("straight")]  # nothing twice
    # the logging window is in the checkpoint: the line after a resume averages the same steps
    assert [r.get("loss") for r in logged("stopped")] == [r.get("loss") for r in logged("straight")]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_eval_mode_and_init(toy, tmp_path):
    assert R.main(toy_args(toy, tmp_path / "run", "--mode", "real", "--steps", "2")) == 0
    ckpt = tmp_path / "run/ckpt.pt"
    assert R.main(toy_args(toy, tmp_path / "eval", "--mode", "eval", "--ckpt", str(ckpt))) == 0
    assert "AP" in json.loads((tmp_path / "eval" / f"eval-annotations.json").read_text())
    cfg, _ = R.parse_args(toy_args(toy, tmp_path / "x", "--mode", "augmented", "--init", str(ckpt)))
    saved = torch.load(ckpt, weights_only=False)["model"]
    started = R.Trainer(cfg, R.load_data(cfg), torch.device("cpu"), tmp_path / "x").model.state_dict()
    assert all(torch.equal(started[k], saved[k]) for k in saved)  # --init weights, not a fresh net
    assert R.main(toy_args(toy, tmp_path / "ft", "--mode", "augmented", "--steps", "1", "--init", str(ckpt))) == 0
    assert R.main(["--compare", str(tmp_path / "run"), str(tmp_path / "ft"), "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").is_file() and "| ft |" in (tmp_path / "cmp.md").read_text()


# ---- real-format fixtures -----------------------------------------------------------------------

@pytest.mark.parametrize("name,json_name", [("coco", "test_coco.json"), ("ochuman", "test_ochuman.json")])
def test_real_fixtures_load_and_evaluate(tmp_path, name, json_name):
    root = SHARED / "real" / name
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    kset = R.load_keypoint_set(root / json_name, root)
    assert len(kset.records) >= 3 and all(r.keypoints.shape[1:] == (18, 3) for r in kset.records)
    cfg, _ = R.parse_args(["--input-size", "64", "--width", "16", "--stages", "1", "--eval-height", "96",
                           "--eval-scales", "1.0"])
    stats, _ = R.evaluate(R.build_model(cfg), kset, cfg, torch.device("cpu"), progress=False)
    assert set(R.STAT_NAMES) <= set(stats) and stats["images"] == len(kset.records)


# ---- bad input: one clear line, non-zero exit -------------------------------------------------

def run_main_error(capsys, argv):
    capsys.readouterr()
    assert R.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("repro.py: error:"), err
    return err[0]


def test_missing_coco_root(capsys, tmp_path):
    assert "does not exist" in run_main_error(capsys, ["--mode", "real", "--coco-root", str(tmp_path / "nope")])


def test_json_without_keypoints(capsys, tmp_path, toy):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(images=[dict(id=1, file_name="a.jpg", width=8, height=8)],
                                   annotations=[dict(id=1, image_id=1, category_id=1, bbox=[0, 0, 1, 1], area=1)],
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


def test_checkpoint_of_another_architecture(capsys, tmp_path, toy):
    assert R.main(toy_args(toy, tmp_path / "run", "--mode", "real", "--steps", "1")) == 0
    argv = toy_args(toy, tmp_path / "other", "--mode", "real", "--steps", "1", "--init", str(tmp_path / "run/ckpt.pt"))
    argv[argv.index("--width") + 1] = "24"
    assert "another architecture" in run_main_error(capsys, argv)


def test_existing_run_is_not_overwritten(capsys, tmp_path, toy):
    assert R.main(toy_args(toy, tmp_path / "run", "--mode", "real", "--steps", "1")) == 0
    assert "--resume" in run_main_error(capsys, toy_args(toy, tmp_path / "run", "--mode", "real", "--steps", "1"))


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


def test_steps_0_says_it_evaluates_the_start(toy, tmp_path, capsys):
    assert R.main(toy_args(toy, tmp_path / "run", "--mode", "real", "--steps", "0")) == 0
    assert "--steps 0: no training" in capsys.readouterr().out
    assert json.loads((tmp_path / "run/metrics.json").read_text())["steps"] == 0


def test_bad_init_leaves_no_run_folder(capsys, tmp_path, toy):
    out = tmp_path / "run"
    assert "checkpoint not found" in run_main_error(capsys, toy_args(toy, out, "--mode", "real", "--init",
                                                                      str(tmp_path / "missing.pt")))
    assert not out.exists()


def test_read_only_run_folder_gives_one_line(capsys, tmp_path, toy, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))
    monkeypatch.setattr(R.Path, "mkdir", refuse)
    out = tmp_path / "run"
    assert "Read-only file system" in run_main_error(capsys, toy_args(toy, out, "--mode", "real", "--steps", "1"))
    assert not out.exists()


def test_full_disk_while_checkpointing_leaves_no_partial_file(capsys, tmp_path, toy, monkeypatch):
    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(R.torch, "save", full_disk)
    out = tmp_path / "run"
    assert "No space left" in run_main_error(capsys, toy_args(toy, out, "--mode", "real", "--steps", "2"))
    assert not list(out.glob("*.tmp")) and not (out / "ckpt.pt").exists()
    assert not (out / R.LOCK_NAME).exists()  # the folder is released


def test_a_second_run_into_a_held_folder_is_refused(capsys, tmp_path, toy):
    out = tmp_path / "run"
    out.mkdir()
    with subprocess.Popen(["sleep", "60"]) as other:  # a live process holds the folder
        (out / R.LOCK_NAME).write_text(str(other.pid))
        assert "in use by another run" in run_main_error(capsys, toy_args(toy, out, "--mode", "real", "--steps", "1"))
        other.kill()
    assert not (out / "metrics.jsonl").exists()
    # its process is gone: the lock is stale, the next run takes the folder over and releases it
    assert R.main(toy_args(toy, out, "--mode", "real", "--steps", "1")) == 0
    assert not (out / R.LOCK_NAME).exists()


def test_peak_hit_signal():
    kp = torch.zeros(1, 1, 18, 3)
    kp[0, 0, :, :2] = torch.tensor([29.5, 29.5])
    kp[0, 0, :2, 2] = 2
    heat = R.heatmap_targets(kp, 64, 4, 2.5)
    assert R.peak_hits(heat, kp, 4) == (2, 2)
    assert R.peak_hits(torch.roll(heat, 3, -1), kp, 4) == (0, 2)  # peaks 3 cells away
    assert R.peak_hits(heat * 0.05, kp, 4) == (0, 2)  # below the threshold


# ---- the teacher ------------------------------------------------------------------------------

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


def test_bins_follow_the_paper_edges():
    low, width = R.bin_edges("min_dist", np.array([1.0]), 10, 640)
    assert (low, round(width, 1)) == (0.0, 71.1)
    assert list(R.assign_bins(np.array([0, 71.0, 71.2, 600, 900]), low, width, 10)) == [0, 0, 1, 8, 9]
    low, width = R.bin_edges("camera_angle", np.array([1.0]), 10, 640)
    assert (low, round(low + 9 * width, 2)) == (3.68, 29.70)
    low, width = R.bin_edges("scale", np.array([2.0, 4.0, 12.0]), 10, 640)
    assert (low, width) == (2.0, 1.0)


def teacher_setup(toy, tmp_path, *extra):
    cfg, _ = R.parse_args(toy_args(toy, tmp_path, "--mode", "student-teacher", "--teacher-interval", "2",
                                   "--teacher-min-bin", "0", "--bins", "3", *extra))
    data = R.load_data(cfg)
    return cfg, R.Trainer(cfg, data, torch.device("cpu"), tmp_path)


def test_tiny_bins_are_penalised_and_never_trained_on(toy, tmp_path):
    cfg, trainer = teacher_setup(toy, tmp_path, "--teacher-min-bin", "3")
    teacher = trainer.teacher
    pool = teacher.pools[0][:1]
    teacher.pools = [pool[:0], pool.repeat(10, 0), pool.repeat(2, 0)]  # bins 0 and 2 too small
    teacher.hard_images = np.zeros((4, 64, 64, 3), np.uint8)
    before = teacher.probs.copy()
    picked = teacher.valid_pick(0)
    assert picked == 1
    assert not np.allclose(teacher.probs, before)  # the teacher learned from the penalty
    for _ in range(50):
        assert teacher.valid_pick(int(teacher.rng.integers(3))) == 1


def test_forced_teacher_trains_only_on_its_bin(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "TEACHER_EXPLORE", 0.0)
    monkeypatch.setattr(R.Teacher, "output", lambda self: np.array([0.0, 0.0, 1.0]))
    cfg, trainer = teacher_setup(toy, tmp_path, "--teacher-attribute", "camera_angle", "--steps", "8")
    teacher = trainer.teacher
    assert sum(teacher.counts) == len(trainer.maker.centres["synthetic"])
    seen = []
    real_batch = R.BatchMaker.batch
    monkeypatch.setattr(R.BatchMaker, "batch", lambda self, specs, rng: seen.append(specs) or real_batch(self, specs, rng))
    for step, batch in trainer.batches():
        result = trainer.train_step(batch, cfg.lr)
        teacher.observe(step, batch, result)
        trainer.step = step + 1
    in_bin = {(int(i), int(p)) for i, p in teacher.pools[2]}
    after_first_window = seen[cfg.teacher_interval:]
    synthetic = [(s.index, s.person) for specs in after_first_window for s in specs if s.source == "synthetic"]
    assert len(synthetic) == 6 * 2 and set(synthetic) <= in_bin
    assert [r["bin"] for r in teacher.records[1:]] == [2, 2, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_student_teacher_runs_and_resumes_exactly(toy, tmp_path, monkeypatch, device):
    common = ("--mode", "student-teacher", "--steps", "8", "--ckpt-every", "4", "--teacher-interval", "2",
              "--teacher-min-bin", "0", "--bins", "3", "--device", device)
    assert R.main(toy_args(toy, tmp_path / "straight", *common)) == 0
    with monkeypatch.context() as m:
        interrupt_at_step(m, 5)
        assert R.main(toy_args(toy, tmp_path / "stopped", *common)) == 130
    assert R.main(toy_args(toy, tmp_path / "stopped", *common, "--resume")) == 0
    a = torch.load(tmp_path / "straight/ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "stopped/ckpt.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["teacher"]["net"]:
        assert torch.equal(a["teacher"]["net"][k], b["teacher"]["net"][k]), k
    assert a["teacher"]["records"] == b["teacher"]["records"] and len(a["teacher"]["records"]) == 4
    assert (tmp_path / "straight/teacher_bins.png").is_file()
    logged = [json.loads(l) for l in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert any(r.get("teacher") and "probs" in r["teacher"] for r in logged)


def test_uniform_baseline_and_augmented_teacher_run(toy, tmp_path):
    common = ("--mode", "student-teacher", "--steps", "4", "--teacher-interval", "2", "--teacher-min-bin", "0",
              "--bins", "3")
    assert R.main(toy_args(toy, tmp_path / "uniform", *common, "--teacher-uniform")) == 0
    assert R.main(toy_args(toy, tmp_path / "aug", *common, "--teacher-data", "augmented")) == 0


def test_paste_distance_follows_the_bin():
    rng = np.random.default_rng(0)
    for lo, hi in [(0, 10), (30, 40)]:
        centres = R.paste_centres(5, 128, rng, (lo, hi))
        dist = np.linalg.norm(centres - 63.5, axis=1)
        assert lo <= dist.min() < hi


def test_bench_runs_and_reports_every_figure(toy, tmp_path, capsys):
    run = tmp_path / "run"
    assert R.main(toy_args(toy, run, "--mode", "real", "--steps", "2")) == 0
    assert R.main(toy_args(toy, tmp_path / "unused", "--bench", "--init", str(run / "ckpt.pt"))) == 0
    out = capsys.readouterr().out
    for figure in ("pipeline_ratio", "train_img_s_end_to_end", "grouping_ms_per_image", R.precision(torch.device("cpu"), R.Config())):
        assert figure in out


def test_flat_maps_give_a_bounded_number_of_peaks():
    peaks = R.find_peaks(torch.full((18, 96, 128), 0.5))  # every pixel ties with its neighbours
    assert all(len(p) == R.MAX_PEAKS_PER_PART for p in peaks)
    kept = R.strongest(np.array([[0, 0, 0.1], [1, 0, 0.9], [2, 0, 0.5]]), 2)
    assert kept[:, 0].tolist() == [1, 2]  # the two strongest, in their original order


def test_grouping_merges_fragments_joined_by_a_later_limb():
    """Without a neck, arms and head start as separate fragments; the shoulder-ear limbs join them."""
    kp = torch.zeros(1, 1, 18, 3)
    kp[0, 0, :17, :2] = torch.as_tensor(TEMPLATE * 50 + [30, 10])
    kp[0, 0, :17, 2] = 2
    grid = torch.cat([R.paf_targets(kp, 128, 4, 3.0), R.heatmap_targets(kp, 128, 4, 2.5)], 1)
    people = R.decode_maps(R.upsample_maps(grid, 4, (128, 128))[0], 1.0)
    joined = [p for p, _ in people if p[[0, 4, 5, 6, 8, 10], 2].min() > 0]  # nose, ear, shoulders, right arm
    assert len(joined) == 1
    assert np.abs(joined[0][[0, 6, 10], :2] - kp[0, 0, [0, 6, 10], :2].numpy()).max() < 0.5


def test_paper_student_trains_and_freezes_conv1_conv2_when_fine_tuning(toy, tmp_path):
    small = ("--preset", "paper", "--mode", "real", "--input-size", "64", "--stages", "2", "--batch-size", "2",
             "--steps", "2", "--eval-height", "64", "--max-val-images", "1")
    argv = toy_data_args(toy) + ["--out", str(tmp_path / "paper"), "--threads", "2", *small]
    assert R.main(argv) == 0
    cfg, _ = R.parse_args(argv + ["--init", str(tmp_path / "paper/ckpt.pt")])
    trainer = R.Trainer(cfg, R.load_data(cfg), torch.device("cpu"), tmp_path)
    frozen = [p.requires_grad for p in trainer.model.backbone[:R.VGG_FROZEN_LAYERS].parameters()]
    assert frozen and not any(frozen)
    assert all(p.requires_grad for p in trainer.model.backbone[R.VGG_FROZEN_LAYERS:].parameters())
