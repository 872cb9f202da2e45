"""Peak resident memory of ppl_vae.log_marginal on 1000 MNIST-sized points, against K.

Each K runs in a fresh process; the table shows the peak RSS and its increase over the
same process just before the call (model, data and libraries loaded).

    python -m benchmarks.memory [--ks 500 1000 2000 5000] [--points 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.timing import row

CHILD = """
import json, resource, sys, time, torch, ppl_vae
from ppl_vae.models import VAE
from ppl_vae.guides import MLPEncoder
k, n = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model, guide = VAE(784, 50), MLPEncoder(784, 50)
x = (torch.rand(n, 784) < 0.15).float()
ppl_vae.log_marginal(model, guide, x[:2], 2)  # warm up the libraries
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
ppl_vae.log_marginal(model, guide, x, k)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"k": k, "before_mb": before / 1024, "peak_mb": peak / 1024, "s": seconds}))
"""


def measure(k: int, points: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(k), str(points)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[500, 1000, 2000, 5000])
    parser.add_argument("--points", type=int, default=1000)
    args = parser.parse_args(argv)
    print(f"log_marginal, VAE(784, 50), {args.points} points")
    print(row("K", "peak RSS (MB)", "increase over loaded process (MB)", "seconds"))
    print(row(*["---"] * 4))
    for k in args.ks:
        r = measure(k, args.points)
        increase = r["peak_mb"] - r["before_mb"]
        print(row(k, f"{r['peak_mb']:.0f}", f"{increase:.0f}", f"{r['s']:.1f}"))


if __name__ == "__main__":
    main()
