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
from retrieval.modeling.inspect import count_parameters, guess_arch, guess_depth  # noqa: E402
from retrieval.modeling.official_names import MODEL_SCOPES, from_official, looks_official  # noqa: E402


def _to_ours(state: dict) -> tuple[dict, str]:
    """Our naming of ``state`` and the architecture it belongs to."""
    if not looks_official(state):
        return state, guess_arch(state)
    for arch in ("cvnet_rerank", "senet", "cvnet_global"):
        try:
            ours = from_official(state, arch)
        except KeyError:
            continue
        if arch in MODEL_SCOPES and guess_arch(ours) in (arch, "cvnet_global"):
            return ours, arch
    raise SystemExit("keys match no known official architecture")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path")
    parser.add_argument("--keys", action="store_true", help="list every tensor name and shape")
    args = parser.parse_args(argv)
    obj = load_checkpoint(args.path)
    state = extract_state_dict(obj)
    ours, arch = _to_ours(state)
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
