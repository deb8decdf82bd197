"""Reads random keys from a running `sluice run --serve` with
`sluice.Client`, in batches, until the server stops or the time is up;
prints the reads it made. Used by hand to fill a view's served-value log
before timing `sluice consistency` (docs/benchmarks.md):

    python benchmarks/scripts/read_load.py --url http://127.0.0.1:18080 \
        --view user_activity --keys 100000 --seconds 120
"""

from __future__ import annotations

import argparse
import random
import time

import sluice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--view", required=True)
    ap.add_argument("--keys", type=int, default=100_000, help="keys u00000..: as `sluice gen --keys` names them")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    width = max(5, len(str(a.keys - 1)))
    c = sluice.Client(a.url, timeout=10)
    deadline = time.time() + a.seconds
    reads = found = requests = 0
    t0 = time.time()
    while time.time() < deadline:
        keys = [f"u{rng.randrange(a.keys):0{width}d}" for _ in range(a.batch)]
        try:
            t = c.get(a.view, keys)
        except sluice.Unavailable:
            if requests:
                break  # the server stopped
            time.sleep(0.2)
            continue
        except sluice.NotFound:
            time.sleep(0.2)  # the view has no state yet
            continue
        requests += 1
        reads += t.num_rows
        found += sum(t.column("found").to_pylist())
    secs = time.time() - t0
    print(f"{requests:,} requests, {reads:,} key reads ({found:,} found) in {secs:.1f} s = {reads / secs:,.0f} reads/s")


if __name__ == "__main__":
    main()
