#!/usr/bin/env bash
# Short runs of every mode and a prediction with two checkouts of this repository (a reshaping's
# before and after), then compares them: metrics and metric lines without wall-time keys, the val
# predictions, the predict job's output, and the weights bit for bit.
#   bash results/reference/same_results.sh OLD_CHECKOUT NEW_CHECKOUT [OUT]
set -u
OLD=$1 NEW=$2 OUT=${3:-/tmp/same}
rm -rf "$OUT" && mkdir -p "$OUT/in"
cp $(ls "$NEW"/data/demo/*/val/images/* | head -3) "$OUT/in/"
for side in old new; do
  tree=$OLD; [ $side = new ] && tree=$NEW
  for run in "real --mode real" "synthetic --mode synthetic" "augmented --mode augmented" \
             "include --mode augmented --synthetic-loss include" "student-teacher --mode student-teacher"; do
    set -- $run
    (cd "$tree" && python repro.py "${@:2}" --steps 4 --log-every 1 --eval-scales 1.0 --no-eval-init \
       --workers 0 --out "$OUT/$side/$1" > "$OUT/$side-$1.log" 2>&1); echo "$side $1 exit $?"
  done
  (cd "$tree" && python repro.py --mode predict --input "$OUT/in" --out "$OUT/$side/predict" \
     > "$OUT/$side-predict.log" 2>&1); echo "$side predict exit $?"
done
python - "$OUT" <<'PY'
import json, sys, pathlib
import torch
root = pathlib.Path(sys.argv[1])
TIMING = ("time", "minutes", "seconds", "img_s", "wall")
def clean(x):
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items() if not any(w in k for w in TIMING)}
    return [clean(v) for v in x] if isinstance(x, list) else x
def read(path):
    lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
    return [clean(json.loads(line)) for line in lines]
for run in sorted(p.name for p in (root / "old").iterdir()):
    old, new = root / "old" / run, root / "new" / run
    for f in sorted(p.relative_to(old) for p in old.glob("*.json*") if p.name != "config.json"):
        print(f"{run}/{f}: {'same' if read(old / f) == read(new / f) else 'DIFFERENT'}")
    if (old / "ckpt.pt").is_file():
        a, b = (torch.load(d / "ckpt.pt", map_location="cpu", weights_only=True)["model"] for d in (old, new))
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(f"{run}/ckpt.pt weights: {'bit-identical' if same else 'DIFFERENT'}")
PY
