"""Two gloo processes run examples/ddp_loop.py's loop with a fault on rank 1 only; each writes
its decisions and a digest of its final weights to OUT/rank{r}.json.

    python tests/scripts/ddp_loop_run.py OUT KIND@STEP[,KIND@STEP...]
"""

import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def worker(rank: int, out: str, fault: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        import ddp_loop
        from self_healing.faults import Fault, LoopFaultInjector

        args = ddp_loop.parse_args("ddp_loop", None, ["--max-steps", "40", "--output-dir", out,
                                                       "--preset", str(ROOT / "presets" / "default.yaml")])
        faults = [Fault(kind, step=int(step), rank=1) for kind, _, step in (f.partition("@") for f in fault.split(","))]
        real = ddp_loop.rehearse

        def rehearse(healer, _args):  # the faults on rank 1 only
            LoopFaultInjector(*faults).install(healer)

        ddp_loop.rehearse = rehearse
        try:
            healer, model, final = ddp_loop.train(args)
        finally:
            ddp_loop.rehearse = real
        healer.finish()
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "decisions": [[e["step"], e["failure"], e["actions"]] for e in healer.recorder.events],
            "weights": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
            "finite": bool(torch.isfinite(weights).all()), "fired": healer.faults.fired, "final": final}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2], free), nprocs=2)
