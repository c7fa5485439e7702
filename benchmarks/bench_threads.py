"""What the number of torch and BLAS threads does to small kernels, on this machine.

Each thread count runs in its own interpreter, with ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` set before torch is imported and ``torch.set_num_threads`` called, and
times two kernels of the size skmsif runs on small models:

* a 128 x 128 float64 matrix product;
* a Hessian-vector product of the mean cross-entropy of the digits MLP
  (``Linear(64, 16) + Tanh + Linear(16, 4)``, 720 examples, float64), with ``torch.func``
  as the estimator computes it.

Each time is the median of several repeats, printed with its ratio to one thread. Run::

    python benchmarks/bench_threads.py                  # threads 1, 2, 4
    python benchmarks/bench_threads.py --threads 1 2 8

On a machine with few cores, more threads than cores ("oversubscription") makes such
kernels slower, not faster; on a loaded machine, more so.
"""

import argparse
import json
import os
import subprocess
import sys

PROBE = r"""
import json, statistics, sys, time
import torch
threads = int(sys.argv[1])
torch.set_num_threads(threads)
gen = torch.Generator().manual_seed(0)

def median_time(fn, repeats, inner):
    for _ in range(inner):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)

a = torch.randn(128, 128, dtype=torch.float64, generator=gen)
matmul = median_time(lambda: a @ a, 7, 200)

model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(),
                            torch.nn.Linear(16, 4)).double()
params = {k: v.detach() for k, v in model.named_parameters()}
inputs = torch.rand(720, 64, dtype=torch.float64, generator=gen)
targets = torch.randint(0, 4, (720,), generator=gen)

def loss(p):
    out = torch.func.functional_call(model, p, (inputs,))
    return torch.nn.functional.cross_entropy(out, targets)

vector = {k: torch.randn(v.shape, dtype=v.dtype, generator=gen) for k, v in params.items()}
hvp = lambda: torch.func.jvp(torch.func.grad(loss), (params,), (vector,))
hessian_vector = median_time(hvp, 7, 20)
print(json.dumps({"threads": threads, "matmul": matmul, "hvp": hessian_vector}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the start")
    rows = []
    for threads in args.threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(threads))
        result = subprocess.run([sys.executable, "-c", PROBE, str(threads)], env=env,
                                capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{'threads':>7s} {'128x128 matmul (us)':>20s} {'ratio':>6s} "
          f"{'MLP Hessian-vector product (ms)':>32s} {'ratio':>6s}")
    for row in rows:
        print(f"{row['threads']:7d} {1e6 * row['matmul']:20.1f} "
              f"{row['matmul'] / base['matmul']:6.2f} {1e3 * row['hvp']:32.2f} "
              f"{row['hvp'] / base['hvp']:6.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
