"""``python -m paper.text``: build (or load) the text problem, print what it measured.

Prints, as JSON: the data sizes, accuracies, gradient norms and wall times of both
stages, and, with ``--retrain N``, the time of ``N`` leave-one-out retrains (plus the
reference) and their loss changes.

``python -m paper.text experiment [options]`` runs the paper's NLP experiment instead
(influence tables, costs, faithfulness against retraining; see
``paper.text._experiment`` and ``python -m paper.text experiment --help``).
"""

import argparse
import json
import os
import sys
import time


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "experiment":
        from ._experiment import main as experiment_main

        return experiment_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m paper.text", description=__doc__)
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--case", default="fixed", choices=("fixed", "updated"))
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--cache-dir", default=None,
                        help="folder for trained weights (default: paper.text."
                             "default_cache_dir()); 'none' trains afresh, caching nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--retrain", type=int, default=0,
                        help="time this many leave-one-out retrains (indices 0..N-1)")
    parser.add_argument("--n-jobs", type=int, default=None, help="parallel retrains")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from . import make_problem, retrain_without

    cache_dir = False if (args.cache_dir or "").lower() == "none" else args.cache_dir
    start = time.perf_counter()
    problem = make_problem(args.size, args.random_state, args.case, cache_dir=cache_dir)
    summary = {
        "size": args.size, "case": args.case, "threads": args.threads,
        "n_pretrain": len(problem.Z["labels"]), "n_finetune": len(problem.X["labels"]),
        "n_test": len(problem.x_test["labels"]), "vocabulary": len(problem.tokenizer),
        "n_parameters": {
            "pretrain": sum(p.numel() for p in problem.pretrain_model.parameters()),
            "finetune": sum(p.numel() for p in problem.finetune_model.parameters())},
        "estimator_params": problem.estimator_params,
        "info": {stage: dict(values) for stage, values in problem.info.items()},
        "timings": problem.timings, "cpu_timings": problem.cpu_timings,
        "build_seconds": time.perf_counter() - start,
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
    }
    if args.retrain:
        start = time.perf_counter()
        change, info = retrain_without(problem, list(range(args.retrain)),
                                       n_jobs=args.n_jobs, return_info=True)
        summary["retrain"] = {
            "change": change.tolist(), "seconds_each": info.seconds.tolist(),
            "cpu_seconds_each": info.cpu_seconds.tolist(),
            "reference": info.reference, "settings": info.settings,
            "wall_seconds": time.perf_counter() - start}
    print(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    sys.exit(main())
