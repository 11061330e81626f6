"""SecAgg+ against plain aggregation: a round's time in the App on the Simulation Engine, every client sampled."""

import statistics
import tempfile
from pathlib import Path

from benchmarks.scale import simulate

MODES = {"plain": "screen='none' lr=0.02", "secagg": "screen='none' lr=0.02 secagg=true"}


def bench_secagg(args, cache: str) -> str:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            # The weight limit at a share's size: a client's weighted update is quantised as finely as it can be
            weight = f"secagg-max-weight={50000 // n} secagg-shares={args.shares:g}"
            for repeat in range(args.repeats):
                order = list(MODES) if repeat % 2 == 0 else list(MODES)[::-1]  # alternate: a drift hits both
                for mode in order:
                    r = simulate(args, cache, n, Path(tmp), f"{MODES[mode]} {weight}", f"-{mode}-{repeat}", n)
                    print(f"{mode}, {n} clients: {r}", flush=True)
                    results.setdefault((n, mode), []).append(r)
    clients = " ".join(map(str, args.clients))

    def later(n: int, mode: str) -> float:  # rounds after the first, which also starts the workers
        return statistics.median(s for r in results[(n, mode)] for s in r["round_s"][1:])

    def first(n: int, mode: str) -> float:
        return statistics.median(r["round_s"][0] for r in results[(n, mode)])

    def accuracy(n: int, mode: str) -> str:
        return " / ".join(f"{r['accuracy']:.4f}" for r in results[(n, mode)])

    lines = [
        f"## SecAgg+: a round's time against plain aggregation, secagg-shares={args.shares:g}",
        "",
        (
            f"`python3 bench.py secagg --data-root {args.data_root} --clients {clients} --shares {args.shares:g} "
            f"--rounds {args.rounds} --repeats {args.repeats}`: `flwr run .` on the Simulation Engine with `num-supernodes=N "
            "client-resources-num-cpus=1`, IID shares, every client sampled every round (`fraction-fit=1 min-clients=N`), "
            "`screen='none'` in both, `secagg-max-weight` at a share's size, 1 local epoch at lr 0.02. Round time is the "
            "server's, from sampling to the end of evaluation; the later rounds' median over every run (the "
            "first round also starts the workers). The modes alternate run by run."
        ),
        "",
        (
            "| clients a round | plain, s | SecAgg+, s | SecAgg+ / plain | round 1 plain, s | round 1 SecAgg+, s "
            "| final accuracy plain | final accuracy SecAgg+ |"
        ),
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {n} | {later(n, 'plain'):.1f} | {later(n, 'secagg'):.1f} "
            f"| {later(n, 'secagg') / later(n, 'plain'):.2f}x | {first(n, 'plain'):.1f} | {first(n, 'secagg'):.1f} "
            f"| {accuracy(n, 'plain')} | {accuracy(n, 'secagg')} |"
            for n in args.clients
        ),
    ]
    return "\n".join(lines)
