"""Summarise the CPU demo: one results table and the figures, in output/demo/.

  python tools/demo_report.py [--out output/demo] [--topk 50]

Reads what the demo's runs wrote: eval_untrained/results.json and eval/results.json (tools/eval.py),
eval/rankings_<set>.npz, the metrics.jsonl of the trainings, and the test sets' ground truth
and images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.cli import run_cli  # noqa: E402
from retrieval.config import load_cfg  # noqa: E402
from retrieval.data.image_io import read_image  # noqa: E402
from retrieval.data.revisitop import crop_bbx, load_revisitop  # noqa: E402
from retrieval.visualize import label_of, plot_query_rows, plot_training_curves  # noqa: E402

PROTOCOLS = (("medium", "M"), ("hard", "H"))


def table(untrained: dict, trained: dict) -> str:
    """Markdown: rows = method, columns = Medium/Hard mAP per test set."""
    sets = list(trained["datasets"])
    head = "| method | " + " | ".join(f"{s} {c}" for s in sets for _, c in PROTOCOLS) + " |"
    lines = [head, "|---" * (1 + 2 * len(sets)) + "|"]
    runs = [("untrained SENet, global", untrained, "global")]
    runs += [(f"SENet, {row}", trained, row) for row in trained["datasets"][sets[0]]["rows"]]
    for label, results, row in runs:
        cells = [
            f"{100 * results['datasets'][s]['rows'][row][p]['map']:.2f}"
            for s in sets
            for p, _ in PROTOCOLS
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_query(before: np.ndarray, after: np.ndarray, gnd: list) -> int:
    """The query whose top 10 gains the most positives from re-ranking."""

    def positives(ranks, q):
        return sum(label_of(int(i), gnd[q]) == "positive" for i in ranks[:10, q])

    return int(np.argmax([positives(after, q) - positives(before, q) for q in range(len(gnd))]))


def query_figure(cfg, name: str, rankings: dict, rerank_key: str, out: Path) -> None:
    """Top 10 of one query before and after re-ranking, green/red/grey borders."""
    data = load_revisitop(cfg.DATA.ROOT, name)
    before, after = rankings["global"], rankings[rerank_key]
    q = best_query(before, after, data.gnd)
    paths = data.db_paths()
    query = crop_bbx(read_image(data.query_paths()[q]), data.query_boxes()[q], cfg.TEST.CROP, name)
    rows = {
        title: [(read_image(paths[i]), label_of(int(i), data.gnd[q])) for i in ranks[:10, q]]
        for title, ranks in (("global", before), (rerank_key.split(":")[0], after))
    }
    plot_query_rows(
        query, rows, out, title=f"{name} query {q}: green positive, red negative, grey junk"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="output/demo")
    parser.add_argument(
        "--config", default="configs/demo/senet.yaml", help="config of the evaluated model"
    )
    parser.add_argument("--topk", type=int, default=50, help="re-ranking depth shown in the figure")
    args = parser.parse_args(argv)
    out, cfg = Path(args.out), load_cfg(args.config)
    trained = json.loads((out / "eval/results.json").read_text())
    untrained = json.loads((out / "eval_untrained/results.json").read_text())
    text = "## Demo results (mAP, synthetic benchmark)\n\n" + table(untrained, trained) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    runs = {
        "SENet": out / "senet/metrics.jsonl",
        "CVNet-Rerank": out / "cvnet_rerank/metrics.jsonl",
    }
    keys = ("total_loss", "loss_cls", "loss_con", "loss_match")
    plot_training_curves(
        {k: v for k, v in runs.items() if v.is_file()}, keys, out / "training_curves.png"
    )
    for name in trained["datasets"]:
        rankings = dict(np.load(out / f"eval/rankings_{name}.npz"))
        key = f"+rerank {args.topk}:medium"
        if key in rankings:
            query_figure(cfg, name, rankings, key, out / f"query_{name}.png")
    print(f"figures: {sorted(str(p) for p in out.glob('*.png'))}")


if __name__ == "__main__":
    run_cli(main)
