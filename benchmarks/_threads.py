"""Thread pinning shared by the benchmarks: torch and the BLAS libraries to one count."""

import os

VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pin_threads(threads):
    """Pin torch and the BLAS libraries to ``threads`` threads.

    Call it before numpy, scipy or torch is imported anywhere in the process: the BLAS
    libraries read the environment variables when they load. Subprocesses inherit them.
    """
    for variable in VARIABLES:
        os.environ[variable] = str(threads)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)
