"""Training-step time: hvd_unreliable.DistributedOptimizer against Horovod's own.

    python bench/bench_train_step.py [--np 4] [--model resnet20] [--batch 32] [--steps 20]

Same model, same data, same ranks: one step = forward, backward and the optimizer step with
its communication. Compared: ``hvd.DistributedOptimizer`` (Horovod, gradient allreduce
overlapped with backward), and this package's ``DistributedOptimizer`` in modes ``reliable``,
``rps`` at p = 0 and ``rps`` at p = 0.1, taking steps in turn within every round.
Prints a table, writes bench/results/train_step.json.
"""
from __future__ import annotations

import argparse
import sys

from common import collect_and_report, interleaved_times, save_rank_rows


def rank_main(out: str, model_name: str, batch: int, steps: int) -> None:
    import torch
    import torch.nn.functional as F

    import hvd_unreliable as hu
    from hvd_unreliable.faults import Bernoulli
    from hvd_unreliable.training.models import build_model
    from hvd_unreliable.transport import Transport

    ctx = hu.init(backend="horovod")
    hvd, comm = ctx.hvd, ctx.comm
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def make(kind):
        torch.manual_seed(0)
        model = build_model(model_name, (3, 32, 32), 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if kind == "horovod":
            opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), op=hvd.Average)
        else:
            mode, p = kind.split(":")
            opt = hu.DistributedOptimizer(opt, named_parameters=model.named_parameters(), mode=mode,
                                          transport=Transport(comm, Bernoulli(float(p)), seed=0))

        def step():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    kinds = {"horovod_s": "horovod", "reliable_s": "reliable:0", "rps_p0_s": "rps:0", "rps_p0.1_s": "rps:0.1"}
    times = interleaved_times({k: make(v) for k, v in kinds.items()}, comm, steps)
    params = sum(p.numel() for p in build_model(model_name, (3, 32, 32), 10).parameters())
    row = {"ranks": comm.Get_size(), "model": model_name, "params": params, "batch": batch, **times,
           "rps_p0_vs_horovod": times["rps_p0_s"] / times["horovod_s"],
           "reliable_vs_horovod": times["reliable_s"] / times["horovod_s"]}
    save_rank_rows(out, [row], comm)
    hu.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", help=argparse.SUPPRESS)
    ap.add_argument("--np", type=int, nargs="+", default=[4])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    if args.rank:
        rank_main(args.rank, args.model, args.batch, args.steps)
        return 0
    cols = ["ranks", "model", "params", "batch", "horovod_s", "reliable_s", "rps_p0_s", "rps_p0.1_s",
            "rps_p0_vs_horovod", "reliable_vs_horovod"]
    return collect_and_report(__file__, "train_step", args.np,
                              ["--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps)], cols)


if __name__ == "__main__":
    sys.exit(main())
