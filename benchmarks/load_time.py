"""Load time of the bundled models from lmedit's cache (the "second load"), in fresh processes.

    python benchmarks/load_time.py [--repeats 3] [--models smollm2-135m gemma3-270m]

Prints, per model: the first-load (conversion) time if the cache was empty, and for each repeat the
wall time of a new Python process doing ``import lmedit; lmedit.load_model(name)`` (imports included)
and the time inside ``load_model`` alone. Target: ≤ 5 s on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = """
import json, time
t0 = time.perf_counter()
import lmedit
t1 = time.perf_counter()
m = lmedit.load_model({name!r})
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "fingerprint": m.fingerprint[:12]}}))
"""


def run(name: str) -> tuple[float, dict]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD.format(name=name)], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    args = parser.parse_args()
    from lmedit.models import BUNDLED
    from lmedit.models.bundled import _cache_valid

    for name in args.models:
        cached = _cache_valid(BUNDLED[name].cached_dir())
        if not cached:
            wall, inner = run(name)
            print(f"{name}: first load (dequantise + cache) {wall:.1f} s wall")
        walls = []
        for i in range(args.repeats):
            wall, inner = run(name)
            walls.append(wall)
            print(f"{name}: cached load #{i + 1}: {wall:.2f} s wall (imports {inner['import_s']:.2f} s, "
                  f"load_model {inner['load_s']:.2f} s), fingerprint {inner['fingerprint']}")
        best, worst = min(walls), max(walls)
        verdict = "OK" if worst <= 5.0 else "OVER the 5 s target"
        print(f"{name}: cached load {best:.2f}-{worst:.2f} s over {args.repeats} runs -> {verdict}")


if __name__ == "__main__":
    main()
