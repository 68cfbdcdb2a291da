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

import torch  # noqa: E402
from torch import nn  # noqa: E402

from retrieval.checkpoint import (  # noqa: E402
    extract_state_dict,
    load_checkpoint,
    load_model_weights,
)
from retrieval.cli import config_parser, run_cli  # noqa: E402
from retrieval.config import cfg_from_dump, load_cfg  # noqa: E402
from retrieval.evaluation.evaluator import evaluate  # noqa: E402
from retrieval.evaluation.report import format_markdown  # noqa: E402
from retrieval.modeling.inspect import model_overrides  # noqa: E402
from retrieval.modeling.official_names import from_official, looks_official  # noqa: E402
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


def cfg_for_weights(cfg, weights: str, arch: str):
    """``cfg`` with the MODEL section that built ``weights``: the stored config of our checkpoints;
    for official files (no config) ``arch`` with the depth and GeM kind read off their keys."""
    cfg = cfg.clone()
    cfg.defrost()
    obj = load_checkpoint(weights)
    if isinstance(obj.get("config"), str):
        cfg.MODEL = cfg_from_dump(obj["config"]).MODEL.clone()
        cfg.defrost()  # the stored node arrives frozen
        print(f"model rebuilt from the config stored in {weights}", file=sys.stderr)
    else:
        state = extract_state_dict(obj)
        state = from_official(state, arch) if looks_official(state) else state
        cfg.merge_from_list(model_overrides(state, arch))
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.PRETRAINED = ""  # the checkpoint holds every weight; an ImageNet file may not exist
    cfg.freeze()
    return cfg


def resolve_cfg(config: list[str], weights: str, opts: list[str]):
    """--config + overrides; MODEL replaced by the one the checkpoint was built with."""
    cfg = load_cfg(config, opts)
    weights = weights or cfg.MODEL.WEIGHTS
    return cfg_for_weights(cfg, weights, cfg.MODEL.ARCH) if weights else cfg


def load_rerank_model(cfg) -> nn.Module | None:
    """The CVNet-Rerank model of TEST.RERANK_WEIGHTS, rebuilt as trained (None when unset)."""
    if not cfg.TEST.RERANK_WEIGHTS:
        return None
    rerank_cfg = cfg_for_weights(cfg, cfg.TEST.RERANK_WEIGHTS, "cvnet_rerank")
    model = build_model(rerank_cfg)
    load_model_weights(model, cfg.TEST.RERANK_WEIGHTS, "cvnet_rerank")
    return model


def build_models(cfg) -> tuple[nn.Module, nn.Module | None]:
    """(global model, re-rank model or None); a cvnet_rerank model provides both."""
    # seeded so that a random-init evaluation is reproducible (and its feature cache reusable)
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        load_model_weights(model, cfg.MODEL.WEIGHTS, cfg.MODEL.ARCH)
    else:
        print(
            "no --weights and no MODEL.WEIGHTS: evaluating randomly initialised weights",
            file=sys.stderr,
        )
    if cfg.MODEL.ARCH == "cvnet_rerank":
        return model.encoder, load_rerank_model(cfg) or model
    return model, load_rerank_model(cfg)


def main(argv: list[str] | None = None) -> dict:
    """Parse, build, load, evaluate, print the table."""
    args = eval_parser(__doc__).parse_args(argv)
    cfg = resolve_cfg(args.config, args.weights, args.opts)
    model, rerank_model = build_models(cfg)
    results = evaluate(cfg, model, rerank_model, cfg.OUTPUT_DIR)
    print(format_markdown(results))
    return results


if __name__ == "__main__":
    run_cli(main)
