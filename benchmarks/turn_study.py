"""``--turn-average`` measured: trained checkpoints of a study beside themselves with it.

Averaging RD's maps over each image's four quarter turns leaves the student as it is, so each
checkpoint named by ``--source`` (a path under ``--work`` with ``{dataset}`` and ``{seed}``) is
written again with it (``rd.training.add_turn_average``, under ``--work``/turns; its position
or aligned statistics weighed again against the averaged map) and evaluated with and without,
as ``benchmarks.aligned_study`` does. The table gives what ``--turn-average auto`` decides (how
far quarter-turned normal images lie from the normals, against the spread among normals), the
three metrics without and with, the defect kinds' pixel AUROC, and the seconds to write and to
score the test set.

    OMP_NUM_THREADS=2 python -m benchmarks.turn_study --work /tmp/r18/work \\
        --mvtec ../shared/data/mvtec_subset --datasets hazelnut --seeds 111,112 \\
        --source "models/{dataset}-paper-{seed}.safetensors"
"""

from __future__ import annotations

from benchmarks.aligned_study import Refit, arguments, measure
from benchmarks.common import print_table, write_json
from rd.training import add_turn_average

TURNS = Refit(add_turn_average, "turns", ".turns",
              lambda info: f"{'kept' if info['kept'] else 'left out'} ({info['ratio']:.3f})")


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__, "turn_study.json", argv)
    rows, results = measure(args.work, args.mvtec, args.datasets.split(","),
                            [int(seed) for seed in args.seeds.split(",")], args.source, TURNS)
    print_table("Maps averaged over quarter turns, written onto trained checkpoints: image "
                "AUROC / pixel AUROC / AU-PRO",
                ["dataset", "seed", "checkpoint", "auto (distance ratio)", "without", "with",
                 "pixel AUROC per defect", "write s", "test set s (without / with)"], rows)
    write_json(args.json, {"runs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
