"""``mpo demo`` (what ``make demo`` runs): learning that needs the image, end to end on 2 CPU cores.

1. write the synthetic demo data (``mpo data demo``): colour questions whose answer only the image tells;
2. build a tiny random InternVL with the real processor (``mpo models tiny``), its tokenizer trained on the data;
3. evaluate the held-out pairs before training (≈ 50 %: chosen and rejected differ in one colour word);
4. train with MPO (``configs/demo.yaml``) — no supervised warm-up: the SFT term of MPO is enough;
5. evaluate after training, and again with every image blanked (white): the gain must vanish (≤ 60 %), proof that
   it comes from the pixels and not from the wording;
6. write ``summary.json``, a before/after table and ``report.png`` (loss terms and reward accuracy over steps).

``heldout_accuracy_*`` is the log-prob accuracy over the image-dependent held-out datasets (shape_colour,
pair_colour); the text-only arithmetic set, which needs no image, is reported per task only.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import yaml

from mpo.config import load_config
from mpo.data.demo import demo_corpus, write_demo
from mpo.fsio import atomic_write_json
from mpo.models.tiny import TINY_MARKER, build_tiny
from mpo.train.config import RunConfig
from mpo.train.evaluate import run_eval
from mpo.train.recipe import run_train

__all__ = ["run_demo", "DEMO_CONFIG", "IMAGE_TASKS"]

log = logging.getLogger("mpo.demo")

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"
IMAGE_TASKS = ("shape_colour", "pair_colour")


def _image_accuracy(report) -> float:
    wins = sum((report.datasets[t]["logp_accuracy"] or 0.0) * report.datasets[t]["pairs"] for t in IMAGE_TASKS)
    return wins / sum(report.datasets[t]["pairs"] for t in IMAGE_TASKS)


def _clear_earlier_demo_run(run_dir: Path, model_dir: Path) -> None:
    """Remove the run of an earlier ``mpo demo`` into the same folder (trained anew); refuse any other folder. The
    model that run trained goes too when it predates ``mpo_tiny.json`` (build_tiny would refuse to replace it)."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    config = run_dir / "config.yaml"
    try:
        recorded = yaml.safe_load(config.read_text(encoding="utf-8"))["model"]["path"]
        ours = Path(recorded).resolve() == model_dir.resolve()
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        ours = False
    if not ours:
        raise FileExistsError(f"{run_dir}: exists and is not an earlier demo run (its config.yaml does not train "
                              f"{model_dir}); refusing to replace it: choose another --out")
    shutil.rmtree(run_dir)
    if model_dir.is_dir() and not (model_dir / TINY_MARKER).exists():
        shutil.rmtree(model_dir)


def run_demo(out: str | Path, *, steps: int | None = None, n_pairs: int = 2000, n_heldout: int = 200,
             seed: int = 0) -> dict:
    out = Path(out)
    t0 = time.perf_counter()
    data = out / "data"
    _clear_earlier_demo_run(out / "run", out / "tiny-internvl")  # before anything is written
    write_demo(data, n=n_pairs, n_heldout=n_heldout, seed=seed)
    model_dir = build_tiny(out / "tiny-internvl", "internvl", corpus=demo_corpus(data), seed=seed)
    heldout = str(data / "meta_heldout.json")
    eval_kw = dict(max_length=512, max_dynamic_patch=1, batch_size=64)

    before = run_eval(str(model_dir), heldout, **eval_kw)
    overrides = [f"model.path={model_dir}", f"data.meta_path={data / 'meta.json'}", f"train.output_dir={out / 'run'}"]
    if steps:
        overrides.append(f"train.max_steps={steps}")
    if not DEMO_CONFIG.is_file():
        raise FileNotFoundError(f"{DEMO_CONFIG} is missing: run the demo from a checkout of mpo (make demo)")
    result = run_train(load_config(RunConfig, DEMO_CONFIG, overrides))
    after = run_eval(str(out / "run"), heldout, **eval_kw)
    blank = run_eval(str(out / "run"), heldout, blank_images=True, reference="", **eval_kw)  # log-prob only

    summary = {
        "heldout_accuracy_before": _image_accuracy(before),
        "heldout_accuracy_after": _image_accuracy(after),
        "heldout_accuracy_blank_images": _image_accuracy(blank),
        "heldout_reward_accuracy_after": sum((after.datasets[t]["reward_accuracy"] or 0.0) * after.datasets[t]["pairs"]
                                             for t in IMAGE_TASKS) / sum(after.datasets[t]["pairs"] for t in IMAGE_TASKS),
        "per_task": {name: {"before": before.datasets[name]["logp_accuracy"],
                            "after": after.datasets[name]["logp_accuracy"],
                            "blank_images": blank.datasets[name]["logp_accuracy"]} for name in after.datasets},
        "train_seconds": result.train_seconds,
        "steps": result.steps,
        "total_seconds": time.perf_counter() - t0,
        "final_metrics": result.last_metrics,
    }
    atomic_write_json(out / "summary.json", summary)
    plot_report(out / "run" / "metrics.jsonl", out / "report.png")
    print(_table(summary))
    print(f"\nsummary: {out / 'summary.json'}   plot: {out / 'report.png'}   model: {out / 'run' / 'final'}")
    return summary


def _table(summary: dict) -> str:
    lines = [f"{'held-out task':16s} {'before':>8s} {'after':>8s} {'blank img':>10s}"]
    for name, acc in summary["per_task"].items():
        lines.append(f"{name:16s} {acc['before']:8.3f} {acc['after']:8.3f} {acc['blank_images']:10.3f}")
    lines.append(f"{'image tasks':16s} {summary['heldout_accuracy_before']:8.3f} "
                 f"{summary['heldout_accuracy_after']:8.3f} {summary['heldout_accuracy_blank_images']:10.3f}")
    lines.append(f"trained {summary['steps']} steps in {summary['train_seconds']:.1f} s")
    return "\n".join(lines)


def plot_report(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "total"), ("loss/sigmoid_weighted", "0.8·DPO"), ("loss/bco_pair_weighted", "0.2·BCO"),
                       ("loss/sft_weighted", "1.0·SFT")):
        if key in rows[0]:
            ax1.plot(steps, [r[key] for r in rows], label=label)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("loss")
    ax1.set_title("MPO loss terms (weighted)")
    ax1.legend()
    ax2.plot(steps, [r["rewards/accuracies"] for r in rows], label="reward accuracy (train batch)")
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("optimizer step")
    ax2.set_title("chosen reward > rejected reward")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
