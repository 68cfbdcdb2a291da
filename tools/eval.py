"""Evaluate a checkpoint: ``python tools/eval.py --config C --weights W [KEY VALUE ...]``.

The model is rebuilt from the config stored in the checkpoint (key 'config', a YAML dump) when it
has one, so a checkpoint cannot be evaluated as the wrong variant; official checkpoints carry none
and use --config. Data and TEST.* settings always come from --config and the overrides. Prints the
markdown table and writes results.json / results.md into OUTPUT_DIR.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import retrieval  # noqa: E402, F401  (first: its CPU allocator setting must precede torch)

# isort: split
import torch  # noqa: E402
from torch import nn  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from retrieval.checkpoint import load_state_strict, read_model_state  # noqa: E402
from retrieval.cli import config_parser, run_cli  # noqa: E402
from retrieval.config import cfg_from_dump, load_cfg  # noqa: E402
from retrieval.evaluation.evaluator import evaluate  # noqa: E402
from retrieval.evaluation.report import format_markdown  # noqa: E402
from retrieval.modeling.inspect import model_overrides  # noqa: E402
from retrieval.modeling.registry import build_model  # noqa: E402


def eval_parser(doc: str | None):
    """--config (repeatable), --weights and trailing KEY VALUE overrides."""
    parser = config_parser(doc)
    parser.add_argument(
        "--weights",
        default="",
        help="checkpoint to evaluate (ours or official); default MODEL.WEIGHTS",
    )
    return parser


def model_from_checkpoint(cfg, weights: str, arch: str) -> tuple[CfgNode, nn.Module]:
    """(cfg with the MODEL section that built ``weights``, the model loaded from it), reading the
    file once. Our checkpoints store their config; official files (none stored) give ``arch`` with
    the depth and GeM kind read off their keys."""
    obj, state = read_model_state(weights, arch)
    cfg = cfg.clone()
    cfg.defrost()
    if isinstance(obj.get("config"), str):
        cfg.MODEL = cfg_from_dump(obj["config"]).MODEL.clone()
        cfg.defrost()  # the stored node arrives frozen
        print(f"model rebuilt from the config stored in {weights}", file=sys.stderr)
    else:
        cfg.merge_from_list(model_overrides(state, arch))
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.PRETRAINED = ""  # the checkpoint holds every weight; an ImageNet file may not exist
    cfg.freeze()
    model = build_model(cfg)
    load_state_strict(model, state, f"checkpoint {weights!r}")
    return cfg, model


def load_models(
    config: list[str], weights: str, opts: list[str], with_rerank: bool = True
) -> tuple[CfgNode, nn.Module, nn.Module | None]:
    """(resolved cfg, global model, re-rank model or None) of --config, --weights and overrides;
    MODEL is the one the checkpoint was built with, and a cvnet_rerank model provides both.
    ``with_rerank=False`` skips TEST.RERANK_WEIGHTS (feature extraction needs no re-ranker)."""
    cfg = load_cfg(config, opts)
    weights = weights or cfg.MODEL.WEIGHTS
    # seeded so that a random-init evaluation is reproducible (and its feature cache reusable)
    torch.manual_seed(cfg.SEED)
    if weights:
        cfg, model = model_from_checkpoint(cfg, weights, cfg.MODEL.ARCH)
    else:
        print(
            "no --weights and no MODEL.WEIGHTS: evaluating randomly initialised weights",
            file=sys.stderr,
        )
        model = build_model(cfg)
    rerank_model = None
    if with_rerank and cfg.TEST.RERANK_WEIGHTS:
        rerank_model = model_from_checkpoint(cfg, cfg.TEST.RERANK_WEIGHTS, "cvnet_rerank")[1]
    if cfg.MODEL.ARCH == "cvnet_rerank":
        return cfg, model.encoder, rerank_model or model
    return cfg, model, rerank_model


def main(argv: list[str] | None = None) -> dict:
    """Parse, build, load, evaluate, print the table."""
    args = eval_parser(__doc__).parse_args(argv)
    cfg, model, rerank_model = load_models(args.config, args.weights, args.opts)
    results = evaluate(cfg, model, rerank_model, cfg.OUTPUT_DIR)
    print(format_markdown(results))
    return results


if __name__ == "__main__":
    run_cli(main)
