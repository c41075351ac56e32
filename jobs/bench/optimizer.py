"""The scorer's optimizer step against its forward + backward, side by side in one process.

    python -m jobs.bench.optimizer [--tokens 32 128] [--batch 16] [--threads 1] [--rounds 3]

AdamW three ways on the same MiniLM scorer and the same synthetic batch (``--batch`` pairs of
``--tokens`` tokens, all real): ``loop`` (torch's per-tensor default on CPU), ``foreach`` and
``fused`` (what :func:`cappy_core.scorer.training.make_optimizer` uses). Each variant runs 8
updates after one warm-up (the optimizer's state is allocated there), alternating variants
``--rounds`` times; the best round of each counts. Prints one JSON line: per token count and
variant, milliseconds of forward + backward and of the optimizer step, and the step's share.
"""

from __future__ import annotations

import argparse
import copy
import json
import time


def _time(model, optimizer_kwargs: dict, ids, mask, target, updates: int = 8) -> tuple[float, float]:
    import torch

    from cappy_core.scorer.training import param_groups

    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(param_groups(m, 0.0), lr=1e-4, eps=1e-8, **optimizer_kwargs)
    fwd_bwd = step = 0.0
    for i in range(updates + 1):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(m(input_ids=ids, attention_mask=mask).logits.squeeze(-1), target)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first update allocates the optimizer's state
            fwd_bwd, step = fwd_bwd + t1 - t0, step + time.perf_counter() - t1
    return fwd_bwd / updates, step / updates


def main(argv: list[str] | None = None) -> None:
    import torch

    from cappy_core.scorer.model import Scorer, quiet_transformers

    p = argparse.ArgumentParser(prog="python -m jobs.bench.optimizer", description=__doc__.split("\n\n")[2])
    p.add_argument("--tokens", type=int, nargs="+", default=[32, 128], help="tokens per pair (default: 32 128)")
    p.add_argument("--batch", type=int, default=16, help="pairs per update (default: 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the three variants (default: 3)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    model = Scorer.from_pretrained("minilm", seed=0, device="cpu").model.train()
    variants = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    out: dict = {"bench": "optimizer", "batch": args.batch, "threads": args.threads}
    for n in args.tokens:
        g = torch.Generator().manual_seed(0)
        ids, mask = torch.randint(1000, 20000, (args.batch, n), generator=g), torch.ones(args.batch, n, dtype=torch.long)
        target = torch.rand(args.batch, generator=g)
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for name, kw in variants.items():
                f, s = _time(model, kw, ids, mask, target)
                if name not in best or f + s < sum(best[name]):
                    best[name] = (f, s)
        out[f"tokens_{n}"] = {k: {"fwd_bwd_ms": round(1e3 * f, 1), "step_ms": round(1e3 * s, 2),
                                  "step_share": round(s / (f + s), 4)} for k, (f, s) in best.items()}
        out[f"tokens_{n}"]["update_speedup_fused_vs_loop"] = round(sum(best["loop"]) / sum(best["fused"]), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
