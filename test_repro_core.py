# ==============================================================================================
# repro.py: targets, flips, masks, compositing, grouping, evaluation, training regimes
# ==============================================================================================
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import repro as R

SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"
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
    for a, b in R.COCO_SKELETON:
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
                       skeleton=[[a + 1, b + 1] for a, b in R.COCO_SKELETON])]
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


def toy_args(toy, out, *extra):
    return ["--train-json", str(toy["train"]), "--train-images", str(toy["train"].parent / "images"),
            "--val-json", str(toy["val"]), "--val-images", str(toy["val"].parent / "images"),
            "--synthetic-json", str(toy["synthetic"]), "--bank-json", str(toy["bank"]),
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

def grad_of_loss(cfg, keypoints, pasted, ignore):
    target, mask = R.make_targets(keypoints, pasted, ignore, cfg)
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
    # ... while include mode supervises them (targets of the pasted people, non-zero gradient)
    both = torch.cat([real, pasted], 1)
    g_inc, _, _ = grad_of_loss(cfg, both, pasted[:, :0], ignore)
    assert g_inc[under].abs().max() > 0


def test_crowd_and_unlabelled_regions_get_zero_loss(toy):
    kset = R.load_keypoint_set(toy["train"], toy["train"].parent / "images")
    rec = kset.records[0]
    assert rec.ignore_rles, "the crowd annotation goes into the ignore mask"
    mask = R.ignore_mask(rec)
    assert (mask[:20, :20] == 0).all() and mask[40:, 40:].min() == 255
    cfg = toy_config(input_size=128)
    keypoints = torch.as_tensor(rec.keypoints[None])
    g, _, m = grad_of_loss(cfg, keypoints, keypoints[:, :0], torch.as_tensor(mask[None]))
    assert g[..., :4, :4].abs().max() == 0 and m[..., :4, :4].max() == 0  # cells inside the crowd box
    assert g[..., 10:, 10:].abs().max() > 0


def test_person_without_keypoints_goes_into_ignore_mask(tmp_path):
    path = write_toy_set(tmp_path, 1, people=(1, 1))
    data = json.loads(path.read_text())
    data["annotations"].append(dict(id=99, image_id=1, category_id=1, iscrowd=0, num_keypoints=0, keypoints=[0] * 51,
                                    bbox=[100, 100, 20, 20], area=400.0, segmentation=[[100, 100, 120, 100, 120, 120, 100, 120]]))
    path.write_text(json.dumps(data))
    rec = R.load_keypoint_set(path, tmp_path / "images").records[0]
    assert len(rec.keypoints) == 1 and (R.ignore_mask(rec)[105:115, 105:115] == 0).all()


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
    include = R.paste_people(sample, bank, R.dataclasses.replace(cfg, synthetic_loss="include"), np.random.default_rng(0))
    assert len(include.keypoints) == 9 and len(include.pasted) == 0


# ---- training regimes -------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["real", "synthetic", "augmented"])
def test_loss_falls_on_a_repeated_batch(toy, tmp_path, mode, device):
    cfg, _ = R.parse_args(toy_args(toy, tmp_path, "--mode", mode, "--lr", "3e-3", "--device", device))
    data = R.load_data(cfg)
    trainer = R.Trainer(cfg, data, torch.device(device), tmp_path)
    specs = R.plan_specs(trainer.maker, cfg, 4, np.random.default_rng(0))
    batch = trainer.maker.batch(specs, np.random.default_rng(0))
    losses = [trainer.train_step(batch, cfg.lr)["loss"] for _ in range(25)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])


@pytest.mark.parametrize("mode", ["real", "synthetic", "augmented"])
def test_each_mode_runs_end_to_end(toy, tmp_path, mode):
    out = tmp_path / mode
    assert R.main(toy_args(toy, out, "--mode", mode, "--steps", "3")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and 0.0 <= metrics["AP"] <= 1.0
    assert (out / "config.json").is_file() and (out / "curves.png").is_file() and (out / "predictions.jpg").is_file()
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
        interrupt_at_step(m, 4)
        assert R.main(toy_args(toy, tmp_path / "stopped", *common)) == 130
    assert torch.load(tmp_path / "stopped/ckpt.pt", weights_only=False)["step"] == 3
    assert R.main(toy_args(toy, tmp_path / "stopped", *common, "--resume")) == 0
    a = torch.load(tmp_path / "straight/ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "stopped/ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_eval_mode_and_init(toy, tmp_path):
    assert R.main(toy_args(toy, tmp_path / "run", "--mode", "real", "--steps", "2")) == 0
    ckpt = tmp_path / "run/ckpt.pt"
    assert R.main(toy_args(toy, tmp_path / "eval", "--mode", "eval", "--ckpt", str(ckpt))) == 0
    assert "AP" in json.loads((tmp_path / "eval" / f"eval-annotations.json").read_text())
    assert R.main(toy_args(toy, tmp_path / "ft", "--mode", "augmented", "--steps", "1", "--init", str(ckpt))) == 0


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
    teacher.counts = [0, 10, 2]  # bins 0 and 2 too small
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
