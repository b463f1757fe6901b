"""The comparison's report: sacrebleu BLEU and chrF on detokenised test output with 95%
confidence intervals and paired-bootstrap significance (sacrebleu's own ``PairedTest``,
pre-training as the baseline), dev chrF before and after fine-tuning, a learning-curve
PNG (test BLEU against fine-tuning budget, one panel per target), results.json and report.md.
"""
from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sacrebleu.metrics import BLEU, CHRF  # noqa: E402
from sacrebleu.significance import PairedTest  # noqa: E402

from distmeta.compare.config import INITS, CompareConfig, budget_name  # noqa: E402
from distmeta.config import JobConfig  # noqa: E402

BASELINE = "pretrain"  # what MAML must beat
RunKey = tuple[str, str, Any, int]  # (target, init, budget tokens or None, seed)
Budgets = dict[str, dict[Any, list[Any]]]  # target → budget run → the requested budgets it stands for


def score_budget(hypotheses: dict[str, list[str]], refs: list[str], bootstrap: int) -> dict[str, dict[str, Any]]:
    """BLEU and chrF of each initialisation's test output with 95% CIs, and the paired-bootstrap
    p-value of each against the pre-training baseline: 1 where the two score the same (identical
    output, or both BLEU 0), where sacrebleu, counting resamples with a gap larger than the
    observed zero, would give its smallest p."""
    order = [BASELINE, *(i for i in INITS if i != BASELINE)]
    logging.getLogger("sacrebleu").setLevel(logging.WARNING)  # one INFO line per resampling otherwise
    _, scores = PairedTest([(name, hypotheses[name]) for name in order], {"BLEU": BLEU(), "chrF": CHRF()}, [refs],
                           test_type="bs", n_samples=bootstrap)()
    out: dict[str, dict[str, Any]] = {name: {} for name in order}
    for metric, results in scores.items():
        if metric == "System":
            continue
        key = "bleu" if metric.startswith("BLEU") else "chrf"
        for name, result in zip(order, results):
            as_float = lambda v: None if v is None else float(v)  # noqa: E731 (numpy scalars → JSON)
            same = name != BASELINE and result.score == results[0].score
            out[name] |= {key: float(result.score), f"{key}_ci95": as_float(result.ci),
                          f"{key}_p_vs_pretrain": 1.0 if same else as_float(result.p_value)}
    return out


def write_report(spec: CompareConfig, job: JobConfig, folder: Path, results: dict[RunKey, dict[str, Any]],
                 refs: dict[tuple[str, str], list[str]], budgets: Budgets, updates: int) -> dict[str, Any]:
    """Score every run, write results.json, report.md and learning_curves.png into ``folder``.
    A row per distinct run: its ``budgets`` are the requested budgets it stands for.
    ``updates``: the meta-updates made (fewer than ``train.steps`` when a time limit stopped them)."""
    rows = []
    for target in spec.targets:
        for budget, serves in budgets[target].items():
            for seed in spec.finetune.seeds[:1] if budget == 0 else spec.finetune.seeds:
                runs = {init: results[target, init, budget, seed] for init in INITS}
                test_refs, dev_refs = refs[target, "test"], refs[target, "dev"]
                for run in runs.values():
                    if len(run["test_hypotheses"]) != len(test_refs) or len(run["dev_hypotheses"]) != len(dev_refs):
                        raise ValueError(f"{target}: hypotheses and references differ in length; rerun the finetune stage")
                scores = score_budget({i: r["test_hypotheses"] for i, r in runs.items()}, test_refs, spec.bootstrap)
                starts = {i: results[target, i, 0, spec.finetune.seeds[0]]["dev_hypotheses"] for i in INITS} \
                    if 0 in spec.budget_tokens() else None
                for init, run in runs.items():
                    row = {"target": target, "budget": budget_name(budget), "budgets": [budget_name(b) for b in serves],
                           "seed": seed, "init": init,
                           "train_pairs": run["train_pairs"], "train_tokens": run["train_tokens"], "steps": run["steps"],
                           "best_step": run["best_step"], "lr": run["lr"], "dev_loss": run["dev_loss"],
                           "start_dev_loss": run["start_dev_loss"], "test_pairs": len(test_refs),
                           "test_sources_cut": run.get("test_sources_cut"),
                           **scores[init],
                           "dev_chrf": CHRF().corpus_score(run["dev_hypotheses"], [dev_refs]).score}
                    if starts is not None:
                        row["start_dev_chrf"] = CHRF().corpus_score(starts[init], [dev_refs]).score
                    rows.append(row)
    report = {"name": spec.name, "targets": spec.targets, "sources": spec.sources, "budgets": spec.finetune.budgets,
              "seeds": spec.finetune.seeds, "meta_updates": updates, "test_pairs": spec.decode.test_pairs, "dev_pairs": spec.decode.dev_pairs,
              "beam": spec.decode.beam, "bootstrap": spec.bootstrap, "machine": f"{platform.node()} {platform.machine()}",
              "rows": rows}
    (folder / "results.json").write_text(json.dumps(report, indent=2))
    plot_curves(spec, rows, folder / "learning_curves.png")
    (folder / "report.md").write_text(markdown(spec, job, rows, updates))
    return report


def plot_curves(spec: CompareConfig, rows: list[dict[str, Any]], path: Path) -> None:
    """Test BLEU (± 95% CI) against the fine-tuning budget: one panel per target, one line per
    initialisation (seed means where there are several seeds)."""
    budgets = [budget_name(b) for b in spec.budget_tokens()]
    figure, axes = plt.subplots(1, len(spec.targets), figsize=(3.2 * len(spec.targets), 3.2), squeeze=False, sharey=True)
    for axis, target in zip(axes[0], spec.targets):
        for init in INITS:
            points = [[r for r in rows if (r["target"], r["init"]) == (target, init) and b in r["budgets"]] for b in budgets]
            means = [sum(r["bleu"] for r in p) / len(p) for p in points]
            errors = [sum(r["bleu_ci95"] for r in p) / len(p) for p in points]
            axis.errorbar(range(len(budgets)), means, yerr=errors, marker="o", capsize=3, label=init)
        axis.set_xticks(range(len(budgets)), budgets)
        axis.set_title(f"{target}→eng")
        axis.set_xlabel("fine-tuning target tokens")
    axes[0][0].set_ylabel("test BLEU")
    axes[0][-1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(spec: CompareConfig, job: JobConfig, rows: list[dict[str, Any]], updates: int) -> str:
    m, t = job.model, job.task
    rates = " or ".join(f"{r:g}" for r in spec.finetune.rates())
    if len(spec.finetune.rates()) > 1:
        rates += " (chosen on dev loss per run)"
    lines = [f"# {spec.name}: MAML vs multilingual pre-training for low-resource translation", "",
             f"Meta-training: {job.algorithm.name} on {len(spec.sources)} source languages ({', '.join(spec.sources)}), "
             f"{updates} updates of {job.train.meta_batch} tasks, support/query {t.support_tokens}/{t.query_tokens} "
             f"target tokens. Pre-training: the same updates, tasks and tokens, jointly (Ray Train). Transformer "
             f"{m.dim}-d, {m.layers}+{m.layers} layers, {t.vocab} pieces. Fine-tuning: Adam at {rates}, "
             f"batches of {spec.finetune.batch_tokens} target tokens, early stopping on dev loss. Test: the first "
             f"{spec.decode.test_pairs} test pairs, {'greedy' if spec.decode.beam == 1 else f'beam {spec.decode.beam}'} "
             f"decoding, sacrebleu on detokenised output; ± is the 95% CI, p the paired bootstrap "
             f"({spec.bootstrap} resamples) against pre-training.", "",
             "| target | budget (tokens) | seed | MAML BLEU | pre-train BLEU | random BLEU | p (MAML vs pre) | MAML chrF | "
             "pre-train chrF | random chrF | p (chrF) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    keyed = {(r["target"], r["budget"], r["seed"], r["init"]): r for r in rows}
    names = {(r["target"], r["budget"]): ", ".join(r["budgets"]) for r in rows}
    for target, budget, seed in dict.fromkeys((r["target"], r["budget"], r["seed"]) for r in rows):
        by = {i: keyed[target, budget, seed, i] for i in INITS}
        cells = [f"{by[i]['bleu']:.2f} ± {by[i]['bleu_ci95']:.2f}" for i in ("maml", "pretrain", "random")]
        chrf = [f"{by[i]['chrf']:.1f} ± {by[i]['chrf_ci95']:.1f}" for i in ("maml", "pretrain", "random")]
        p_bleu, p_chrf = by["maml"]["bleu_p_vs_pretrain"], by["maml"]["chrf_p_vs_pretrain"]
        tokens = f"{names[target, budget]} ({by['maml']['train_tokens']})" if budget != "0" else "0"
        lines.append(f"| {target} | {tokens} | {seed} | {' | '.join(cells)} | {p_bleu:.4f} | {' | '.join(chrf)} | {p_chrf:.4f} |")
    cut = {r["target"]: f"{r['test_sources_cut']} of {r['test_pairs']}" for r in rows if r["test_sources_cut"]}
    if cut:
        lines += ["", f"Test sources longer than {t.max_len} pieces are cut to {t.max_len} before decoding, alike for "
                  f"every initialisation: " + ", ".join(f"{target} {n}" for target, n in cut.items()) + "."]
    lines += ["", "Dev chrF of the initialisation → after fine-tuning (updates to the best check, Adam rate):", "",
              "| target | budget | seed | MAML | pre-train | random |", "|---|---|---|---|---|---|"]
    for target, budget, seed in dict.fromkeys((r["target"], r["budget"], r["seed"]) for r in rows):
        by = {i: keyed[target, budget, seed, i] for i in INITS}
        cells = [f"{by[i].get('start_dev_chrf', float('nan')):.1f} → {by[i]['dev_chrf']:.1f} ({by[i]['best_step']}, {by[i]['lr']:g})"
                 for i in ("maml", "pretrain", "random")]
        lines.append(f"| {target} | {names[target, budget]} | {seed} | {' | '.join(cells)} |")
    lines += ["", "![test BLEU against fine-tuning budget](learning_curves.png)", ""]
    return "\n".join(lines)
