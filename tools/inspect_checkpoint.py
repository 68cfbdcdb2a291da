"""Print what a checkpoint holds: naming, architecture, depth, parameters, stored config and
training state.

python tools/inspect_checkpoint.py output/senet/last_checkpoint.pth [--keys]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.checkpoint import extract_state_dict, load_checkpoint  # noqa: E402
from retrieval.cli import run_cli  # noqa: E402
from retrieval.modeling.inspect import count_parameters, guess_depth, to_our_names  # noqa: E402
from retrieval.modeling.official_names import looks_official  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path")
    parser.add_argument("--keys", action="store_true", help="list every tensor name and shape")
    args = parser.parse_args(argv)
    obj = load_checkpoint(args.path)
    state = extract_state_dict(obj)
    try:
        ours, arch = to_our_names(state)
    except KeyError as err:
        raise SystemExit(f"{args.path}: {err.args[0]}") from None
    print(f"file:        {args.path}")
    print(f"naming:      {'official (pycls)' if looks_official(state) else 'ours'}")
    depth = guess_depth({k.removeprefix("encoder."): v for k, v in ours.items()})
    print(f"arch:        {arch}, ResNet-{depth}")
    print(f"tensors:     {len(state)}, parameters: {count_parameters(state):,}")
    print(f"other keys:  {sorted(k for k in obj if k not in ('model', 'model_state'))}")
    if "iteration" in obj:
        print(f"progress:    epoch {obj.get('epoch')}, iteration {obj['iteration']}")
    if args.keys:
        for name, value in state.items():
            print(f"  {name} {tuple(value.shape)}")


if __name__ == "__main__":
    run_cli(main)
