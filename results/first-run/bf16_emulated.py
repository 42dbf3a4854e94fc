"""repro.py with bf16 autocast forced on a CPU without native bf16 (emulated, about 30x slower
there): a stand-in for an AMX machine's numbers.   python results/first-run/bf16_emulated.py ARGS"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import repro as R  # noqa: E402

R.cpu_has_native_bf16 = lambda: True
sys.exit(R.main(sys.argv[1:]))
