"""Benchmarks CLI: `python -m clip_jax.bench <name> [options]`.

Each benchmark module exposes `add_parser(subparsers)`, which registers its
subcommand and sets `func`; add new ones to _BENCHMARKS.
"""

import argparse

from clip_jax.bench import groupvit_seg, profile, tokenizer, train

_BENCHMARKS = (tokenizer, train, profile, groupvit_seg)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m clip_jax.bench', description=__doc__.splitlines()[0])
  subparsers = parser.add_subparsers(dest='benchmark', required=True, metavar='BENCHMARK')
  for module in _BENCHMARKS:
    module.add_parser(subparsers)
  args = parser.parse_args(argv)
  args.func(args)


if __name__ == '__main__':
  main()
