"""`python -m data_prep {synth,shard,verify} ...`: the data preparation command line."""

import argparse

from data_prep import shard, synth, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in (("synth", synth), ("shard", shard), ("verify", verify)):
        sub = commands.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
