"""The claims protocol (README, "The claims protocol"): every condition of the paper fine-tuned
from one real-only student over paired seeds, and read by rules fixed before the runs.

    python results/protocol/claims.py --reproduce [--jobs N] [--only GLOB ...]   # runs, resumes
    python results/protocol/claims.py --report
        # results/claims.{json,md,png}, the README's answer
    python results/protocol/claims.py --probe v3 --init results/student-demo-scarce.pt --seed 0 ...

Run from the repository's root. Every run is `python repro.py ...`, a training run in a process of
its own; the probe (claim 3) trains with repro.py's Trainer here. This file holds what repro.py's
method does not need: what is fixed in advance (the conditions, the rules and the rounds, as data;
rounds 1-2's verdicts frozen in results/rounds-1-2.json), the runner, the statistics, the probe, the
report and its figures, and the command line (repro.py's, with this file's three jobs).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fnmatch
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repro.py, two folders up
import repro as R  # noqa: E402
from repro import (  # noqa: E402
    LOCK_NAME, OCCLUSION_BINS, PARENT_ENV, Batch, BatchMaker, Config, Data, Job,
    ReproError, Trainer, atomic_path, autocast, batchnorm_modules, bin_colours, code_version,
    config_flag, device_key, device_name, export_student, hold_run_dir, learning_rate,
    load_checkpoint, load_data, lock_holder, plot_bin_probabilities, pose_loss, pyplot, read_jsonl,
    rh, save_atomic, save_figure, start_job, this_device_key, to_input, tracked_name, write_json)

PROG = "results/protocol/claims.py"

# Rounds are data (ROUNDS), the current rule is an object (RULE_V3); rounds 1 and 2's verdicts are
# frozen in results/rounds-1-2.json, which the report reprints (results/protocol/README.md).

# ---- What is fixed in advance: the conditions, the rules, the rounds

# [ours] Fixed by the pilot from learning speed and noise, before any condition was compared
# (results/protocol/README.md). Budgets are in steps; wall time is recorded beside them.
PROTOCOL_REGIMES = {"full": 0, "scarce": 100}  # --train-subset: all 1000 stand-in images, or 100
PROTOCOL_STUDENT_STEPS = {"full": 4000, "scarce": 2000}
PROTOCOL_FINETUNE_STEPS = 800
PROTOCOL_COMMON = ["--demo-val", "crowded", "--eval-scales", "1.0", "--minutes", "0",
                   "--log-every", "50", "--ckpt-every", "200"]
PROTOCOL_FINETUNE = ["--lr", "3e-4", "--no-eval-init"]
PROTOCOL_RUNS = Path("runs/protocol")  # checkpoints: git-ignored, rebuilt from their seeds
PROTOCOL_RESULTS = Path("results/protocol")  # one small json per finished run: committed
FROZEN_ROUNDS = Path("results/rounds-1-2.json")  # rounds 1 and 2's verdicts: committed


class Condition(NamedTuple):
    """A protocol condition: the flags its runs are trained with, and the real crops in a step's
    batch that those flags give (the default --batch-size, 16), which the claims table prints;
    test_every_protocol_condition_records_the_real_crops_its_flags_give checks the two agree."""
    flags: list[str]
    real_crops: int


# Each condition's flags; real crops per step in a batch of 16: 16 for the control, 8 for the rest.
CONDITIONS = {
    # the control (paper code: --onlyReal): real crops fill the whole batch
    "real": Condition(["--mode", "real"], 16),
    "synthetic": Condition(["--mode", "synthetic"], 8),  # + purely synthetic scenes, uniformly
    "augmented-include": Condition(["--mode", "augmented", "--synthetic-loss", "include"], 8),
    "augmented-mask": Condition(["--mode", "augmented", "--synthetic-loss", "mask"], 8),
    # the paper's teacher on synthetic scenes, min_dist bins
    "teacher": Condition(["--mode", "student-teacher"], 8),
    # the identical loop, uniform sampling
    "uniform": Condition(["--mode", "student-teacher", "--teacher-uniform"], 8),
    # [ours] a teacher that can move
    "teacher-fast": Condition(["--mode", "student-teacher", "--teacher-step", "0.1"], 8),
}
LONG_STEPS = 3000  # 150 teacher updates at the paper's interval of 20
LONG_CONDITIONS = {
    "teacher-3000": Condition(["--mode", "student-teacher"], 8),
    # a random large-enough bin
    "stratified-3000": Condition(["--mode", "student-teacher", "--teacher-stratified"], 8),
    # = the teacher loop with uniform sampling (SAME_RUNS)
    "synthetic-3000": Condition(["--mode", "synthetic"], 8),
}
# The students every fine-tune starts from, and the domain gap's student of synthetic data only:
# trained from scratch (scratch_runs adds their steps and seed).
STUDENT_CONDITIONS = {
    "student": Condition(["--mode", "real", "--init", "none"], 16),
    "synthetic-only": Condition(["--mode", "synthetic", "--real-share", "0", "--init", "none"], 0),
}
# [ours] The paper's baseline for the teacher, the identical loop with uniform sampling, draws
# exactly the batches of the synthetic condition (same (seed, step) draws, uniform over every
# synthetic person; tested, and full/uniform-s0 repeated full/synthetic-s0 bit for bit), so its
# runs are read from synthetic's instead of being trained again.
SAME_RUNS = {"uniform": "synthetic", "uniform-3000": "synthetic-3000"}
# the order of the report's table and figure: the students, the 800-step conditions, the long ones
REPORTED_CONDITIONS = ("student", "synthetic-only", *CONDITIONS, *LONG_CONDITIONS, "uniform-3000")
CLAIM_WORDS = {
    1: "augmented real data beats purely synthetic data",
    2: "pasted people out of the loss beat pasted people in it",
    3: "not all synthetic samples are equally informative, and which ones changes over training",
    4: "the adversarial teacher beats uniform sampling of synthetic data",
}
# [ours] Rule v2's smallest effect of interest, ~2.5% of round 1's real-only AP; rule v3 keeps it.
DELTA = {"full": 0.007, "scarce": 0.003}
DELTA_AT_3000 = 0.005  # [ours] rule v2's 2.5% of uniform-3000's 0.210


def regime_student(regime: str) -> Path:
    """A regime's initial student in half precision, committed: every fine-tune of the regime
    starts from it, on any machine, and the full regime's is the demo's shipped student."""
    if regime == "full":
        return R.SHIPPED_STUDENT
    return R.SHIPPED_STUDENT.with_name(f"student-demo-{regime}.pt")


# [ours] The informativeness probe (claim 3), fixed before any probe result: at points of a run
# that samples synthetic data uniformly, copies of the student train a few steps on one teacher
# bin each (same real half, same step rule); a bin's usefulness is how much that lowers the loss
# on a fixed set of real val crops.
class ProbeDesign(NamedTuple):
    name: str  # the results file: results/<name>.{json,png}
    regime: str  # whose student, and its --train-subset
    points: tuple[int, ...]  # steps of the uniform run at which every bin is probed
    seeds: tuple[int, ...]
    steps: int = 20  # student steps on one bin per probe
    val_crops: int = 64  # the fixed real val crops whose loss is the yardstick
    equal_people: bool = False  # subsample every probed bin to the smallest one's people
    lr: float | None = None  # every probe step at this lr; None: the run's schedule at the point
    keep_bn: bool = False  # BatchNorm running statistics put back before each val-loss reading
    trajectories: tuple[int, ...] = (0,)  # the uniform runs probed (--seed), replicates


# Probe v1 (round 1) and v2 (round 2: the same people in every bin, the 3000-step schedule's
# points, 6 seeds) are withdrawn (results/protocol/README.md). Probe v3, fixed before it ran:
# every probe step at 1.5e-4, the mean of the runs' 3e-4 cosine; BatchNorm statistics put back
# before each reading, so only the weights count; 3 uniform trajectories, which first differ after
# step 0, so the points are those after it.
PROBES = {
    "v1": ProbeDesign("probe", "full", (0, 400, 800), (0, 1, 2)),
    "v2": ProbeDesign("probe-v2", "scarce", (0, 750, 1500, 2250, 3000), (0, 1, 2, 3, 4, 5),
                      equal_people=True),
    "v3": ProbeDesign("probe-v3", "scarce", (750, 1500, 2250, 3000), (0, 1, 2), equal_people=True,
                      lr=1.5e-4, keep_bn=True, trajectories=(0, 1, 2)),
}


def probe_name(design: ProbeDesign, trajectory: int) -> str:
    """The results file of one probed trajectory: results/<name>.{json,png}."""
    return design.name if len(design.trajectories) == 1 else f"{design.name}-t{trajectory}"


@dataclass(frozen=True)
class Rule:
    """How a rule plans its seeds: the fewest n >= min_seeds whose t-test power at delta reaches
    `power` and whose precision assurance (P(95% half-width < delta)) reaches `assurance`, so that
    an effect of delta and "no effect of delta or more" can be read. Every rule since v2 reads a
    pair with paired_test and a probe with probe_test."""
    name: str
    power: float
    assurance: float
    min_seeds: int = 3

    def seeds(self, sd: float, delta: float) -> int:
        return max(self.min_seeds, seeds_for(sd, delta, self.power, t_test_power),
                   seeds_for(sd, delta, self.assurance, precision_assurance))


# [ours] Rule v2 planned by precision assurance alone; rule v3 adds the conventional power.
RULE_V2 = Rule("v2", power=0.0, assurance=0.8)
RULE_V3 = Rule("v3", power=0.8, assurance=0.8)


@dataclass(frozen=True)
class Arm:
    """A stage's condition: its flags, the images it trains on (a regime), its starting student."""
    condition: str
    flags: tuple[str, ...]
    regime: str = "scarce"
    student: str = "scarce"


@dataclass(frozen=True)
class Stage:
    """One question of a round: its runs (arms x seeds at `steps`, or a probe), the comparisons
    its test reads (better, worse), the paired sd that planned its seeds, delta, what its
    verdict decides, and the claim whose current verdict it gives once decided. `read`: "pairs"
    (a paired test per comparison), "contrasts" (the 2x2's two contrasts) or "probe"."""
    key: str
    question: str
    arms: tuple[Arm, ...]
    steps: int
    seeds: int
    comparisons: tuple[tuple[str, str], ...] = ()
    test: str = ""
    decides: str = ""
    delta: float | None = None
    sd: float | None = None
    sd_source: str = ""
    probe: ProbeDesign | None = None
    claim: int | None = None
    read: str = "pairs"


@dataclass(frozen=True)
class Round:
    """A round: its stages in order, the rule that planned and reads them, the prefix of its runs'
    names ("r3/" from round 3 on, so that no earlier summary is taken for one of its runs), and
    whether its verdicts are frozen (results/rounds-1-2.json) or computed by this code."""
    name: str
    stages: tuple[Stage, ...]
    rule: Rule | None = None
    prefix: str = ""
    frozen: bool = True


def arms(conditions: dict[str, Condition], regime: str) -> tuple[Arm, ...]:
    return tuple(Arm(name, tuple(c.flags), regime, regime) for name, c in conditions.items()
                 if name not in SAME_RUNS)


ROUND1 = Round("1", (  # [ours] rule v1 (results/rounds-1-2.json), seeds 0-2
    Stage("1", "claims 1, 2, 4 at 800 steps, both regimes",
          sum((arms(CONDITIONS, r) for r in PROTOCOL_REGIMES), ()), PROTOCOL_FINETUNE_STEPS, 3),
    Stage("probe v1", "claim 3", (), 0, 1, probe=PROBES["v1"])))


def round2_pair(claim: int, regime: str, better: str, worse: str, seeds: int, sd: float) -> Stage:
    return Stage(f"2: claim {claim}, {regime}", f"claim {claim}",
                 arms({c: CONDITIONS[c] for c in (better, worse)}, regime), PROTOCOL_FINETUNE_STEPS,
                 seeds, ((better, worse),), delta=DELTA[regime], sd=sd, sd_source="round 1")


# [ours] Round 2 and rule v2, fixed before any of its runs (results/protocol/README.md): claims 1
# and 2 on the seeds rule v2 asked for at round 1's paired sd (RULE_V2.seeds), claim 4 at 150
# teacher updates, then probe v2. Round 1's seeds are reused.
ROUND2 = Round("2", (
    round2_pair(1, "full", "augmented-mask", "synthetic", 4, 0.00292),
    round2_pair(1, "scarce", "augmented-mask", "synthetic", 7, 0.00259),
    round2_pair(2, "full", "augmented-mask", "augmented-include", 3, 0.00177),
    round2_pair(2, "scarce", "augmented-mask", "augmented-include", 5, 0.00153),
    Stage("2: claim 4", "claim 4 at 3000 steps", arms(LONG_CONDITIONS, "scarce"), LONG_STEPS, 5,
          (("teacher-3000", "uniform-3000"),), delta=DELTA["scarce"], sd=0.00172,
          sd_source="round 1, teacher - uniform at 800 steps"),
    Stage("probe v2", "claim 3", (), 0, 1, probe=PROBES["v2"])), rule=RULE_V2)


# ---- Rule v3 and round 3: fixed before any round-3 run (results/protocol/README.md, "Rule v3"),
# written after round 2's results were known; a stage per question, decided at its planned seeds
# before the next starts.
# paper code's teacher, CPU-sized: its soft label, no BatchNorm under its head, its bins, lr, beta1
PAPER_TEACHER = ("--mode", "student-teacher", "--teacher-update", "paper", "--teacher-arch",
                 "small-nobn", "--teacher-bins", "paper", "--teacher-lr", "5e-5", "--beta1", "0.8")
ROUND3 = Round("3", prefix="r3/", rule=RULE_V3, frozen=False, stages=(
    Stage("a", "claim 3: do the bins differ, and does which bins help change over training?",
          arms=(), steps=LONG_STEPS, seeds=len(PROBES["v3"].trajectories),
          test="probe v2's two-way ANOVA and tau interval, on each trajectory's mean over its "
          "probe seeds, trajectories as replicates",
          decides="both parts of claim 3 (probe v1, v2 withdrawn)", probe=PROBES["v3"], claim=3,
          read="probe", sd_source="no spread between trajectories measured (probe v2 had one): "
          "the issue's floor of 3"),
    Stage("b", "does the synthetic half help at 3000 steps?",
          arms=(Arm("real-3000", tuple(CONDITIONS["real"].flags)),
                *(Arm(c, tuple(flags)) for c, (flags, _) in LONG_CONDITIONS.items())),
          steps=LONG_STEPS, seeds=19,
          comparisons=(("uniform-3000", "real-3000"), ("stratified-3000", "real-3000"),
                       ("teacher-3000", "real-3000"), ("teacher-3000", "uniform-3000")),
          test="rule v2's paired t-test and interval against delta",
          decides="'synthetic data helps' at 3000 steps (scarce); claim 4's gap read against it",
          delta=DELTA_AT_3000, sd=0.0073, sd_source="the largest paired sd measured in the "
          "scarce regime for these pairs: real - synthetic at 800 steps (round 1), teacher - "
          "stratified at 3000 (round 2)"),
    Stage("c", "claim 2 deconfounded: does the sign of mask - include follow the images or the "
          "student?",
          arms=tuple(Arm(f"augmented-{loss}-from-{student}",
                         ("--mode", "augmented", "--synthetic-loss", loss), images, student)
                     for images in PROTOCOL_REGIMES for student in PROTOCOL_REGIMES
                     for loss in ("mask", "include")),
          steps=PROTOCOL_FINETUNE_STEPS, seeds=7,
          comparisons=tuple((f"augmented-mask-from-{student}", f"augmented-include-from-{student}")
                            for student in PROTOCOL_REGIMES),
          test="per seed, d = mask - include in each of the 4 cells; rule v2's paired test on "
          "the images contrast (d of 1000 - d of 100 images, mean over students) and the student "
          "contrast (d from full - d from scarce, mean over images)",
          decides="claim 2's regime flip: the images, the student, both or neither", claim=2,
          read="contrasts", delta=DELTA["scarce"], sd=0.00218, sd_source="the contrasts' sd "
          "from round 2's claim-2 paired sds, sqrt((0.00177^2 + 0.00251^2) / 2)"),
    Stage("d", "claim 4 with the teacher closest to the paper's code that the CPU affords",
          arms=(Arm("teacher-paper-3000", PAPER_TEACHER),
                # the identical loop without the teacher at the paper's beta1 (the student's too)
                Arm("uniform-paper-3000", ("--mode", "synthetic", "--beta1", "0.8"))),
          steps=LONG_STEPS, seeds=12,
          comparisons=(("teacher-paper-3000", "uniform-paper-3000"),
                       ("teacher-paper-3000", "uniform-3000")),
          test="rule v2's paired t-test and interval against delta",
          decides="claim 4 for the paper code's soft label, teacher without BatchNorm, bins and "
          "learning rate", claim=4,
          delta=DELTA_AT_3000, sd=0.00555, sd_source="round 2's teacher-3000 - uniform-3000"),
))
ROUNDS = (ROUND1, ROUND2, ROUND3)
CURRENT = next(r for r in ROUNDS if not r.frozen)  # the round this code's rule reads


# ---- The runner: each round's runs as subprocesses, resumed where they stopped; their summaries

class ProtocolRun(NamedTuple):
    name: str  # e.g. "full/augmented-mask-s1"
    regime: str
    condition: str
    seed: int
    argv: list[str]
    init: str | None  # the run whose checkpoint this one starts from


def protocol_runs() -> list[ProtocolRun]:
    """The students first, then every round's fine-tunes stage by stage, seed by seed (a partial
    grid stays paired); a run that an earlier round or stage has is listed once."""
    runs = scratch_runs() + [r for rnd in ROUNDS for s in rnd.stages for r in stage_runs(s, rnd)]
    return list({r.name: r for r in runs}.values())


def scratch_runs() -> list[ProtocolRun]:
    """Runs from scratch: each regime's student (its learning curve evaluated), and the domain
    gap's student of synthetic data only."""
    runs = []
    for regime, subset in PROTOCOL_REGIMES.items():
        data, steps = (["--train-subset", str(subset)] + PROTOCOL_COMMON,
                       PROTOCOL_STUDENT_STEPS[regime])
        runs.append(ProtocolRun(f"{regime}/student", regime, "student", 0,
                                STUDENT_CONDITIONS["student"].flags
                                + ["--steps", str(steps), "--seed", "0",
                                   "--eval-steps", *learning_curve(steps)] + data,
                                None))
    runs.append(ProtocolRun("full/synthetic-only", "full", "synthetic-only", 0,  # the domain gap
                            STUDENT_CONDITIONS["synthetic-only"].flags
                            + ["--steps", str(PROTOCOL_STUDENT_STEPS["full"]),
                               "--seed", "0", "--train-subset", "0"] + PROTOCOL_COMMON, None))
    return runs


def stage_runs(stage: Stage, rnd: Round) -> list[ProtocolRun]:
    """A stage's fine-tunes, seed by seed over its arms: <prefix><images>/<condition>-s<seed>, from
    the arm's student, on the arm's images."""
    runs = []
    for seed in range(stage.seeds if stage.arms else 0):
        for arm in stage.arms:
            argv = list(arm.flags) + ["--steps", str(stage.steps), "--seed", str(seed),
                                      "--train-subset", str(PROTOCOL_REGIMES[arm.regime])]
            runs.append(ProtocolRun(f"{rnd.prefix}{arm.regime}/{arm.condition}-s{seed}", arm.regime,
                                    arm.condition, seed, argv + PROTOCOL_COMMON + PROTOCOL_FINETUNE,
                                    f"{arm.student}/student"))
    return runs


def probe_jobs() -> list[tuple[str, ProbeDesign, int]]:
    """Every probe trajectory of every round: (its name for --only, its design, its --seed)."""
    return [(f"{rnd.prefix}{probe_name(s.probe, t)}", s.probe, t) for rnd in ROUNDS
            for s in rnd.stages if s.probe for t in s.probe.trajectories]


def learning_curve(steps: int) -> list[str]:
    """Evaluations at every quarter of a student's training: the protocol's record of learning
    speed."""
    return [str(steps * k // 4) for k in (1, 2, 3)]


def run_protocol(python: str = sys.executable, jobs: int = 1,
                 only: tuple[str, ...] = ("*",)) -> None:
    """Runs what is missing: the runs from scratch, then round by round, stage by stage, its probe
    trajectories (one long job each, which resumes after its last probed point) and its
    fine-tunes; a stage's runs finish before the next stage's start. Skips finished runs (their
    summary is in results/protocol), resumes runs that were cut off, and retrains a missing
    starting checkpoint from its seed. `only`: globs over run names and probe_jobs' names; `jobs`
    runs that many fine-tunes at once (one GPU with spare CPU cores)."""
    code_version()  # the commit these runs train on, read before any of them starts
    runs = {r.name: r for r in protocol_runs()}
    todo = [r for r in runs.values() if matches(r.name, only) and not summary_done(r)]
    for run in [r for r in todo if r.init is None]:
        train_protocol_run(run, python)
    for init in dict.fromkeys(r.init for r in todo if r.init):  # before any fine-tune starts
        if not regime_student(runs[init].regime).is_file():
            print(f"protocol: {init} is missing: training it again from its seed")
            train_protocol_run(runs[init], python)
    pending = {r.name: r for r in todo if r.init}
    for rnd in ROUNDS:
        for stage in rnd.stages:
            for name, design, trajectory in probe_jobs():
                if design == stage.probe and matches(name, only):
                    run_probe_once(design, trajectory, runs, python)
            mine = [pending.pop(r.name) for r in stage_runs(stage, rnd) if r.name in pending]
            train_runs(mine, python, jobs)  # a run two stages share trains with the first
    report_protocol()


def train_runs(runs: list[ProtocolRun], python: str, jobs: int) -> None:
    if jobs <= 1:
        for run in runs:
            train_protocol_run(run, python)
    else:
        train_in_parallel(runs, python, jobs)


def run_probe_once(design: ProbeDesign, trajectory: int, runs: dict[str, ProtocolRun],
                   python: str) -> None:
    """One probe trajectory as a job of its own, unless its result is in results/."""
    if probe_done(PROTOCOL_RESULTS.parent / f"{probe_name(design, trajectory)}.json"):
        return
    student = runs[f"{design.regime}/student"]
    if not regime_student(student.regime).is_file():
        train_protocol_run(student, python)
    argv = (["--probe", next(k for k, d in PROBES.items() if d == design), "--init",
             tracked_name(regime_student(student.regime)), "--seed", str(trajectory),
             "--train-subset", str(PROTOCOL_REGIMES[design.regime])]
            + PROTOCOL_COMMON + PROTOCOL_FINETUNE)
    if len(design.trajectories) > 1:  # each trajectory's probe state in a folder of its own
        argv += ["--out", str(PROTOCOL_RUNS / probe_name(design, trajectory))]
    print(f"protocol: the probe: python {PROG} " + " ".join(argv), flush=True)
    process = subprocess.Popen([python, __file__, *argv],
                               env=os.environ | {PARENT_ENV: str(os.getpid())}, process_group=0)
    try:
        if process.wait() != 0:
            raise ReproError("the probe failed; rerun --reproduce")
    finally:
        end_protocol_run(process)



def protocol_argv(run: ProtocolRun) -> list[str]:
    init = ["--init", tracked_name(regime_student(run.init.split("/")[0]))] if run.init else []
    return run.argv + init + ["--out", str(PROTOCOL_RUNS / run.name)]


def matches(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def start_protocol_run(run: ProtocolRun, python: str,
                       log=None, env=None) -> tuple[subprocess.Popen, str]:
    """Starts a run in a process group of its own (it and its loader workers), which
    end_protocol_run signals; the child also watches this runner and ends when it is gone. A folder
    a live process holds is never deleted nor started again."""
    folder = PROTOCOL_RUNS / run.name
    holder = lock_holder(folder)
    if holder is not None:
        raise ReproError(f"protocol run {run.name} is still running "
                         f"(pid {holder} holds {folder / LOCK_NAME}): "
                         "wait for it to finish, or end it, and rerun; nothing was deleted")
    resume = (folder / "ckpt.pt").is_file() and not (folder / "metrics.json").is_file()
    if folder.exists() and not resume:
        # cut off before its first checkpoint, or a finished run being rebuilt
        shutil.rmtree(folder)
    argv = protocol_argv(run)
    command = "python repro.py " + " ".join(argv)
    print(f"protocol: {'resuming' if resume else 'starting'} {run.name}: {command}", flush=True)
    process = subprocess.Popen([python, R.__file__, *argv] + (["--resume"] if resume else []),
                               stdout=log, stderr=subprocess.STDOUT if log else None,
                               env=(env or os.environ) | {PARENT_ENV: str(os.getpid())},
                               process_group=0)
    return process, command


PROTOCOL_STOP_SECONDS = 30  # [ours] how long a run may take to checkpoint and end after SIGTERM


def end_protocol_run(process: subprocess.Popen) -> None:
    """SIGTERM to a run's process group (it checkpoints and ends, as on Ctrl-C), then SIGKILL."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(PROTOCOL_STOP_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue


def finish_protocol_run(run: ProtocolRun, process: subprocess.Popen, command: str) -> None:
    if process.wait() != 0:
        raise ReproError(f"protocol run {run.name} failed (exit status {process.returncode}); "
                         "rerun to resume it")
    folder = PROTOCOL_RUNS / run.name
    if run.condition == "student":
        export_student(str(folder / "ckpt.pt"), regime_student(run.regime), replace=True)
    PROTOCOL_RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(run_summary(run, folder, command), summary_path(run))


def train_protocol_run(run: ProtocolRun, python: str) -> None:
    process, command = start_protocol_run(run, python)
    try:
        finish_protocol_run(run, process, command)
    finally:  # the runner interrupted or failed: its run ends with it
        end_protocol_run(process)


def train_in_parallel(runs: list[ProtocolRun], python: str, jobs: int) -> None:
    """Up to `jobs` runs at once, each logging to runs/protocol/<name>.log and sharing the CPU
    cores evenly; a failed run is reported after the others finish."""
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    pending, active, failed = list(runs), [], []
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                log_path = PROTOCOL_RUNS / f"{run.name}.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = log_path.open("a")
                try:
                    active.append((run, log, *start_protocol_run(run, python, log, env)))
                except ReproError as e:  # held by a live run: the others go on
                    log.close()
                    failed.append(str(e))
            time.sleep(0.2)
            for job in [j for j in active if j[2].poll() is not None]:
                active.remove(job)
                run, log, process, command = job
                log.close()
                try:
                    finish_protocol_run(run, process, command)
                    print(f"protocol: finished {run.name}", flush=True)
                except ReproError as e:
                    failed.append(f"{e} (log: {PROTOCOL_RUNS / run.name}.log)")
    finally:  # the runner interrupted: every run it started ends with it
        for _, log, process, _ in active:
            end_protocol_run(process)
            log.close()
    if failed:
        raise ReproError("; ".join(failed))


def summary_path(run: ProtocolRun) -> Path:
    return PROTOCOL_RESULTS / (run.name.replace("/", "-") + ".json")


SUMMARY_FIELDS = dict(name=str, condition=str, regime=str, seed=int, steps=int,
                      minutes=(int, float), ap=(int, float), ap50=(int, float), ap75=(int, float))


def read_summary(path: Path) -> dict:
    """A run summary of results/protocol, or a ReproError naming the file: a truncated or
    hand-edited summary never enters a verdict, and its run counts as unfinished."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ReproError(f"{path} is not a readable run summary ({type(e).__name__}); "
                         "--reproduce redoes its run") from None
    wrong = [k for k, kind in SUMMARY_FIELDS.items() if not isinstance(summary, dict) or
             not isinstance(summary.get(k), kind) or isinstance(summary.get(k), bool)]
    if not wrong and not isinstance(summary.get("device_key", ""), str):
        wrong = ["device_key"]  # optional: summaries written before device keys have none
    if not wrong and summary["name"].replace("/", "-") + ".json" != path.name:
        wrong = ["name"]
    fault = f"bad or missing {', '.join(wrong)}" if wrong else ""
    if not wrong:  # NaN fails both comparisons
        far = [k for k in ("ap", "ap50", "ap75") if not 0 <= summary[k] <= 1]
        far += [k for k in ("minutes", "steps") if not 0 <= summary[k] < math.inf]
        fault = f"{', '.join(far)} out of range" if far else ""
    if fault:
        raise ReproError(f"{path} is not a run summary ({fault}); --reproduce redoes its run")
    return summary


def summary_done(run: ProtocolRun) -> bool:
    """Whether a run has a valid summary; a corrupt one is named in one line and its run is
    redone."""
    if not summary_path(run).is_file():
        return False
    try:
        read_summary(summary_path(run))
    except ReproError as e:
        print(f"protocol: {e}", flush=True)
        return False
    return True


def teacher_records(folder: Path) -> list[dict]:
    """Every teacher update of a finished run, from its final checkpoint; without one, the metric
    lines, which carry only the latest update at each line."""
    if (folder / "ckpt.pt").is_file():
        records = (load_checkpoint(folder / "ckpt.pt").get("teacher") or {}).get("records")
        if records is not None:
            return records
    return [r["teacher"] for r in read_jsonl(folder / "metrics.jsonl") if r.get("teacher")]


def teacher_drift(records: list[dict]) -> dict | None:
    """How far the teacher's bin probabilities moved over a run: L1 between its first output and its
    last, their entropy (nats; uniform over 10 bins is 2.303), and the output at every update.
    Round 1's records began with the [1/bins] placeholder the first pick was drawn from; round 2's
    (records with `next_bin`) hold the network's own outputs only."""
    probs = [r["probs"] for r in records if r.get("probs")]
    if not probs:
        return None
    first, last = np.array(probs[0]), np.array(probs[-1])
    entropy = [float(-(np.array(q) * np.log(np.clip(q, 1e-12, None))).sum()) for q in probs]
    out = dict(updates=len(probs), first=probs[0], last=probs[-1],
               l1=float(np.abs(last - first).sum()), max_prob=float(np.max(probs)))
    if "next_bin" in records[0]:
        out |= dict(entropy_first=entropy[0], entropy_last=entropy[-1], entropy_min=min(entropy),
                    series=[[r["step"], *r["probs"]] for r in records if r.get("probs")])
    return out


def run_summary(run: ProtocolRun, folder: Path, command: str) -> dict:
    final = json.loads((folder / "metrics.json").read_text())
    return dict(name=run.name, condition=run.condition, regime=run.regime, seed=run.seed,
                steps=final["steps"], minutes=round(final["train_minutes"], 2), ap=final["AP"],
                ap50=final["AP50"], ap75=final["AP75"], ap_sd=final.get("ap_sd"),
                ap_by_occlusion=final.get("ap_by_occlusion"), init=run.init, command=command,
                teacher=teacher_drift(teacher_records(folder)),
                **run_device(folder), code=code_version())


def run_device(folder: Path) -> dict:
    """Where a run trained, as its config.json recorded it: `device` ("cpu", or the GPU's name) and
    `device_key`; a run started before device keys gets what its config recorded, the rest
    unknown."""
    config = json.loads((folder / "config.json").read_text())
    device = config.get("device_name") or config.get("device", "?").split(":")[0]
    recorded = [config.get(k, "unknown") for k in ("precision", "threads", "torch")]
    key = config.get("device_key") or device_key(device, "instruction set unknown", *recorded)
    return dict(device=device, device_key=key)


def summary_device_key(summary: dict) -> str:
    """The device key a run summary pairs by. One written before device keys has only its `device`
    ("cpu" or the GPU's name): the machine and precision are unknown, and it pairs, as it did, with
    the others of that device written before keys."""
    old = f"{summary.get('device', '?')} (written before device keys: the rest unknown)"
    return summary.get("device_key") or old


# ---- The statistics: pairs within one device key, the paired test, the probe's test

def condition_runs(runs: list[dict], condition: str, regime: str) -> list[dict]:
    """A condition's finished runs in a regime; a condition in SAME_RUNS reads the runs it
    equals."""
    source = SAME_RUNS.get(condition, condition)
    return [r for r in runs if r["condition"] == source and r["regime"] == regime]


def seed_pairs(runs: list[dict], better: str, worse: str, regime: str,
               seeds: tuple[int, ...] | None = None) -> tuple[list[tuple[dict, dict]], list[int]]:
    """The runs of two conditions of a regime on the seeds both have finished (of `seeds`, if
    given), in seed order, paired only where both trained under one device key (summary_device_key):
    a pair across machines, instruction sets or precisions is not formed. Returns (pairs, the seeds
    refused)."""
    def by_seed(condition):
        return {r["seed"]: r for r in condition_runs(runs, condition, regime)
                if seeds is None or r["seed"] in seeds}

    a, b = by_seed(better), by_seed(worse)
    both = sorted(set(a) & set(b))
    same = [s for s in both if summary_device_key(a[s]) == summary_device_key(b[s])]
    return [(a[s], b[s]) for s in same], [s for s in both if s not in same]


def paired_aps(runs: list[dict], better: str, worse: str, regime: str,
               seeds: tuple[int, ...] | None = None) -> tuple[list[float], list[float]]:
    """The APs of seed_pairs: the pairs that the verdicts and the figure compare."""
    pairs = seed_pairs(runs, better, worse, regime, seeds)[0]
    return [a["ap"] for a, _ in pairs], [b["ap"] for _, b in pairs]


def precision_assurance(n: int, sd: float, delta: float) -> float:
    """P(the 95% interval's half-width of n paired differences with sd `sd` is below delta): how
    likely the interval is narrow enough to tell an effect of delta from none. Not the power."""
    from scipy.stats import chi2, t

    limit = delta * math.sqrt(n) / (t.ppf(0.975, n - 1) * sd)
    return float(chi2.cdf((n - 1) * limit ** 2, n - 1))


def t_test_power(n: int, sd: float, delta: float) -> float:
    """The conventional power of the two-sided paired t-test at 5%: P(reject 0) when the true
    mean difference is delta, from the noncentral t."""
    from scipy.stats import nct, t

    crit, shift = t.ppf(0.975, n - 1), delta * math.sqrt(n) / sd
    return float(nct.sf(crit, n - 1, shift) + nct.cdf(-crit, n - 1, shift))


def seeds_for(sd: float, delta: float, target: float, measure=precision_assurance) -> int:
    """The fewest n >= 3 whose `measure` reaches `target`."""
    n = 3
    while measure(n, sd, delta) < target:
        n += 1
    return n


def paired_test(d: list[float], delta: float) -> dict:
    """Rules v2 and v3 on one comparison (results/protocol/README.md), written before their runs: a
    paired two-sided t-test at 5% with its 95% interval. Reproduced: the interval lies above 0;
    contradicted: below 0; no effect of delta or more: inside (-delta, +delta); otherwise
    inconclusive. Fewer than 3 pairs is inconclusive."""
    from scipy.stats import t

    d = np.asarray(d, np.float64)
    out = dict(n=len(d), delta=delta, mean=float(d.mean()) if len(d) else None)
    if len(d) < 3:
        return out | dict(verdict="inconclusive", reason=f"{len(d)} seed pairs finished")
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    half = float(t.ppf(0.975, len(d) - 1) * se)
    lo, hi = out["mean"] - half, out["mean"] + half
    p = float(2 * t.sf(abs(out["mean"]) / se, len(d) - 1)) if se > 0 else 0.0
    verdict = ("reproduced" if lo > 0 else "contradicted" if hi < 0 else
               "no effect of delta or more" if -delta < lo and hi < delta else "inconclusive")
    reason = (f"mean {out['mean']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}], p = {p:.2g}, "
              f"{len(d)} seeds, delta {delta}")
    return out | dict(lo=lo, hi=hi, p=p, sd=float(d.std(ddof=1)), verdict=verdict, reason=reason)


def planned_test(d: list[float], stage: Stage, rule: Rule, label: str, **more) -> dict:
    """paired_test at the stage's delta, with the seeds planned and what the rule would plan at the
    sd now measured; pending below the planned seeds (no optional stopping)."""
    test = paired_test(d, stage.delta) | dict(label=label, planned_seeds=stage.seeds, **more)
    if test.get("sd"):
        sd, delta = test["sd"], stage.delta
        test |= dict(power_now=t_test_power(stage.seeds, sd, delta),
                     assurance_now=precision_assurance(stage.seeds, sd, delta),
                     seeds_needed_now=rule.seeds(sd, delta))
    if test["n"] < stage.seeds:
        test["verdict"] = f"pending ({test['n']} of {stage.seeds} seeds)"
    return test


def pair_tests(stage: Stage, rule: Rule, runs: list[dict]) -> list[dict]:
    """One planned_test per comparison, on the stage's images, over the pairs of one device key."""
    tests = []
    for better, worse in stage.comparisons:
        pairs, refused = seed_pairs(runs, better, worse, stage.arms[0].regime)
        more = dict(not_paired=refused) if refused else {}
        tests.append(planned_test([a["ap"] - b["ap"] for a, b in pairs], stage, rule,
                                  f"{better} - {worse}", better=better, worse=worse, **more))
    return tests


def contrast_tests(stage: Stage, rule: Rule, runs: list[dict]) -> list[dict]:
    """The 2x2 of images by student (round 3, stage c): per seed, d = mask - include in each cell;
    the images contrast (d on 1000 images - d on 100, mean over students) and the student
    contrast (d from the full regime's student - d from the scarce one's, mean over images)."""
    big, small = PROTOCOL_REGIMES  # full: 1000 images and its student; scarce: 100 and its own
    d, keys = {}, {}
    for better, worse in stage.comparisons:
        student = better.rsplit("-from-", 1)[1]
        for images in PROTOCOL_REGIMES:
            for a, b in seed_pairs(runs, better, worse, images)[0]:
                d[images, student, a["seed"]] = a["ap"] - b["ap"]
                keys.setdefault(a["seed"], set()).add(summary_device_key(a))
    whole = sorted({s for (_, _, s) in d if all((i, st, s) in d for i in (big, small)
                                                for st in (big, small))})
    seeds = [s for s in whole if len(keys[s]) == 1]  # a seed's eight runs under one device key
    refused = (dict(not_paired=[s for s in whole if s not in seeds]) if len(seeds) < len(whole)
               else {})
    images = [np.mean([d[big, st, s] - d[small, st, s] for st in (big, small)]) for s in seeds]
    student = [np.mean([d[i, big, s] - d[i, small, s] for i in (big, small)]) for s in seeds]
    return [planned_test(images, stage, rule, "images: d on 1000 - d on 100",
                         better="d on 1000 images", worse="d on 100 images", **refused),
            planned_test(student, stage, rule, f"student: d from {big} - d from {small}",
                         better=f"d from the {big} student", worse=f"d from the {small} student",
                         **refused)]


def two_way_anova(use: np.ndarray) -> dict:
    """(points, bins, seeds) with seeds as replicates: F-tests of the bins' main effect and of the
    bin x point interaction (does which bin helps most change over training?)."""
    from scipy.stats import f

    P, B, S = use.shape
    grand, cells = use.mean(), use.mean(2)
    ss_points = B * S * ((cells.mean(1) - grand) ** 2).sum()
    ss_bins = P * S * ((cells.mean(0) - grand) ** 2).sum()
    ss_inter = S * ((cells - grand) ** 2).sum() - ss_points - ss_bins
    ms_error = ((use - cells[..., None]) ** 2).sum() / (P * B * (S - 1))
    df_bins, df_inter = B - 1, (P - 1) * (B - 1)
    f_bins, f_inter = ss_bins / df_bins / ms_error, ss_inter / df_inter / ms_error
    return dict(f_bins=float(f_bins), p_bins=float(f.sf(f_bins, df_bins, P * B * (S - 1))),
                f_interaction=float(f_inter),
                p_interaction=float(f.sf(f_inter, df_inter, P * B * (S - 1))))


def tau_interval(use: np.ndarray, draws: int = 2000) -> tuple[float, float, float]:
    """Kendall tau between the first and last points' bin rankings, and its 95% bootstrap interval
    over the probe seeds (resampled independently at each point)."""
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    first, last = use[0], use[-1]
    tau = float(kendalltau(first.mean(1), last.mean(1)).statistic)
    S = use.shape[2]
    taus = [kendalltau(first[:, rng.integers(0, S, S)].mean(1),
                       last[:, rng.integers(0, S, S)].mean(1)).statistic
            for _ in range(draws)]
    lo, hi = np.nanpercentile(taus, [2.5, 97.5])
    return tau, float(lo), float(hi)


def probe_test(use: np.ndarray) -> dict:
    """Claim 3 in two parts on (points, bins, replicates), as probe v2's rule fixed it and rule v3
    keeps it, on the probed bins. Bins differ: supported when the bins' main effect has p < 0.05,
    else not supported. Which bins are useful changes over training: shown when the bin x point
    interaction has p < 0.05; contradicted when it has p >= 0.05 and the bootstrap interval of
    tau(first, last) lies above 0.6 (the first and last rankings agree); otherwise not shown."""
    use = use[:, np.isfinite(use).all((0, 2))]
    anova, (tau, lo, hi) = two_way_anova(use), tau_interval(use)
    differ = "supported" if anova["p_bins"] < 0.05 else "not supported"
    changes = ("shown" if anova["p_interaction"] < 0.05 else "contradicted" if lo > 0.6
               else "not shown")
    reason = (f"bins: F = {anova['f_bins']:.2f}, p = {anova['p_bins']:.2g}; bin x point: F = "
              f"{anova['f_interaction']:.2f}, p = {anova['p_interaction']:.2g}; "
              f"tau first-last {tau:.2f} [{lo:.2f}, {hi:.2f}]; {use.shape[1]} bins, "
              f"{use.shape[0]} points, {use.shape[2]} replicates")
    return dict(bins_differ=differ, ranking_changes=changes, reason=reason, tau=tau, tau_lo=lo,
                tau_hi=hi, **anova)


def trajectory_test(stage: Stage, results: Path) -> dict:
    """Probe v3's test: each trajectory's usefulness, mean over its probe seeds, as a replicate."""
    design, use = stage.probe, []
    for t in design.trajectories:
        path = results / f"{probe_name(design, t)}.json"
        probe = read_probe(path)
        want = dict(design=design.name, trajectory=t, points=list(design.points),
                    probe_lr=design.lr, keep_bn=design.keep_bn,
                    train_subset=PROTOCOL_REGIMES[design.regime])
        wrong = [k for k, v in want.items() if probe.get(k) != v]
        shape = np.shape(probe.get("usefulness"))
        if wrong or len(shape) != 3 or shape[0] != len(design.points):
            raise ReproError(f"{path} is not a result of {design.name}, trajectory {t} "
                             f"(bad or missing {', '.join(wrong) or 'usefulness'}); "
                             "delete it and rerun --reproduce")
        use.append(np.array(probe["usefulness"], np.float64).mean(2))
    return probe_test(np.stack(use, 2))


# ---- The probe (claim 3): a uniform run, and copies of its student trained on one bin each

def fixed_val_batch(data: Data, cfg: Config, crops: int) -> Batch:
    """`crops` person-centric crops of the val set, without augmentation: the probe's yardstick."""
    maker = BatchMaker(dataclasses.replace(data, train=data.val, synthetic=None, bank=None),
                       dataclasses.replace(cfg, mode="real"))
    return maker.batch(maker.plan(crops, np.random.default_rng(crops)), None)


@torch.no_grad()
def val_loss(model: nn.Module, batch: Batch, cfg: Config, device) -> float:
    model.eval()
    with autocast(device, cfg):
        outputs = model(to_input(batch.image, device))
    loss, _ = pose_loss(outputs, batch.target.to(device), batch.loss_mask.to(device))
    model.train()
    return float(loss)


def probe_pools(pools: list[np.ndarray], min_bin: int,
                equal_people: bool) -> list[np.ndarray | None]:
    """The pools a probe trains on: None for bins too small to train on; with equal_people, every
    other bin subsampled (fixed draw) to the smallest one's size."""
    probed = [p if len(p) > min_bin else None for p in pools]
    if not equal_people or not any(p is not None for p in probed):
        return probed
    n = min(len(p) for p in probed if p is not None)
    rng = np.random.default_rng(n)
    return [p if p is None else p[np.sort(rng.choice(len(p), n, replace=False))] for p in probed]


def bin_usefulness(trainer: Trainer, val_batch: Batch, lr: float, pools: list, design: ProbeDesign,
                   tick=lambda: None) -> np.ndarray:
    """(bins, seeds) drop of the val loss after design.steps steps on one bin; NaN for bins not
    probed. The student and its optimiser are restored afterwards; `tick` is called after each
    step."""
    cfg = trainer.cfg
    saved = copy.deepcopy((trainer.model.state_dict(), trainer.optimizer.state_dict()))
    before = val_loss(trainer.model, val_batch, cfg, trainer.device)
    out = np.full((cfg.bins, len(design.seeds)), np.nan)
    for b, pool in enumerate(pools):
        if pool is None:
            continue
        for s, seed in enumerate(design.seeds):
            trainer.model.load_state_dict(saved[0])
            trainer.optimizer.load_state_dict(saved[1])
            for t in range(design.steps):
                rng = np.random.default_rng([cfg.seed, trainer.step, b, seed, t])
                trainer.train_step(trainer.maker.batch(
                    trainer.maker.plan(cfg.batch_size, rng, pool), rng), lr)
                tick()
            if design.keep_bn:  # what the probe's batches did to the running statistics is not read
                kept = {k: saved[0][k] for k in batchnorm_keys(trainer.model)}
                trainer.model.load_state_dict(kept, strict=False)
            out[b, s] = before - val_loss(trainer.model, val_batch, cfg, trainer.device)
    trainer.model.load_state_dict(saved[0])
    trainer.optimizer.load_state_dict(saved[1])
    return out


def batchnorm_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of a model's BatchNorm running statistics (means, variances, counts)."""
    names = {id(m): name for name, m in model.named_modules()}
    return [f"{names[id(m)]}.{key}" if names[id(m)] else key for m in batchnorm_modules(model)
            for key, _ in m.named_buffers(recurse=False)]


PROBE_STATE = "probe.pt"  # in the probe's folder: the uniform run and the points probed so far


def resume_probe(trainer: Trainer, path: Path, design: ProbeDesign) -> tuple[list[dict], float]:
    """The points already probed and the wall seconds they took, with the trainer restored to the
    last of them; ([], 0) for a new probe. A state of another design or other settings is refused,
    never overwritten."""
    if not path.is_file():
        return [], 0.0
    state = load_checkpoint(path)
    saved = state.get("trainer", {}).get("config", {})
    here = dataclasses.asdict(trainer.cfg)
    differ = [f"{config_flag(k)} {saved.get(k)} (here: {v})" for k, v in here.items()
              if saved.get(k) != v]
    if state.get("design") != design._asdict() or differ:
        what = ", ".join(differ[:3]) or f"design {state.get('design', {}).get('name')}"
        raise ReproError(f"{path} holds a probe with other settings ({what}): "
                         f"delete {path.parent} to start it again, or use another --out")
    trainer.restore(state["trainer"], path)
    points = state["points"]
    print(f"resumed the probe in {path.parent} at step {trainer.step} "
          f"(probed: {[p['step'] for p in points]})")
    return points, state.get("seconds", 0.0)


def probe_point(trainer: Trainer, val_batch: Batch, pools: list, design: ProbeDesign,
                points: list[dict], state: Path, t0: float, tick) -> None:
    """Probes every bin at the trainer's step (unless a resumed probe has), then saves the probe's
    state: the uniform run, the points so far and the wall seconds since t0."""
    if trainer.step in {p["step"] for p in points}:
        return
    lr = design.lr if design.lr is not None else learning_rate(trainer.cfg, trainer.step,
                                                                 trainer.step / trainer.cfg.steps)
    use = bin_usefulness(trainer, val_batch, lr, pools, design, tick)
    points.append(dict(step=trainer.step, usefulness=use.tolist()))
    save_atomic(dict(trainer=trainer.state(), points=points, design=design._asdict(),
                     seconds=time.perf_counter() - t0), state)
    probed = np.isfinite(use).all(1)
    print(f"probe at step {trainer.step}: "
          f"mean usefulness of bins {np.nonzero(probed)[0].tolist()}: "
          f"{np.round(use[probed].mean(1), 2).tolist()}", flush=True)



def run_probe(cfg: Config, data: Data, device: torch.device, out: Path,
              design: ProbeDesign = PROBES["v1"]) -> dict:
    """Trains the uniform condition to the last probe point, probing every bin at each point. Each
    point's result is saved with the run's state (out/probe.pt), so a probe cut off resumes after
    its last point and ends with the same result."""
    cfg = dataclasses.replace(cfg, mode="student-teacher", teacher_uniform=True,
                              teacher_stratified=False, steps=max(design.points))
    trainer = Trainer(cfg, data, device, out)
    lock = hold_run_dir(out)
    try:
        points, seconds = resume_probe(trainer, out / PROBE_STATE, design)
        t0 = time.perf_counter() - seconds
        pools = probe_pools(trainer.teacher.pools, cfg.teacher_min_bin, design.equal_people)
        # student steps
        per_point = sum(q is not None for q in pools) * len(design.seeds) * design.steps
        done = trainer.step + len(points) * per_point
        with rh.progress(total=cfg.steps + len(design.points) * per_point, initial=done,
                         desc="probe", unit="step", stream=sys.stdout) as bar:
            here = functools.partial(probe_point, trainer,
                                     fixed_val_batch(data, cfg, design.val_crops), pools, design,
                                     points, out / PROBE_STATE, t0, lambda: bar.update(1))
            for step, batch in trainer.batches():
                if step in design.points:
                    here()
                lr = learning_rate(cfg, step, step / cfg.steps)
                trainer.teacher.observe(step, batch, trainer.train_step(batch, lr), lr)
                trainer.step = step + 1
                bar.update(1)
            here()
    finally:
        lock.unlink(missing_ok=True)
    use = np.array([p["usefulness"] for p in points])  # (points, bins, seeds)
    result = dict(points=[p["step"] for p in points], edges=trainer.teacher.edges(),
                  counts=trainer.teacher.counts, usefulness=use.tolist(),
                  steps_per_probe=design.steps, seeds=list(design.seeds),
                  val_crops=design.val_crops,
                  wall_minutes=round((time.perf_counter() - t0) / 60, 1), design=design.name,
                  regime=design.regime, probed_people=[0 if q is None else len(q) for q in pools],
                  test=probe_test(use))
    if design.lr is not None:
        result |= dict(probe_lr=design.lr, keep_bn=design.keep_bn, trajectory=cfg.seed,
                       train_subset=cfg.train_subset)
    return result


# ---- The report: rounds 1-2 reprinted, round 3 read, the README's answer, the figures

README_MARKERS = ("<!-- claims:start -->", "<!-- claims:end -->")


def read_probe(path: Path) -> dict | None:
    try:
        probe = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ReproError(f"{path} is not readable json ({type(e).__name__}); delete it and rerun "
                         "--reproduce to redo the probe") from None
    if probe is not None and not isinstance(probe, dict):
        raise ReproError(f"{path} is not the probe's result; "
                         "delete it and rerun --reproduce to redo the probe")
    return probe


def probe_done(path: Path) -> bool:
    """Whether a probe trajectory has its result (an empty one counts as not run)."""
    return bool((read_probe(path) or {}).get("usefulness"))


def read_frozen(path: Path) -> dict:
    """Rounds 1 and 2's verdicts as their rules computed them (results/rounds-1-2.json)."""
    def fault(frozen):
        rounds = [frozen.get(r) if isinstance(frozen, dict) else None for r in ("round1", "round2")]
        if not all(isinstance(r, dict) and isinstance(r.get("rule"), str)
                   and isinstance(r.get("verdicts"), dict) for r in rounds):
            return "bad or missing round1, round2, their rule or verdicts"
        second = rounds[1]
        if not (isinstance(second.get("delta"), dict) and isinstance(second.get("probe"), dict)
                and all(isinstance(v, dict) and isinstance(v.get("per_regime"), dict)
                        for v in second["verdicts"].values())):
            return "bad or missing round2 delta, probe or per_regime"
        return None

    try:
        frozen = json.loads(path.read_text())
        why = fault(frozen)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = type(e).__name__
    if why:
        raise ReproError(f"{path} is not rounds 1-2's frozen verdicts ({why}); restore it with: "
                         f"git checkout {path}")
    return frozen


def round_progress(runs: list[dict], results: Path) -> dict:
    """Per round: its runs and probe trajectories finished, of those planned (a run an earlier
    round has counts there)."""
    done, seen, out = {r["name"] for r in runs}, set(), {}
    for rnd in ROUNDS:
        names = [r.name for s in rnd.stages for r in stage_runs(s, rnd)] + (
            [r.name for r in scratch_runs()] if rnd is ROUND1 else [])
        names = list(dict.fromkeys(n for n in names if n not in seen))
        seen |= set(names)
        probes = [probe_name(s.probe, t) for s in rnd.stages if s.probe
                  for t in s.probe.trajectories]
        out[rnd.name] = dict(finished=len(done & set(names)), planned=len(names),
                             probes=sum(probe_done(results / f"{p}.json") for p in probes),
                             probes_planned=len(probes))
    return out


def report_protocol(results: Path | None = None, readme: Path = Path("README.md")) -> dict:
    """claims.json, claims.md, claims.png and the README's answer table, from the run summaries in
    results/protocol, the probes' results and the frozen rounds alone (no training)."""
    results = results or PROTOCOL_RESULTS.parent
    current = {r.name: r for r in protocol_runs()}
    runs = [read_summary(p) for p in sorted((results / "protocol").glob("*.json"))]
    # the command that reproduces a run with this code (the protocol's one definition)
    for r in runs:
        if r["name"] in current:
            r["command"] = "python repro.py " + " ".join(protocol_argv(current[r["name"]]))
    early = [r for r in runs if not r["name"].startswith(CURRENT.prefix)]
    frozen = read_frozen(results / FROZEN_ROUNDS.name)
    probes = {d.name: read_probe(results / f"{d.name}.json") for d in (PROBES["v1"], PROBES["v2"])}
    teacher = {r["name"]: r["teacher"] for r in early if r.get("teacher")}
    series = {name: t["series"] for name, t in teacher.items()
              if name.startswith("scarce/teacher-3000") and "series" in t}
    # each update's probabilities are in the run's own summary (runs); claims.json keeps them once
    teacher = {name: {k: v for k, v in t.items() if k != "series"} for name, t in teacher.items()}
    claims = dict(runs=runs, progress=round_progress(runs, results), frozen=frozen,
                  round3=[stage_status(s, runs, results) for s in CURRENT.stages], teacher=teacher,
                  protocol=dict(regimes=PROTOCOL_REGIMES, student_steps=PROTOCOL_STUDENT_STEPS,
                                finetune_steps=PROTOCOL_FINETUNE_STEPS,
                                conditions={name: c.flags for name, c in CONDITIONS.items()},
                                common=PROTOCOL_COMMON + PROTOCOL_FINETUNE))
    write_json(claims, results / "claims.json")
    table = claims_table(claims)
    with atomic_path(results / "claims.md") as tmp:
        tmp.write_text(table)
    # the figures agree with claims.md: without runs (or a probe) an older figure is removed
    figures = {"claims.png": (save_claims_figure, (early, frozen["round2"]["verdicts"]))
               if early else None,
               **{f"{name}.png": (save_probe_figure, (p,)) if p else None
                  for name, p in probes.items()},
               "teacher-vs-probe.png": (save_teacher_and_probe_figure, (series, probes["probe-v2"]))
               if series or probes["probe-v2"] else None}
    for name, figure in figures.items():
        if figure:
            figure[0](*figure[1], results / name)
        else:
            (results / name).unlink(missing_ok=True)
    if readme.is_file() and all(m in readme.read_text() for m in README_MARKERS):
        head, rest = readme.read_text().split(README_MARKERS[0], 1)
        tail = rest.split(README_MARKERS[1], 1)[1]
        with atomic_path(readme) as tmp:
            tmp.write_text(f"{head}{README_MARKERS[0]}\n"
                           f"{answer_table(claims)}{README_MARKERS[1]}{tail}")
    print(table)
    return claims


def mean_sd(values: list[float], scale: float = 1.0) -> str:
    if not values:
        return "-"
    v = np.array(values) * scale
    return f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else "")


def real_crops_per_step(condition: str) -> int:
    """Real crops in a step's batch of a protocol condition, as its record says (no flags
    parsed)."""
    name = SAME_RUNS.get(condition, condition)
    return (STUDENT_CONDITIONS | CONDITIONS | LONG_CONDITIONS)[name].real_crops


def minutes_by_device(runs: list[dict]) -> str:
    """Mean training minutes per device: a GPU's minutes and a CPU's do not average."""
    devices = sorted({r.get("device", "?") for r in runs})
    return ", ".join(
        f"{np.mean([r['minutes'] for r in runs if r.get('device', '?') == d]):.1f} ({d})"
        for d in devices)


def claims_table(claims: dict) -> str:
    """claims.md: each round's progress; rounds 1 and 2's verdicts as frozen; round 3's stages;
    every condition's AP; where the runs trained; the teachers' drift."""
    runs, progress, frozen = claims["runs"], claims["progress"], claims["frozen"]
    bins = list(OCCLUSION_BINS)
    lines = [f"`python {PROG} --reproduce` runs (and resumes) the protocol; "
             f"`python {PROG} --report` rebuilds this file and "
             "`results/claims.{json,png}` from `results/protocol/`, the probes' "
             "results and `results/rounds-1-2.json` alone.", "",
             "Progress: " + "; ".join(f"round {name}: {p['finished']} of {p['planned']} runs, "
                                      f"{p['probes']} of {p['probes_planned']} probe trajectories"
                                      for name, p in progress.items()) + ".", "",
             *round2_table(frozen), "", *round3_table(claims.get("round3", [])), "",
             "| regime | condition | real crops / step | seeds | steps | "
             "AP (mean ± sd over seeds) | AP50 | "
             + " | ".join(f"AP {b}" for b in bins) + " | bootstrap sd | train min (device) |",
             "|---" * (9 + len(bins)) + "|"]
    for regime in PROTOCOL_REGIMES:
        for condition in REPORTED_CONDITIONS:
            rs = [r for r in condition_runs(runs, condition, regime)
                  if not r["name"].startswith(CURRENT.prefix)]
            if not rs:
                continue
            occ = [mean_sd([r["ap_by_occlusion"][b] for r in rs if r.get("ap_by_occlusion")])
                   for b in bins]
            label = (f"{condition} (= {SAME_RUNS[condition]}'s runs)" if condition in SAME_RUNS
                     else condition)
            lines.append(f"| {regime} | {label} | {real_crops_per_step(condition)} | {len(rs)} | "
                         f"{rs[0]['steps']} | {mean_sd([r['ap'] for r in rs])} | "
                         f"{mean_sd([r['ap50'] for r in rs])} | " + " | ".join(occ)
                         + f" | {mean_sd([r['ap_sd'] for r in rs if r.get('ap_sd') is not None])}"
                         f" | {minutes_by_device(rs)} |")
    lines += ["", f"Where the runs trained: {where_trained(runs)}. "
              "Train minutes compare only within a device.",
              *device_keys_note(runs), "",
              "**Round 1** (superseded; frozen in `results/rounds-1-2.json`): "
              f"rule {frozen['round1']['rule']}", "", "| claim | verdict | reason |",
              "|---|---|---|"]
    for claim, v in frozen["round1"]["verdicts"].items():
        lines.append(f"| {claim}: {v['claim']} | **{v['verdict']}** | {v['reason']} |")
    drift = [(name, t) for name, t in claims["teacher"].items() if "uniform" not in name]
    if drift:
        lines += ["", "| teacher run | updates | L1 drift of its bin probabilities | "
                  "largest probability |", "|---|---|---|---|"]
        lines += [f"| {name} | {t['updates']} | {t['l1']:.3f} | {t['max_prob']:.3f} |"
                  for name, t in drift]
    return "\n".join(lines) + "\n"


def interval_reading(t: dict) -> str:
    """What a rule-v2 interval can and cannot exclude, in words."""
    if "lo" not in t:
        return "no interval yet"
    inside = [name for name, x in (("0", 0.0), ("+delta", t["delta"]), ("-delta", -t["delta"]))
              if t["lo"] <= x <= t["hi"]]
    return (f"excludes effects below {t['lo']:+.4f} and above {t['hi']:+.4f}"
            + (f"; cannot exclude {', '.join(inside)}" if inside else ""))


TEST_HEADER = ("| comparison | regime | earlier verdict | verdict | "
               "paired AP difference, 95% CI, p | seeds (planned) | "
               "power at delta (t-test, measured sd) | precision assurance at the "
               "measured sd | what the interval excludes |", "|---" * 9 + "|")


def ci_text(t: dict) -> str:
    """A paired test's mean difference and 95% interval, as every table prints them."""
    return f"{t['mean']:+.4f} [{t['lo']:+.4f}, {t['hi']:+.4f}]"


def test_row(label: str, regime: str, earlier: str, t: dict) -> str:
    """One paired test (rules v2 and v3) as a row of TEST_HEADER."""
    ci = f"{ci_text(t)}, p = {t['p']:.2g}" if "lo" in t else "-"
    power = (f"{t['power_now']:.2f} | {t['assurance_now']:.2f} (needs {t['seeds_needed_now']})"
             if t.get("power_now") is not None else "- | -")
    refused = t.get("not_paired")
    refused = f"; seeds {refused} not paired: device keys differ" if refused else ""
    return (f"| {label} | {regime} | {earlier} | **{t['verdict']}** | {ci} | "
            f"{t['n']} ({t['planned_seeds']}){refused} | {power} | {interval_reading(t)} "
            f"(delta {t['delta']}) |")


def probe_rows(regime: str, earlier: str, test: dict | None, replicates: str) -> list[str]:
    """Claim 3's two parts as rows of TEST_HEADER: the two-way ANOVA's tests and tau's interval."""
    if not test:
        return [f"| 3: {part} | {regime} | {earlier} | **pending** | - | - | - | - | - |"
                for part in ("bins differ", "which bins are useful changes over training")]
    agree = ("; cannot exclude identical ones" if test["tau_hi"] >= 1 - 1e-9 else "")
    return [f"| 3: bins differ | {regime} | {earlier} | **{test['bins_differ']}** | "
            f"bins' main effect F = {test['f_bins']:.2f}, p = {test['p_bins']:.2g} "
            f"(two-way ANOVA, points x bins) | {replicates} | - | - | "
            "a test, not an interval: p < 0.05 rejects equally useful bins |",
            f"| 3: which bins are useful changes over training | {regime} | (as above) | "
            f"**{test['ranking_changes']}** | "
            f"bin x point interaction F = {test['f_interaction']:.2f}, "
            f"p = {test['p_interaction']:.2g}; tau first-last {test['tau']:.2f} "
            f"[{test['tau_lo']:.2f}, {test['tau_hi']:.2f}] | {replicates} | - | - | "
            "tau's interval excludes first and last "
            f"rankings that agree less than tau {test['tau_lo']:.2f}{agree} |"]


def round2_table(frozen: dict) -> list[str]:
    """Rule v2's verdicts as frozen, each beside rule v1's verdict of its claim and regime."""
    v1, v2 = frozen["round1"]["verdicts"], frozen["round2"]
    seeds = len(PROBES["v2"].seeds)
    lines = ["**Round 2** (frozen in `results/rounds-1-2.json`; claim 3's rows are withdrawn, see "
             f"results/protocol/README.md): rule {v2['rule']}", "", *TEST_HEADER]
    for claim, v in v2["verdicts"].items():
        if claim == "4":
            lines += probe_rows("scarce", f"{v1['3']['verdict']} (probe v1, full)", v2["probe"],
                                f"{seeds} ({seeds})")
        for regime, t in v["per_regime"].items():
            old = v1.get(claim, {}).get("per_regime", {}).get(regime, "-")
            old = old if claim != "4" else f"{old} (teacher - uniform, 800 steps)"
            lines.append(test_row(f"{claim}: {v['better']} - {v['worse']}", regime, old, t))
    return lines


# [ours] Measured rates that price a stage before it runs. This machine (AMD EPYC, AVX2, float32,
# 2 cores) trains the demo network at about 7 img/s (--bench), 2.3 s per 16-crop step, 7.4 times
# the 0.31 s per step of round 2's 3000-step runs on an Intel bf16 machine (their summaries'
# minutes over steps); evaluation took about a minute there, so about 7 here.
CPU_SECONDS_PER_STEP = 2.3
CPU_EVAL_MINUTES = 7.0
# [ours] H200: the median of round 1's 18 H200 fine-tunes (0.057 s per step, six side by side);
# six scarce fine-tunes took 1.5 minutes in all, 0.7-0.8 of it training
# (results/protocol/README.md).
GPU_SECONDS_PER_STEP = 0.057
GPU_JOBS = 6
GPU_EVAL_MINUTES = 0.75  # per batch of GPU_JOBS runs side by side
PROBED_BINS = 5  # [ours] the scarce regime's bins over 32 people, as probe v2 found them


def stage_work(stage: Stage) -> tuple[int, int, bool]:
    """(jobs, steps per job, whether each job ends with an evaluation of the val set)."""
    if stage.probe:
        d = stage.probe
        probes = len(d.points) * PROBED_BINS * len(d.seeds) * d.steps
        return len(d.trajectories), max(d.points) + probes, False
    return len(stage_runs(stage, CURRENT)), stage.steps, True


def stage_cost(stage: Stage) -> dict:
    """Hours on this 2-core CPU, one job at a time; minutes on one H200, GPU_JOBS side by side."""
    jobs, steps, evaluates = stage_work(stage)
    cpu = jobs * (steps * CPU_SECONDS_PER_STEP / 60 + evaluates * CPU_EVAL_MINUTES) / 60
    per_batch = steps * GPU_SECONDS_PER_STEP / 60 + evaluates * GPU_EVAL_MINUTES
    gpu = math.ceil(jobs / GPU_JOBS) * per_batch
    return dict(jobs=jobs, steps_per_job=steps, cpu_hours=round(cpu, 1), gpu_minutes=round(gpu))


def stage_plan(stage: Stage) -> str:
    """The seeds and the power behind them, in words."""
    if stage.sd is None:
        return f"{stage.seeds} trajectories: {stage.sd_source}"
    power, assurance = (f(stage.seeds, stage.sd, stage.delta)
                        for f in (t_test_power, precision_assurance))
    return (f"{stage.seeds} seeds: power {power:.2f} at delta {stage.delta}, precision assurance "
            f"{assurance:.2f}, at paired sd {stage.sd} ({stage.sd_source})")


def stage_status(stage: Stage, runs: list[dict], results: Path, rnd: Round = CURRENT) -> dict:
    """A stage of the current round: finished of planned, "pending" until every planned run or
    trajectory has its result, then its rule's tests; decided only when no test is still pending
    (a comparison with another stage's runs waits for them too)."""
    if stage.probe:
        names = [probe_name(stage.probe, t) for t in stage.probe.trajectories]
        done = sum(probe_done(results / f"{n}.json") for n in names)
    else:
        names = [r.name for r in stage_runs(stage, rnd)]
        done = len({r["name"] for r in runs} & set(names))
    mine = [r for r in runs if r["name"].startswith(rnd.prefix) and r["seed"] < stage.seeds]
    tests = [] if done < len(names) else (
        [trajectory_test(stage, results)] if stage.read == "probe" else
        {"pairs": pair_tests, "contrasts": contrast_tests}[stage.read](stage, rnd.rule, mine))
    words = ([f"bins differ: {t['bins_differ']}; ranking changes: {t['ranking_changes']}"
              for t in tests] if stage.probe else [f"{t['label']}: {t['verdict']}" for t in tests])
    decided = bool(tests) and not any(t.get("verdict", "").startswith("pending") for t in tests)
    conditions = list(dict.fromkeys(f"{a.regime}/{a.condition}" for a in stage.arms))
    regime = ("images x student" if stage.read == "contrasts" else
              stage.arms[0].regime if stage.arms else stage.probe.regime)
    return dict(key=stage.key, question=stage.question, claim=stage.claim, read=stage.read,
                test=stage.test, decides=stage.decides, planned=len(names), finished=done,
                status="; ".join(words) or "pending", tests=tests, decided=decided, regime=regime,
                plan=stage_plan(stage), cost=stage_cost(stage),
                conditions=conditions or [stage.probe.name])


def round3_table(stages: list[dict]) -> list[str]:
    lines = ["**Rule v3 and round 3** (written after round 2's results were known; "
             "results/protocol/README.md, \"Rule v3\"): each stage is decided at its planned seeds "
             "before the next starts.", "",
             "| stage | question | runs | seeds, and the power behind them | finished (planned) | "
             "status | cost: this CPU (2.3 s/step) | cost: one H200 (6 side by side) |",
             "|---" * 8 + "|"]
    for s in stages:
        c = s["cost"]
        lines.append(f"| {s['key']} | {s['question']} | {c['jobs']} x {c['steps_per_job']} steps: "
                     f"{', '.join(s['conditions'])} | {s['plan']} | "
                     f"{s['finished']} ({s['planned']}) | "
                     f"**{s['status']}** | {c['cpu_hours']} h | {c['gpu_minutes']} min |")
    lines += ["", *(f"- stage {s['key']}: test: {s['test']}; decides: {s['decides']}."
                    for s in stages)]
    # a stage waiting on another's runs shows its tests too
    read = [s for s in stages if s["tests"]]
    if read:
        lines += ["", *TEST_HEADER]
        for s in read:
            lines += (probe_rows(s["regime"], "probe v2: withdrawn", s["tests"][0],
                                 f"{s['planned']} trajectories") if s["read"] == "probe" else
                      [test_row(f"{s['key']}: {t['label']}", s["regime"], "-", t)
                       for t in s["tests"]])
    return lines


# What each current verdict is about, where the audit after round 2 found it narrower than its
# name (results/protocol/README.md, "What is superseded"): a withdrawn verdict's reason, and the
# exact thing a verdict tested. Data, read by the README's answer table.
WITHDRAWN = {3: "probe v2 is withdrawn (its probes trained at the cosine schedule's learning rate, "
                "0 at its last point, and moved BatchNorm statistics: it measured those, "
                "not the bins); probe v3 is pending"}
TESTED = {4: "The teacher tested: the small network with BatchNorm, the symmetric soft label, "
             "the student's cosine learning rate (3e-4 peak); the paper's (VGG-19, no BatchNorm, "
             "5e-5) is untested"}


def regime_reading(t: dict, better: str, worse: str) -> str:
    """One paired test's result in words a reader can check against the interval."""
    word = t["verdict"]
    if "lo" not in t or word.startswith("pending"):
        return word
    if word == "reproduced":
        return f"{better} ahead by {t['lo']:.3f} to {t['hi']:.3f} AP"
    if word == "contradicted":
        return f"{worse} ahead by {-t['hi']:.3f} to {-t['lo']:.3f} AP"
    if word.startswith("no effect"):
        return f"no difference of {t['delta']} AP or more"
    return f"cannot tell ({t['lo']:+.3f} to {t['hi']:+.3f} AP)"


def stage_answer(claim: int, stage: dict) -> str:
    """A claim's row of the answer table from the round-3 stage that decided it."""
    words = f"{claim}: {CLAIM_WORDS[claim]}"
    if stage["read"] == "probe":
        t = stage["tests"][0]
        return (f"| {words} | **bins differ: {t['bins_differ']}; ranking changes: "
                f"{t['ranking_changes']}** (probe v3) | - | {t['reason']} |")
    ci = "; ".join(f"{t['label']} {ci_text(t)} ({t['n']})"
                   for t in stage["tests"] if "lo" in t) or "-"
    means = "; ".join(f"{t['label']}: " + regime_reading(t, t.get("better", "the first"),
                                                         t.get("worse", "the second"))
                      for t in stage["tests"])
    return f"| {words} | **{stage['status']}** (round 3, stage {stage['key']}) | {ci} | {means} |"


def answer_table(claims: dict) -> str:
    """The README's answer: one row per claim of the paper with its current verdict (a decided
    round-3 stage's, else round 2's as frozen), the paired AP difference's 95% interval per regime
    (seeds) and what that means; the control below it."""
    lines = ["| claim of the paper | verdict | paired AP difference, 95% CI (seeds) | "
             "what it means |",
             "|---|---|---|---|"]
    verdicts = claims["frozen"]["round2"]["verdicts"]
    decided = {s["claim"]: s for s in claims.get("round3", []) if s["decided"] and s["claim"]}
    for claim, words in CLAIM_WORDS.items():
        v = verdicts.get(str(claim))
        if claim in decided:
            lines.append(stage_answer(claim, decided[claim]))
        elif claim in WITHDRAWN or not v:
            lines.append(f"| {claim}: {words} | **not tested** | - | "
                         f"{WITHDRAWN.get(claim, 'pending')} |")
        else:
            scope = "" if claim not in TESTED else " for the teacher tested"
            ci = "; ".join(f"{regime} {ci_text(t)} ({t['n']})"
                           for regime, t in v["per_regime"].items() if "lo" in t) or "-"
            means = "; ".join(f"{regime}: {regime_reading(t, v['better'], v['worse'])}"
                              for regime, t in v["per_regime"].items())
            lines.append(f"| {claim}: {words} | **{v['verdict']}**{scope} | {ci} | {means}"
                         + (f". {TESTED[claim]}" if claim in TESTED else "") + " |")
    return "\n".join(lines) + "\n\n" + control_reading(claims) + "\n"


def control_reading(claims: dict) -> str:
    """Does the synthetic half help? Round 3's stage b once decided; before it, exploratory (no
    rule was fixed for it in advance): the real-only control against the two mixed conditions at
    round 1's 800 steps, read as rule v2 reads a pair."""
    b = next((s for s in claims.get("round3", []) if s["key"] == "b" and s["decided"]), None)
    if b:
        return ("Does the synthetic half help? Round 3, stage b, at 3000 steps (scarce), paired AP "
                "difference and 95% CI: " + "; ".join(
                    f"{t['label']} {ci_text(t)} ({t['n']} seeds): "
                    f"{t['verdict']}" for t in b["tests"] if "lo" in t) + ".")
    parts, runs = [], [r for r in claims.get("runs", [])
                       if not r["name"].startswith(CURRENT.prefix)]
    for worse in ("augmented-mask", "synthetic"):
        for regime in PROTOCOL_REGIMES:
            t = paired_test(np.subtract(*paired_aps(runs, "real", worse, regime)).tolist(),
                            DELTA[regime])
            if "lo" in t:
                parts.append(f"real - {worse} ({regime}) {ci_text(t)}")
    if not parts:
        return ("Does the synthetic half help at all? "
                "The real-only control has no finished pairs yet.")
    return ("Does the synthetic half help at all? At 800 steps no interval shows it "
            "(exploratory: no rule was fixed for it in advance): the real-only control, "
            "16 real crops a step, against the mixed conditions' 8, paired AP difference and "
            f"95% CI over 3 seeds: {'; '.join(parts)}. At 3000 steps "
            "no real-only run exists yet (round 3, pending).")


def device_keys_note(runs: list[dict]) -> list[str]:
    """Once summaries carry device keys: that pairs form only within one key, and the keys.
    Summaries written before keys (rounds 1 and 2) pair as they did, by their device."""
    if not any(r.get("device_key") for r in runs):
        return []
    keys = "; ".join(sorted({summary_device_key(r) for r in runs}))
    return ["", "Paired differences pair only runs of one device key (CPU model or GPU, "
            f"instruction set, precision, threads, torch version); the keys: {keys}."]


def where_trained(runs: list[dict]) -> str:
    """Each device with what was trained on it: the fine-tunes by seed (a seed's pairs share a
    device), the students and the domain gap by name."""
    places: dict[str, dict[str, set]] = {}
    for r in runs:
        what = f"seed {r['seed']}" if r.get("init") else r["condition"]
        places.setdefault(r.get("device", "?"), {}).setdefault(r["regime"], set()).add(what)
    return "; ".join(f"{device}: " + ", ".join(f"{regime} " + " + ".join(sorted(items))
                                               for regime, items in sorted(regimes.items()))
                     for device, regimes in sorted(places.items()))


# ----------------------------------------------------------------------------------------------
# Figures: the probe's usefulness, the teachers beside it, the claims
# ----------------------------------------------------------------------------------------------


def plot_usefulness(ax, probe: dict) -> None:
    """Each probed bin's usefulness against training progress (mean and SE over probe seeds); the
    legend gives each bin's lower edge and the people it was probed on (v2: a subsample of the
    bin)."""
    use = np.array(probe["usefulness"])
    colours = bin_colours(len(probe["counts"]))
    probed = probe.get("probed_people", probe["counts"])
    for b in range(use.shape[1]):
        if np.isfinite(use[:, b]).all():
            se = np.std(use[:, b], 1, ddof=1) / np.sqrt(use.shape[2])
            people = (f"{probed[b]} of {probe['counts'][b]}" if probed[b] != probe["counts"][b]
                      else probed[b])
            ax.errorbar(probe["points"], use[:, b].mean(1), se, color=colours[b], marker="o",
                        capsize=3, label=f"bin {b}: {probe['edges'][b]:.0f} px ({people})")
    ax.axhline(0, color="grey", lw=0.5)
    # the current rule's test (written as "v2" by probe v2)
    test = probe.get("test") or probe.get("v2")
    ax.set(xlabel="step of the uniform run",
           ylabel=f"val loss drop after {probe['steps_per_probe']} steps on the bin",
           title=(f"{probe.get('design', 'probe')}: bins differ {test['bins_differ']}, "
                  f"ranking changes {test['ranking_changes']}" if test else
                  "informativeness of each min_dist bin over training (claim 3)"))
    ax.legend(title="bin: lower edge (people probed)", fontsize=7, title_fontsize=7,
              loc="center left", bbox_to_anchor=(1.0, 0.5))


def save_probe_figure(probe: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8.5, 4))
    plot_usefulness(ax, probe)
    save_figure(fig, path)


def save_teacher_and_probe_figure(series: dict[str, list], probe: dict | None, path: Path) -> None:
    """Claim 3 beside claim 4: the paper's teachers' bin probabilities over training (scarce regime,
    3000 steps; their mean, then one row per run), and probe v2's usefulness of each bin at points
    of the same schedule."""
    plt = pyplot()

    # the mean over runs first, as the design promised (README, "Rule v2"), then each run
    if series:
        steps = min(len(run) for run in series.values())
        runs = np.array([np.array(run)[:steps] for run in series.values()])
        mean = np.concatenate([runs[0, :, :1], runs[:, :, 1:].mean(0)], 1)
        series = {f"mean of the {len(runs)} runs": mean.tolist(), **dict(sorted(series.items()))}
    rows = max(len(series), 1)
    fig = plt.figure(figsize=(13.5, max(4.2, 1.25 * rows + 0.8)))
    grid = fig.add_gridspec(rows, 2)
    left = [fig.add_subplot(grid[i, 0]) for i in range(rows)]
    right = fig.add_subplot(grid[:, 1])
    bins = len(next(iter(series.values()))[0]) - 1 if series else 0
    for ax, (name, run) in zip(left, series.items()):
        probs = np.array(run)  # (updates, 1 + bins): the step, then the teacher's output
        plot_bin_probabilities(ax, probs[:, 0], probs[:, 1:], [f"bin {b}" for b in range(bins)])
        ax.set(ylabel="p")
        ax.set_title(name, fontsize=8, loc="left")
        ax.label_outer()
    if series:
        left[-1].set_xlabel("student step")
        left[0].legend(fontsize=6, ncol=bins, loc="lower left", bbox_to_anchor=(0.0, 1.15),
                       frameon=False)
    if probe:
        plot_usefulness(right, probe)
    for ax, what in ((left[0], series), (right, probe)):
        if not what:
            ax.text(0.5, 0.5, "not run yet", ha="center", transform=ax.transAxes)
    save_figure(fig, path)


def save_claims_figure(runs: list[dict], verdicts: dict, path: Path) -> None:
    """Top: AP per condition and regime, every seed as a dot, the mean as a bar (round 2's 3000-step
    conditions in their own colour). Bottom: what rule v2 reads, the paired AP differences per seed
    with their mean and 95% interval, against the band (-delta, +delta) and 0."""
    plt = pyplot()

    fig, axes = plt.subplots(2, len(PROTOCOL_REGIMES), figsize=(7 * len(PROTOCOL_REGIMES), 8.2),
                             sharey="row", squeeze=False)
    for (top, bottom), regime in zip(axes.T, PROTOCOL_REGIMES):
        conditions = [c for c in REPORTED_CONDITIONS if condition_runs(runs, c, regime)]
        for i, c in enumerate(conditions):
            ap = [r["ap"] for r in condition_runs(runs, c, regime)]
            top.bar(i, np.mean(ap), color="navajowhite" if SAME_RUNS.get(c, c) in LONG_CONDITIONS
                    else "lightsteelblue")
            top.plot([i] * len(ap), ap, "k.", ms=6)
        top.set_xticks(range(len(conditions)),
                       [f"{c} (= {SAME_RUNS[c]})" if c in SAME_RUNS else c for c in conditions],
                       rotation=35, ha="right", fontsize=8)
        top.set(title=f"{regime} regime: val AP "
                      f"(crowded stand-in val; orange: {LONG_STEPS} steps)", ylabel="AP")
        compared = [(name, v, v["per_regime"][regime]) for name, v in verdicts.items()
                    if regime in v["per_regime"]]
        for i, (name, v, test) in enumerate(compared):
            d = np.subtract(*paired_aps(runs, v["better"], v["worse"], regime))
            bottom.plot([i] * len(d), d, "k.", ms=6, label="seeds" if i == 0 else None)
            if "lo" in test:
                bottom.errorbar(i + 0.15, test["mean"],
                                [[test["mean"] - test["lo"]], [test["hi"] - test["mean"]]],
                                fmt="o", color="C3", capsize=4,
                                label="mean, 95% CI" if i == 0 else None)
        bottom.axhspan(-DELTA[regime], DELTA[regime], color="grey", alpha=0.15, lw=0,
                       label=f"+-delta ({DELTA[regime]})")
        bottom.axhline(0, color="grey", lw=0.5)
        short = {c: c.removesuffix(f"-{LONG_STEPS}").replace("augmented-", "aug-")
                 for c in REPORTED_CONDITIONS}
        labels = [(f"claim {name}" if name.isdigit() else "claim 4, part") +
                  f"\n{short[v['better']]}\n- {short[v['worse']]}\n{test['verdict']}"
                  for name, v, test in compared]
        bottom.set_xticks(range(len(compared)), labels, fontsize=7)
        bottom.set(xlim=(-0.5, len(compared) - 0.5), ylabel="paired AP difference",
                   title=f"{regime} regime: what rule v2 reads")
        bottom.legend(fontsize=7, loc="lower left")
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# The command line: repro.py's parser, with this file's three jobs
# ----------------------------------------------------------------------------------------------

def probe_job(cfg: Config, args: argparse.Namespace) -> None:
    device = start_job(cfg)[2]
    design, code = PROBES[args.probe], code_version()
    PROTOCOL_RESULTS.parent.mkdir(parents=True, exist_ok=True)  # before its hour of work
    out = Path(cfg.out or PROTOCOL_RUNS / design.name)
    probe = run_probe(cfg, load_data(cfg), device, out, design)
    probe |= dict(command=" ".join(["python", PROG, *args.argv]), code=code,
                  device=device_name(device), device_key=this_device_key(device, cfg))
    name = probe_name(design, cfg.seed)
    write_json(probe, PROTOCOL_RESULTS.parent / f"{name}.json")
    save_probe_figure(probe, PROTOCOL_RESULTS.parent / f"{name}.png")


def job_count(text: str) -> int:
    """--jobs N: refused by the parser unless a whole number of 1 or more."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}")
    return int(text)


def protocol_glob(glob: str) -> str:
    """--only GLOB: refused by the parser when it matches no run of the claims protocol."""
    names = [r.name for r in protocol_runs()] + [name for name, _, _ in probe_jobs()]
    if not any(matches(n, (glob,)) for n in names):
        raise argparse.ArgumentTypeError(f"{glob!r} matches no protocol run; names look like "
                                         f"{names[0]}, full/augmented-mask-s1, full/synthetic-only "
                                         "or probe")
    return glob


JOBS = {job.flag: job for job in (
    Job("--reproduce", lambda cfg, args: run_protocol(jobs=args.jobs, only=tuple(args.only)),
        "run the claims protocol (README): skips finished runs, resumes cut-off ones, then "
        "--report",
        ("--jobs", dict(help="fine-tune N runs at once (a GPU with spare CPU cores); each logs to "
                        "runs/protocol/<run>.log", type=job_count, default=1, metavar="N")),
        ("--only", dict(help="only the runs whose names match one of these, e.g. 'scarce/*-s[12]' "
                        "full/synthetic-only (the probe is 'probe')", nargs="+", type=protocol_glob,
                        default=["*"], metavar="GLOB")), action="store_true",
        kept="finished runs and the last checkpoints are kept: rerun --reproduce to go on",
        prog=PROG),
    Job("--report", lambda cfg, args: report_protocol(), "rebuild results/claims.{json,md,png} and "
        "the README's claims table from results/protocol", action="store_true", prog=PROG),
    Job("--probe", probe_job, "the informativeness probe of claim 3 from --init (README): v1 (the "
        "default) writes results/probe.{json,png}, v2 (README, Rule v2) "
        "results/probe-v2.{json,png}, v3 (Rule v3) results/probe-v3-t<seed>.{json,png}", nargs="?",
        const="v1", choices=tuple(PROBES), metavar="|".join(PROBES),
        kept="the points probed so far are kept: rerun the same command to go on", prog=PROG),
)}


parse_args, main = R.command_line(JOBS)  # repro.py's, over this file's jobs

if __name__ == "__main__":
    sys.exit(main())
