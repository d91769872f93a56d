"""python -m bench.population [--split calibration|evaluation|all] [--only SUBSTRING] [--root DIR]: build members."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.population.build import DEFAULT_ROOT, build
from bench.population.members import population


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", default="all", choices=("calibration", "evaluation", "all"))
    parser.add_argument("--only", default="")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args()
    for member in population():
        if args.split in ("all", member.split) and args.only in member.name:
            build(member, args.root, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
