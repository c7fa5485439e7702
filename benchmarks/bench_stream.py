"""Peak memory of scoring a pretrain set that is streamed, next to materialising it.

A ``Dataset`` generates ``m`` images of 1 x 28 x 28 on the fly (each from its index, so
nothing is held); the estimator reads it batch by batch. Each measurement runs in a fresh
subprocess and reports its peak resident memory (``ru_maxrss``):

* ``baseline``: the process with torch and the models imported, nothing scored;
* ``stream``: ``fit`` plus ``score`` over the streamed Dataset;
* ``materialised``: the same examples first stacked into one float64 tensor (what reading
  a Dataset whole, as the package did before, costs), then scored.

Run (about a minute on 2 cores at the default size)::

    python benchmarks/bench_stream.py --m 100000 --threads 1
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

IMAGE = (1, 28, 28)


class GeneratedImages(torch.utils.data.Dataset):
    """``m`` pseudo-random images and labels, each made from its index when read."""

    def __init__(self, m, n_classes):
        self.m, self.n_classes = m, n_classes

    def __len__(self):
        return self.m

    def __getitem__(self, index):
        if not 0 <= index < self.m:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(int(index))
        return (torch.randn(IMAGE, generator=gen),
                int(torch.randint(0, self.n_classes, (1,), generator=gen)))


def models():
    torch.manual_seed(0)
    embedding = nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.Tanh(), nn.Flatten(),
                              nn.Linear(4 * 8 * 8, 16), nn.Tanh())
    return nn.Sequential(embedding, nn.Linear(16, 4)), nn.Sequential(embedding,
                                                                     nn.Linear(16, 3))


def measure(kind, m):
    from skmsif import MultiStageInfluenceEstimator

    pretrain, finetune = models()
    Z = GeneratedImages(m, 4)
    X = GeneratedImages(200, 3)
    x_test = GeneratedImages(5, 3)
    start = time.perf_counter()
    if kind == "materialised":
        Z = (torch.stack([Z[i][0] for i in range(m)]).double(),
             torch.tensor([Z[i][1] for i in range(m)]))
    if kind != "baseline":
        estimator = MultiStageInfluenceEstimator(hessian="identity", batch_size=512)
        scores = estimator.fit(pretrain, finetune, Z, X).score(x_test)
        assert scores.shape == (m,)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"kind": kind, "peak_mib": peak_mib, "seconds": seconds}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure", choices=["baseline", "stream", "materialised"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        measure(args.measure, args.m)
        return None
    rows = {}
    for kind in ("baseline", "stream", "materialised"):
        output = subprocess.run(
            [sys.executable, __file__, "--m", str(args.m), "--threads", str(args.threads),
             "--measure", kind], check=True, capture_output=True, text=True).stdout
        rows[kind] = json.loads(output.strip().splitlines()[-1])
    data_mib = args.m * torch.Size(IMAGE).numel() * 8 / 2**20
    print(f"m = {args.m} images of {IMAGE}, threads = {args.threads}; the pretrain inputs "
          f"take {data_mib:.0f} MiB in float64")
    base = rows["baseline"]["peak_mib"]
    for kind in ("baseline", "stream", "materialised"):
        row = rows[kind]
        print(f"{kind:>13}: peak {row['peak_mib']:8.0f} MiB (+{row['peak_mib'] - base:6.0f} "
              f"over baseline), {row['seconds']:6.1f} s")
    return rows


if __name__ == "__main__":
    main()
