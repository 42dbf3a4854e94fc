"""AP after - AP before of a first run, with its paired bootstrap over the val images.

    python results/first-run/paired_noise.py RUN_FOLDER [RUN_FOLDER ...]

Evaluates the run's --init (the shipped student) with the run's own settings, reads the run's
val_predictions.json, and resamples the val images 200 times (repro.resampled_aps, seed 0): the
same resamples for both, so the differences are paired.
"""
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import repro as R  # noqa: E402

before_cache = {}
for folder in map(Path, sys.argv[1:]):
    saved = json.loads((folder / "config.json").read_text())
    cfg = R.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()})
    cfg = dataclasses.replace(cfg, mode="eval", ckpt=cfg.init)
    data = R.load_data(cfg)
    key = (cfg.init, cfg.eval_scales, cfg.max_val_images, saved["precision"])
    if key not in before_cache:
        model, cfg, _ = R.model_from_checkpoint(cfg, cfg.init, torch.device("cpu"))
        stats, results = R.evaluate(model, data.val, cfg, torch.device("cpu"), cfg.max_val_images, progress=False)
        before_cache[key] = stats["AP"], R.resampled_aps(data.val, results)
    ap0, boot0 = before_cache[key]
    after = json.loads((folder / "val_predictions.json").read_text())
    ap1 = json.loads((folder / "metrics.json").read_text())["AP"]
    d = R.resampled_aps(data.val, after) - boot0
    lo, hi = np.percentile(d, [2.5, 97.5])
    print(f"{folder}: AP {ap0:.4f} -> {ap1:.4f}, after - before {ap1 - ap0:+.4f}, paired bootstrap sd "
          f"{d.std(ddof=1):.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}] ({saved['precision']})")
