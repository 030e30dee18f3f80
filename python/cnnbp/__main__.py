"""The `cnnbp` command (also `python -m cnnbp`)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnbp", description="Backpropagation through "
                                     "convolutional networks, visible and fast.")
    commands = parser.add_subparsers(dest="command", required=True)
    walk = commands.add_parser(
        "walkthrough", help="run the derivation's 15-parameter network step by step",
        description="Run one forward and backward pass of the derivation's network, print "
                    "every quantity, check every gradient, then take a few SGD steps.")
    walk.add_argument("--seed", type=int, default=0, help="seed for X and the weights (default 0)")
    walk.add_argument("--label", type=float, default=1.0, help="the target Y in [0, 1] (default 1)")
    walk.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default 0.5)")
    walk.add_argument("--steps", type=int, default=5, help="SGD steps to take (default 5)")
    walk.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "walkthrough":
        from . import walkthrough
        try:
            return walkthrough.main(seed=args.seed, label=args.label, lr=args.lr,
                                    steps=args.steps, as_json=args.json)
        except ValueError as error:
            print(f"cnnbp: {error}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
