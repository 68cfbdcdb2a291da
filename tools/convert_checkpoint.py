"""Convert a checkpoint between the official pycls naming and ours.

python tools/convert_checkpoint.py --to ours CVPR2022_CVNet_R50.pyth cvnet_r50.pth --arch
cvnet_rerank
python tools/convert_checkpoint.py --to official output/senet/model_final.pth senet_official.pyth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.checkpoint import (
    extract_state_dict,
    load_checkpoint,
    load_state_strict,
    save_checkpoint,
)  # noqa: E402
from retrieval.cli import run_cli  # noqa: E402
from retrieval.config import cfg_from_dump, load_cfg  # noqa: E402
from retrieval.modeling.inspect import guess_arch, model_overrides  # noqa: E402
from retrieval.modeling.official_names import (
    MODEL_SCOPES,
    from_official,
    looks_official,
    to_official,
)  # noqa: E402
from retrieval.modeling.registry import build_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="input checkpoint")
    parser.add_argument("dst", help="output checkpoint (written atomically)")
    parser.add_argument("--to", choices=("ours", "official"), required=True, help="target naming")
    parser.add_argument(
        "--arch", choices=sorted(MODEL_SCOPES), help="architecture (default: our stored config)"
    )
    parser.add_argument("--config", help="config to store with a converted official checkpoint")
    parser.add_argument("opts", nargs="*", help="config overrides KEY VALUE ...")
    return parser.parse_intermixed_args(argv)


def to_ours(args: argparse.Namespace) -> None:
    """Official -> ours, verified by strict loading into the model the stored config builds."""
    state = extract_state_dict(load_checkpoint(args.src))
    if not looks_official(state):
        raise SystemExit(f"{args.src}: keys are not in the official naming; nothing to convert")
    if not args.arch:
        raise SystemExit("--arch is required to convert an official checkpoint")
    ours = from_official(state, args.arch)
    cfg = load_cfg(args.config, [*model_overrides(ours, args.arch), *args.opts])
    load_state_strict(build_model(cfg), ours, f"converted {args.src}")
    save_checkpoint({"model": ours, "config": cfg.dump()}, args.dst)
    print(f"wrote {args.dst}: {len(ours)} tensors, {args.arch} R{cfg.MODEL.DEPTH}")


def to_official_file(args: argparse.Namespace) -> None:
    """Ours -> official: a pycls container {'model_state': ...}."""
    obj = load_checkpoint(args.src)
    state = extract_state_dict(obj)
    arch = args.arch or (
        cfg_from_dump(obj["config"]).MODEL.ARCH if "config" in obj else guess_arch(state)
    )
    official = to_official(state, arch)
    save_checkpoint({"model_state": official}, args.dst)
    print(f"wrote {args.dst}: {len(official)} tensors in the official {arch} naming")


def main(argv=None) -> None:
    args = parse_args(argv)
    to_ours(args) if args.to == "ours" else to_official_file(args)


if __name__ == "__main__":
    run_cli(main)
