"""Where the domain gap comes from (README, "Where the domain gap comes from"): the shipped
student evaluated on rendered scenes of each style, as they are and with one style factor switched
at a time, read by a rule fixed before the first run (GAP_RULE).

    python results/domain-gap/domain_gap.py --domain-gap 120 --eval-scales 1.0

Run from the repository's root; writes domain-gap.{json,md} into --out (default
results/domain-gap/). It imports repro.py for the renderer's settings, the evaluation and the
command line (repro.py's parser, with this file's job).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repro.py, two folders up
import repro as R  # noqa: E402
from repro import (  # noqa: E402
    COCO, DEMO_STANDIN, DEMO_SYNTHETIC, Config, Job, ReproError, atomic_path,
    code_version, config_flag, evaluate, load_keypoint_set, model_from_checkpoint,
    resampled_aps, rh, start_job, tracked_name, write_json)

PROG = "results/domain-gap/domain_gap.py"

GAP_SEED = 7000  # [ours] a seed no split of the demo uses (they take 1000-5000)


# [ours] one geometry for every set, the stand-in's (the student's own), so that the sets differ in
# style alone; the geometry rows render each style at the demo's synthetic geometry instead
GAP_GEOMETRIES = {name: {k: v for k, v in demo.items() if k != "style"}
                  for name, demo in (("standin", DEMO_STANDIN), ("synthetic", DEMO_SYNTHETIC))}


GAP_OTHER = {"synthetic": "standin", "standin": "synthetic"}


GAP_RULE = (  # fixed before the first run: how the table is read
    "Every set is rendered with seed 7000 and evaluated by the shipped real-only student. A set's "
    "dAP is its AP minus that of its own style's set as it is, with a paired bootstrap sd over "
    "images (200 resamples, the same for every set; the sets are paired by image index: a switched "
    "factor draws from a stream of its own and the others repeat their draws). A factor carries "
    "part of the gap, in one direction, when switching it alone moves AP towards the other style's "
    "set by more than 2 paired sd; it works against the gap when it moves AP away by more than 2 "
    "sd; otherwise no effect is measured at this size. Its share is dAP / (AP of the other style's "
    "set - AP of its own). The 'all' row switches every factor: if it lands more than 2 sd from "
    "the other style's set, the named factors do not cover the style. The geometry row renders the "
    "style at the demo's synthetic geometry (320 px, Poisson(5) people, 7 m) instead of the "
    "stand-in's (256 px, 2.5, 6 m).")


def gap_sets(factors: tuple[str, ...]) -> list[dict]:
    """The sets: per style, as it is, each factor switched alone, all of them,
    the synthetic geometry."""
    sets = []
    for style, other in GAP_OTHER.items():
        rows = [(style, None, {})] + [(f"{style}-{f}", f, {f: other}) for f in factors]
        rows += [(f"{style}-all", "all", {f: other for f in factors})] if len(factors) > 1 else []
        for name, switched, switch in rows:
            sets.append(dict(name=name, style=style, switched=switched, geometry="standin",
                             style_factors=sorted(f"{k}={v}" for k, v in switch.items())))
        sets.append(dict(name=f"{style}-geometry", style=style, switched="geometry",
                         geometry="synthetic", style_factors=[]))
    return sets


def gap_render_settings(spec: dict, images: int, geometries: dict = GAP_GEOMETRIES) -> dict:
    return dict(kind="scenes", num_images=images, seed=GAP_SEED, style=spec["style"],
                style_factors=tuple(spec["style_factors"]), **geometries[spec["geometry"]])


def gap_commands(folder: Path, settings: dict, ckpt: Path, cfg: Config) -> list[str]:
    """The two commands that give one set's numbers on their own: render, then --mode eval."""
    flags = []
    for k, v in settings.items():
        if k == "kind" or v == ():
            continue
        flags += [config_flag(k)] + [str(x) for x in (v if isinstance(v, tuple) else (v,))]
    scales = " ".join(f"{x:g}" for x in cfg.eval_scales)
    return [" ".join(["python render_humans.py", str(folder), *flags, "--no-progress"]),
            f"python repro.py --mode eval --ckpt {ckpt} --val-json {folder}/annotations.json "
            f"--val-images {folder}/images --eval-scales {scales} --out {folder}/eval"]


def gap_reading(spec: dict, row: dict, rows: dict) -> dict:
    """dAP against its own style's set, paired sd, share of the gap and the rule's word."""
    own, other = rows[spec["style"]], rows[GAP_OTHER[spec["style"]]]
    d, toward = row["AP"] - own["AP"], other["AP"] - own["AP"]
    sd = float(np.std(row["_draws"] - own["_draws"]))
    if spec["switched"] == "all":
        sd_other = float(np.std(row["_draws"] - other["_draws"]))
        word = ("covers the style" if abs(row["AP"] - other["AP"]) <= 2 * sd_other
                else "does not cover the style")
        return dict(dAP=d, dAP_sd=sd, share=d / toward if toward else None,
                    vs_other=row["AP"] - other["AP"], vs_other_sd=sd_other, reading=word)
    if abs(d) <= 2 * sd:
        word = "no measured effect"
    else:
        word = "carries part of the gap" if d * toward > 0 else "works against the gap"
    return dict(dAP=d, dAP_sd=sd, share=d / toward if toward else None, reading=word)


def gap_table(report: dict) -> str:
    def f(x, digits=3, sign=""):
        return "-" if x is None else f"{x:{sign}.{digits}f}"

    lines = ["# Where the domain gap comes from", "",
             f"Rule, fixed before the run: {report['rule']}", "",
             f"Command: `{report['command']}` ({report['wall_minutes']:.1f} minutes on "
             f"{report['device']}; {report['images_per_set']} images per set, checkpoint "
             f"{report['checkpoint']}).", "",
             "| set | style | switched to the other style | images | people | AP | AP50 | peak_hit "
             "| AP sd | dAP vs its style | paired sd | share of the gap | reading |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["sets"]:
        switched = r["switched"] or "(as it is)"
        lines.append(f"| {r['name']} | {r['style']} | {switched} | {r['images']} | "
                     f"{r['people']} | {f(r['AP'])} | {f(r['AP50'])} | {f(r['peak_hit'])} | "
                     f"{f(r['ap_sd'])} | {f(r.get('dAP'), sign='+')} | {f(r.get('dAP_sd'))} | "
                     f"{f(r.get('share'), 2, '+')} | {r.get('reading', '')} |")
    return "\n".join(lines) + "\n"


def run_domain_gap(cfg: Config, images: int, device,
                   factors: tuple[str, ...] = tuple(rh.STYLE_FACTORS),
                   argv: list[str] | None = None, geometries: dict = GAP_GEOMETRIES) -> dict:
    """Renders every set of gap_sets (cached under the sets folder), evaluates the checkpoint
    (default: the shipped student) on each, writes domain-gap.json and domain-gap.md into --out
    (default results/domain-gap/)."""
    if images < 1:
        raise ReproError(f"--domain-gap N needs N >= 1 images per set, not {images}")
    ckpt = Path(cfg.ckpt) if cfg.ckpt else Path(tracked_name(R.SHIPPED_STUDENT))
    model, cfg, _ = model_from_checkpoint(cfg, ckpt if cfg.ckpt else R.SHIPPED_STUDENT, device)
    if cfg.skeleton != "coco":
        raise ReproError(f"--domain-gap: checkpoint {ckpt} predicts the {cfg.skeleton} skeleton; "
                         "the sets are COCO")
    out = Path(cfg.out) if cfg.out else Path("results/domain-gap")
    sets_root = (out / "domain-gap-sets" if cfg.out else Path("runs/domain-gap")) / f"n{images}"
    specs = gap_sets(factors)
    for spec in specs:  # every setting checked before anything is rendered
        rh.validate(rh.make_config(gap_render_settings(spec, images, geometries)))
    t0, rows = time.perf_counter(), {}
    for spec in specs:
        folder, settings = sets_root / spec["name"], gap_render_settings(spec, images, geometries)
        t = time.perf_counter()
        ann = rh.render_dataset(folder, progress=False, **settings)
        t_render = time.perf_counter() - t
        kset = load_keypoint_set(ann, folder / "images", COCO)
        stats, results = evaluate(model, kset, cfg, device, progress=False)
        people = [a for a in json.loads(ann.read_text())["annotations"]
                  if a.get("num_keypoints", 0) > 0]
        row = dict(spec, folder=str(folder), images=len(kset.records), people=len(people),
                   **{k: stats[k] for k in ("AP", "AP50", "peak_hit", "ap_sd")},
                   render_s=round(t_render, 1), eval_s=round(time.perf_counter() - t - t_render, 1),
                   commands=gap_commands(folder, settings, ckpt, cfg),
                   _draws=resampled_aps(kset, results))
        rows[spec["name"]] = row
        print(f"domain gap: {spec['name']}: AP {row['AP']:.3f} (sd {row['ap_sd']:.3f}), peak_hit "
              f"{row['peak_hit']:.3f}, {row['images']} images, {row['people']} people", flush=True)
    for spec in specs:
        if spec["switched"] is not None:
            rows[spec["name"]] |= gap_reading(spec, rows[spec["name"]], rows)
    command = f"python {PROG} " + " ".join(sys.argv[1:] if argv is None else argv)
    report = dict(rule=GAP_RULE, command=command, checkpoint=str(ckpt), device=str(device),
                  seed=GAP_SEED,
                  images_per_set=images, eval_scales=list(cfg.eval_scales), geometries=geometries,
                  factors={f: rh.STYLE_FACTORS[f] for f in factors}, code_version=code_version(),
                  wall_minutes=round((time.perf_counter() - t0) / 60, 2),
                  sets=[{k: v for k, v in r.items() if k != "_draws"} for r in rows.values()])
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "domain-gap.json")
    with atomic_path(out / "domain-gap.md") as tmp:
        tmp.write_text(gap_table(report))
    print(f"domain gap: {out / 'domain-gap.json'}, {out / 'domain-gap.md'}")
    return report


# ----------------------------------------------------------------------------------------------
# The command line: repro.py's parser, with this file's job
# ----------------------------------------------------------------------------------------------

def domain_gap_job(cfg: Config, args: argparse.Namespace) -> None:
    run_domain_gap(cfg, args.domain_gap, start_job(cfg)[2])


JOBS = {job.flag: job for job in (
    Job("--domain-gap", domain_gap_job, "render N scenes per style and per style factor switched "
        "(seed 7000), evaluate --ckpt (default: the shipped student) on each; writes "
        "domain-gap.{json,md} into --out (default results/domain-gap/); README, 'Where the domain "
        "gap comes from'", type=int, metavar="N", prog=PROG),
)}


parse_args, main = R.command_line(JOBS)  # repro.py's, over this file's jobs

if __name__ == "__main__":
    sys.exit(main())
