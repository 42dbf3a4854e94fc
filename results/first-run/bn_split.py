"""A run's fine-tuned weights with --init's BatchNorm statistics, and --init's weights with the run's:
the AP of each.   python results/first-run/bn_split.py RUN_FOLDER"""
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import repro as R  # noqa: E402

run = sys.argv[1]
saved = json.loads(open(f"{run}/config.json").read())
cfg = R.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()})
cfg = dataclasses.replace(cfg, mode="eval")
data = R.load_data(cfg)
dev = torch.device("cpu")
ship = R.load_checkpoint(cfg.init)["model"]
final = R.load_checkpoint(f"{run}/ckpt.pt")["model"]


def bn(k):
    return k.endswith(("running_mean", "running_var", "num_batches_tracked"))


for name, mix in (("final weights, shipped BN stats", {k: (ship[k] if bn(k) else final[k]) for k in final}),
                  ("shipped weights, final BN stats", {k: (final[k] if bn(k) else ship[k]) for k in final})):
    model = R.build_model(cfg).to(dev)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in mix.items()})
    stats, _ = R.evaluate(model, data.val, cfg, dev, 0, progress=False)
    print(name, round(stats["AP"], 4), flush=True)
