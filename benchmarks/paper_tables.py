"""Reproduce the shape of the DIG paper's Tables 3-6 on one dataset (MovieLens 100K here).

    python benchmarks/paper_tables.py --config configs/ml100k.yaml --seeds 3

For every seed it trains (``dig train`` in a subprocess, one process) and evaluates
(``dig eval``) these variants:

=========================  ==============================================  =====================
variant                    training overrides                              evaluation overrides
=========================  ==============================================  =====================
DIG                        --                                              --
Fixed SID (Abl. 1)         tokenizer.frozen=true                           --
Base (Table 3)             loss.recall_loss_weight=0                       --
w/o training-side u2i      u2t.train_side=false                            --
stat-mean u2t (Abl. 3)     (DIG's checkpoint)                              u2t.inference=stat_mean
w/o inference MLP_u2t      (DIG's checkpoint)                              u2t.inference=none
w/o both (Table 6)         (w/o training-side u2i's checkpoint)            u2t.inference=none
last-layer supervision     loss.recall_supervision=last_layer              --
recall samples = exposure  loss.recall_samples=exposure                    --
DIG, beam 64 / beam 16    (DIG's checkpoint)                              eval.beam_size=64 / 16
DIG, exclude history       (DIG's checkpoint)                              --exclude-history
popularity                 (from DIG's evaluations)                        --
=========================  ==============================================  =====================

and writes mean ± std over seeds as markdown (``--out``) plus every raw metric as JSON
next to it. Runs are cached under ``--work``: an existing evaluation JSON is reused, so an
interrupted run resumes where it stopped. The paper's claims checked at the end: DIG beats
Fixed SID on Recall@10 (Ablation 1), DIG's rank AUC >= Base's (Table 3), and the recall-rank
AUC gap is small (Table 4; we call |gap| <= 0.05 small, the paper's largest is 0.061).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dig_torchrec.demo import best_checkpoint as demo_best_checkpoint  # noqa: E402
from dig_torchrec.files import write_text_atomic  # noqa: E402
from dig_torchrec.retrieval.metrics import mean_std  # noqa: E402
from dig_torchrec.training.trainer import FINAL_METRICS_FILE  # noqa: E402

logger = logging.getLogger("paper_tables")


@dataclass(frozen=True)
class Variant:
    name: str
    train: Sequence[str] = ()  # training overrides (ignored when ``reuse`` is set)
    evaluate: Sequence[str] = ()  # evaluation-time overrides
    reuse: Optional[str] = None  # evaluate this other variant's checkpoint instead of training
    note: str = ""
    eval_flags: Sequence[str] = ()  # extra `dig eval` flags
    optional: bool = False  # only run when named in --only (not one of the paper's tables)
    # which checkpoint of the run `dig eval` reads: auto = the run's checkpoints/best (its pick by
    # train.select_metric on the valid split, what `make demo` serves) when it has one, else the latest
    checkpoint: str = "auto"


LEVERS: List[tuple] = [
    ("lever: paper recipe (BCE, uniform negatives, bucket-mean teacher)",
     ["loss.recall_objective=bce", "data.negative_sampling=uniform", "u2t.teacher=bucket_mean",
      "u2t.train_mlp_prob=0", "loss.prefix_negatives=0", "tokenizer.restart_dead_codes=true"]),
    ("lever: BCE objective", ["loss.recall_objective=bce", "loss.prefix_negatives=0"]),
    ("lever: softmax objective", ["loss.recall_objective=softmax"]),
    ("lever: uniform negatives", ["data.negative_sampling=uniform"]),
    ("lever: popularity negatives, no logQ", ["data.negative_sampling=popularity", "loss.logq_correction=false"]),
    ("lever: 16 negatives", ["data.negatives_per_positive=16"]),
    ("lever: no prefix-aware negatives", ["loss.prefix_negatives=0"]),
    ("lever: 4 prefix-aware negatives", ["loss.prefix_negatives=4"]),
    ("lever: bucket-mean teacher", ["u2t.teacher=bucket_mean"]),
    ("lever: leave-one-out teacher", ["u2t.teacher=leave_one_out"]),
    ("lever: teacher only in training (train_mlp_prob=0)", ["u2t.train_mlp_prob=0"]),
    ("lever: MLP_u2t in training p=0.5", ["u2t.train_mlp_prob=0.5"]),
    ("lever: dead-code restarts (per step)", ["tokenizer.restart_dead_codes=true", "tokenizer.dead_code_rule=per_step"]),
    ("lever: catalog dead-code rule", ["tokenizer.restart_dead_codes=true", "tokenizer.dead_code_rule=catalog",
                                       "tokenizer.dead_code_threshold=0.05"]),
    ("lever: freeze SIDs 100 steps after init", ["tokenizer.freeze_after_steps=100"]),
    ("lever: no SID freeze (EMA the whole run)", ["tokenizer.freeze_after_steps=0"]),
    ("lever: Gumbel assignment (decay 200 steps)", ["tokenizer.assignment=gumbel", "tokenizer.gumbel_decay_steps=200"]),
    ("lever: prefix-conditioned SID embedding", ["tokenizer.sid_embedding=sum+prefix"]),
    ("lever: 4 epochs", ["train.epochs=4"]),
    ("lever: SID-token history keys", ["model.history_sid=true"]),
    # model selection by retrieval: validate beam R@10 on 1,024 valid users each epoch, evaluate checkpoints/best
    ("lever: 4 epochs, best by valid R@10", ["train.epochs=4", "train.select_metric=recall@10",
                                             "train.val_retrieval_users=1024"]),
    ("lever: 4 epochs, best by valid R@10, SID-token history keys",
     ["train.epochs=4", "train.select_metric=recall@10", "train.val_retrieval_users=1024", "model.history_sid=true"]),
    # the recipe with the SID table always sealed at the freeze (tokenizer.seal=balanced; the default is auto; the rows
    # above ran on code without the seal, i.e. tokenizer.seal=none)
    ("lever: 4 epochs, best by valid R@10, SID-token history keys, balanced seal",
     ["train.epochs=4", "train.select_metric=recall@10", "train.val_retrieval_users=1024", "model.history_sid=true",
      "tokenizer.seal=balanced"]),
    # the same recipe for Fixed SID, so the Ablation-1 comparison stays like for like
    ("lever: Fixed SID, 4 epochs, best by valid R@10, SID-token history keys",
     ["tokenizer.frozen=true", "train.epochs=4", "train.select_metric=recall@10", "train.val_retrieval_users=1024",
      "model.history_sid=true"]),
    # on the history-position recipe (configs/ml100k.yaml, 2026-12-06): the option it added, and two round-4 levers
    ("lever: no history positions", ["model.history_position=false"]),
    ("lever: descendant distillation", ["loss.descendant_distill_weight=1.0"]),
    ("lever: exposure rows, weight 0.2", ["loss.recall_samples=retrieval+exposure", "loss.exposure_recall_weight=0.2"]),
    # the exposure rows at full weight (Eq. 10 weighs every row alike): does the recall AUC gap close to |gap| <= 0.05?
    ("lever: exposure rows, weight 1.0", ["loss.recall_samples=retrieval+exposure", "loss.exposure_recall_weight=1.0"]),
    # between the two: where on the R@10 / gap trade-off does weight 0.5 land?
    ("lever: exposure rows, weight 0.5", ["loss.recall_samples=retrieval+exposure", "loss.exposure_recall_weight=0.5"]),
]

VARIANTS: List[Variant] = [
    Variant("DIG"),
    Variant("Fixed SID", train=("tokenizer.frozen=true",), note="Ablation 1"),
    # rank-only: its checkpoints/best is picked by valid rank AUC (recall@10 has nothing to select on)
    Variant("Base", train=("loss.recall_loss_weight=0", "train.select_metric=rank_auc", "train.val_retrieval_users=0"),
            note="Table 3 rank-only"),
    Variant("w/o training-side u2i", train=("u2t.train_side=false",), note="Table 6"),
    Variant("stat-mean u2t", evaluate=("u2t.inference=stat_mean",), reuse="DIG", note="Ablation 3"),
    Variant("w/o inference MLP_u2t", evaluate=("u2t.inference=none",), reuse="DIG", note="Table 6"),
    Variant("w/o both", evaluate=("u2t.inference=none",), reuse="w/o training-side u2i", note="Table 6"),
    Variant("last-layer supervision", train=("loss.recall_supervision=last_layer",), note="Ablation 4"),
    Variant("recall samples = exposure", train=("loss.recall_samples=exposure",), note="issue 3 switch",
            optional=True),
    Variant("DIG, no dead-code restarts", train=("tokenizer.restart_dead_codes=false",),
            note="investigation: SID churn", optional=True),
    # extra evaluations of DIG's checkpoint: a narrow beam (fidelity is only informative when
    # B is well below the number of valid depth-(L-1) prefixes) and the exclude-history protocol
    Variant("DIG, beam 64", evaluate=("eval.beam_size=64", "eval.topk=[10,50]"), reuse="DIG", note="fidelity"),
    Variant("DIG, beam 16", evaluate=("eval.beam_size=16", "eval.topk=[10]"), reuse="DIG", note="fidelity"),
    Variant("DIG, exclude history", reuse="DIG", eval_flags=("--exclude-history",), note="protocol"),
    # the retrieval-quality levers (dig_torchrec/losses.py, README "Recall objective ..."): each row sets
    # one lever against the configured default, so the rows stay meaningful whatever the default is
    *[Variant(name, train=tuple(train), note="lever", optional=True) for name, train in LEVERS],
]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def run(cmd: List[str], log: Path) -> None:
    """Run ``cmd``, teeing output to ``log``; raise with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    logger.info("$ %s", " ".join(cmd))
    t0 = time.time()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        raise RuntimeError(f"command failed ({proc.returncode}) after {time.time() - t0:.0f}s: {' '.join(cmd)}\n" + "\n".join(tail))
    logger.info("  done in %.0fs (log %s)", time.time() - t0, log)


def latest_checkpoint(run_dir: Path) -> Path:
    ckpts = []
    for p in (run_dir / "checkpoints").glob("step-*"):
        if (p / "COMPLETE").exists():
            ckpts.append((int(p.name.split("-")[1]), p))
    if not ckpts:
        raise RuntimeError(f"no complete checkpoint under {run_dir}/checkpoints")
    return max(ckpts)[1]


def training_finished(run_dir: Path) -> bool:
    """The run trained to its last step: the trainer writes its final-metrics file only then."""
    return (run_dir / FINAL_METRICS_FILE).is_file()


def pick_checkpoint(run_dir: Path, how: str) -> Path:
    """``how`` = latest | best | auto (best when the run has a complete ``checkpoints/best``, else latest).

    best is the run's pick by ``train.select_metric``, found as ``make demo`` finds it.
    """
    if how != "latest":
        best = demo_best_checkpoint(run_dir)
        if best is not None:
            return Path(best["path"])
        if how == "best":
            raise RuntimeError(
                f"no complete checkpoints/best under {run_dir} (train.select_metric picks it at validation)")
    return latest_checkpoint(run_dir)


def train_and_eval(args: argparse.Namespace, variant: Variant, seed: int, work: Path) -> Dict[str, object]:
    py = sys.executable
    out_json = work / f"seed{seed}" / f"{slug(variant.name)}.json"
    if out_json.exists() and not args.force:
        logger.info("reusing %s", out_json)
        return json.loads(out_json.read_text())
    base = variant.reuse or variant.name
    src = next(v for v in VARIANTS if v.name == base)
    run_dir = work / f"seed{seed}" / slug(base)
    if not training_finished(run_dir) or (args.force and variant.reuse is None):
        overrides = [f"run_dir={run_dir}", f"train.seed={seed}", f"data.seed={seed}", *args.overrides, *src.train]
        # --force retrains from step 0; otherwise an interrupted run (killed mid-training: complete checkpoints but
        # no final_metrics.json) continues from its newest checkpoint instead of being evaluated half-trained
        start = ["--fresh"] if args.force and variant.reuse is None else ["--resume", "auto"]
        run([py, "-m", "dig_torchrec.cli", "train", "--config", args.config, *start, *overrides], run_dir / "train.log")
    ckpt = pick_checkpoint(run_dir, src.checkpoint)
    # dig eval writes a partial file; the cached JSON appears, annotated, in one atomic rename (a run killed here
    # leaves no truncated or unannotated cache entry)
    partial = out_json.with_suffix(".eval.json")
    cmd = [py, "-m", "dig_torchrec.cli", "eval", "--checkpoint", str(ckpt), "--out", str(partial), "--no-progress",
           "--split", args.split, *variant.eval_flags, *args.eval_overrides, *variant.evaluate]
    if variant.name != "DIG":  # the item-space upper bound is reported once, for DIG
        cmd.append("--no-full-ranking")
    if args.max_users:
        cmd += ["--max-users", str(args.max_users)]
    if args.exclude_history:
        cmd.append("--exclude-history")
    run(cmd, out_json.with_suffix(".log"))
    res = json.loads(partial.read_text())
    res["train_overrides"] = list(src.train)
    res["checkpoint"] = f"{src.checkpoint}: {ckpt.name}"
    res["eval_overrides"] = list(variant.evaluate)
    write_text_atomic(out_json, json.dumps(res, indent=2))
    partial.unlink()
    return res


# ---------------------------------------------------------------------- reporting
def _num(x: object) -> float:
    return float("nan") if x is None else float(x)  # type: ignore[arg-type]


def ms(results: List[Dict[str, object]], key: str, digits: int = 4) -> str:
    """``mean ± std`` over seeds; just the value for a single seed (no spread to show)."""
    vals = [_num(r.get(key)) for r in results]
    m, s = mean_std(vals)
    if math.isnan(m):
        return "n/a"
    if sum(not math.isnan(v) for v in vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def mean(results: List[Dict[str, object]], key: str) -> float:
    return mean_std(_num(r.get(key)) for r in results)[0]


def peer_markdown(args: argparse.Namespace) -> "tuple[List[str], List[str]]":
    """Main-table rows and a "Peers" section from ``--peers`` (a ``benchmarks/baselines.py`` JSON)."""
    if not getattr(args, "peers", None):
        return [], []
    sys.path.insert(0, str(REPO / "benchmarks"))
    from baselines import peer_markdown as _peer_markdown

    return _peer_markdown(args.peers)


def render(args: argparse.Namespace, res: Dict[str, List[Dict[str, object]]], command: str, elapsed: float) -> str:
    seeds = len(next(iter(res.values())))
    dig = res["DIG"]
    lines: List[str] = []
    a = lines.append
    a(f"# DIG paper tables on {Path(args.config).stem} ({seeds} seed{'s' if seeds > 1 else ''})")
    a("")
    a("Produced by:")
    a("")
    a("```")
    a(command)
    a("```")
    a("")
    first = dig[0]
    a(f"- date: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, "
      f"{os.cpu_count()} CPUs (shared with other jobs), {platform.system()} {platform.release()}, "
      f"Python {platform.python_version()}; wall time of the last invocation {elapsed / 60:.1f} min "
      f"(cached runs are reused)")
    a(f"- split: `{first.get('split')}`, {first.get('num_users')} target users (leave-last-out), "
      f"{first.get('num_items')} items, candidates: `{first.get('candidates')}`; full corpus, no sampled negatives")
    a(f"- SID: L={first.get('sid_shape', {}).get('num_layers')}, K={first.get('sid_shape', {}).get('num_codes')}; "
      f"beam size {first.get('beam_size')} (config {first.get('beam_size_config')}, widened to the largest K of "
      f"Recall@K); unified = beam top-{first.get('unified_top_n')} reranked by the rank path")
    p10, n_users = mean(dig, "recall@10"), float(first.get("num_users") or 1)
    se = math.sqrt(max(p10 * (1 - p10), 0.0) / n_users)
    a("- values are mean ± sample std over seeds (train.seed = data.seed = seed)" if seeds > 1 else
      f"- ONE seed (seed {args.first_seed}): single values, no seed spread. For scale, the binomial standard "
      f"error of DIG's R@10 over {int(n_users)} users is ±{se:.4f}")
    a("")
    a("## Main retrieval results (cf. Table 2)")
    a("")
    a("| Method | R@10 | N@10 | R@50 | N@50 | R@100 | N@100 | unified R@10 | fidelity@10 |")
    a("|---|---|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        r = res[v.name]
        if not r:  # an optional variant that was not run
            continue
        label = v.name if len(r) == seeds else f"{v.name} ({len(r)} seed{'s' if len(r) > 1 else ''})"
        a(f"| {label} | {ms(r, 'recall@10')} | {ms(r, 'ndcg@10')} | {ms(r, 'recall@50')} | {ms(r, 'ndcg@50')} | "
          f"{ms(r, 'recall@100')} | {ms(r, 'ndcg@100')} | {ms(r, 'unified_recall@10')} | {ms(r, 'beam_fidelity@10')} |")
    for label, r in (("Popularity", dig), ("Popularity, exclude history", res.get("DIG, exclude history") or [])):
        if not r:
            continue
        a(f"| {label} | {ms(r, 'popularity_recall@10')} | {ms(r, 'popularity_ndcg@10')} | "
          f"{ms(r, 'popularity_recall@50')} | {ms(r, 'popularity_ndcg@50')} | {ms(r, 'popularity_recall@100')} | "
          f"{ms(r, 'popularity_ndcg@100')} | – | – |")
    a(f"| DIG, exhaustive leaf search | {ms(dig, 'exhaustive_recall@10')} | {ms(dig, 'exhaustive_ndcg@10')} | "
      f"{ms(dig, 'exhaustive_recall@50')} | {ms(dig, 'exhaustive_ndcg@50')} | {ms(dig, 'exhaustive_recall@100')} | "
      f"{ms(dig, 'exhaustive_ndcg@100')} | – | – |")
    if "full_ranking_recall@10" in dig[0]:
        a(f"| DIG, full-corpus ranking (upper bound) | {ms(dig, 'full_ranking_recall@10')} | "
          f"{ms(dig, 'full_ranking_ndcg@10')} | {ms(dig, 'full_ranking_recall@50')} | {ms(dig, 'full_ranking_ndcg@50')} | "
          f"{ms(dig, 'full_ranking_recall@100')} | {ms(dig, 'full_ranking_ndcg@100')} | – | – |")
    peer_table, peer_section = peer_markdown(args)  # --peers: cornac baselines (benchmarks/baselines.py)
    for line in peer_table:
        a(line)
    a("")
    for line in peer_section:
        a(line)
    base = res["Base"]
    a("## Table 3: ranking AUC (Base = rank-only, `loss.recall_loss_weight=0`)")
    a("")
    a("| Method | Rank AUC |")
    a("|---|---|")
    a(f"| Base | {ms(base, 'rank_auc')} |")
    a(f"| DIG | {ms(dig, 'rank_auc')} |")
    a(f"| Δ | {mean(dig, 'rank_auc') - mean(base, 'rank_auc'):+.4f} |")
    a("")
    a("## Table 4: unified retrieval-ranking AUC gap (test exposures)")
    a("")
    a("| Method | Rank AUC | Recall AUC | Gap (Δ) |")
    a("|---|---|---|---|")
    for name in ("DIG", "stat-mean u2t", "w/o inference MLP_u2t"):
        r = res[name]
        a(f"| {name} | {ms(r, 'rank_auc')} | {ms(r, 'recall_auc')} | {ms(r, 'recall_rank_auc_gap')} |")
    a("")
    fixed = res["Fixed SID"]
    a("## Table 5 (Ablation 1): discriminative gradient, DIG (E2E) vs Fixed SID")
    a("")
    a("| Config | Rank AUC | Recall AUC | Recall@10 | collision rate |")
    a("|---|---|---|---|---|")
    for name, r in (("DIG (E2E)", dig), ("Fixed SID", fixed)):
        a(f"| {name} | {ms(r, 'rank_auc')} | {ms(r, 'recall_auc')} | {ms(r, 'recall@10')} | {ms(r, 'collision_rate')} |")
    fr = mean(fixed, "recall@10")
    rel = (mean(dig, "recall@10") / fr - 1.0) * 100 if fr > 0 else float("nan")
    a(f"| Δ | {mean(dig, 'rank_auc') - mean(fixed, 'rank_auc'):+.4f} | "
      f"{mean(dig, 'recall_auc') - mean(fixed, 'recall_auc'):+.4f} | {rel:+.1f}% | |")
    a("")
    a("SID codebook utilisation over the catalog (share of the K codes used at each layer; mean over seeds):")
    a("")
    a("| Config | " + " | ".join(f"layer {l + 1}" for l in range(len(dig[0].get("sid_utilization_per_layer") or []))) + " |")
    a("|---|" + "---|" * len(dig[0].get("sid_utilization_per_layer") or []))
    for name, r in (("DIG (E2E)", dig), ("Fixed SID", fixed)):
        per = [x.get("sid_utilization_per_layer") for x in r if x.get("sid_utilization_per_layer")]
        if per:
            a(f"| {name} | " + " | ".join(f"{sum(p[l] for p in per) / len(per):.3f}" for l in range(len(per[0]))) + " |")
    a("")
    a("## Table 6 (Ablation 2) and Ablations 3-4: R@10 / N@10")
    a("")
    a("| Config | R@10 | N@10 | ΔR@10 vs DIG |")
    a("|---|---|---|---|")
    d10 = mean(dig, "recall@10")
    for name in ("DIG", "w/o training-side u2i", "w/o inference MLP_u2t", "w/o both", "stat-mean u2t",
                 "last-layer supervision", "recall samples = exposure", "DIG, no dead-code restarts"):
        r = res[name]
        if not r:
            continue
        ref = d10 if len(r) == len(dig) else mean(dig[: len(r)], "recall@10")  # same seeds (run in seed order)
        delta = (mean(r, "recall@10") / ref - 1.0) * 100 if ref > 0 else float("nan")
        label = name if len(r) == len(dig) else f"{name} (first {len(r)} seed(s); Δ vs DIG on the same seeds)"
        a(f"| {label} | {ms(r, 'recall@10')} | {ms(r, 'ndcg@10')} | {'–' if name == 'DIG' else f'{delta:+.1f}%'} |")
    a("")
    lever_rows = [(name, res[name]) for name, _ in LEVERS if res.get(name)]
    if lever_rows:
        a("## Retrieval-quality levers (one lever set against the default recipe)")
        a("")
        a("Δ is against DIG on the same seeds (levers are run in seed order, usually seed 0 only).")
        a("")
        a("| Lever | overrides | R@10 | N@10 | recall AUC | rank AUC | collision rate | ΔR@10 vs DIG |")
        a("|---|---|---|---|---|---|---|---|")
        for name, r in lever_rows:
            ref = mean(dig[: len(r)], "recall@10")
            delta = (mean(r, "recall@10") / ref - 1.0) * 100 if ref > 0 else float("nan")
            over = " ".join(f"`{o}`" for o in dict(LEVERS)[name])
            label = name if len(r) == len(dig) else f"{name} ({len(r)} seed{'s' if len(r) > 1 else ''})"
            a(f"| {label} | {over} | {ms(r, 'recall@10')} | {ms(r, 'ndcg@10')} | {ms(r, 'recall_auc')} | "
              f"{ms(r, 'rank_auc')} | {ms(r, 'collision_rate')} | {delta:+.1f}% |")
        a("")
    a("## Paper claims")
    a("")
    claims = []
    d_r, f_r = mean(dig, "recall@10"), mean(fixed, "recall@10")
    claims.append(("DIG beats Fixed SID on Recall@10 (Ablation 1)", d_r > f_r,
                   f"{ms(dig, 'recall@10')} vs {ms(fixed, 'recall@10')}"))
    d_a, b_a = mean(dig, "rank_auc"), mean(base, "rank_auc")
    claims.append(("DIG rank AUC ≥ Base rank AUC (Table 3)", d_a >= b_a,
                   f"{ms(dig, 'rank_auc')} vs {ms(base, 'rank_auc')} (Δ {d_a - b_a:+.4f})"))
    gap = mean(dig, "recall_rank_auc_gap")
    claims.append(("recall-rank AUC gap is small (Table 4; we call abs(gap) ≤ 0.05 small)", abs(gap) <= 0.05,
                   f"gap {ms(dig, 'recall_rank_auc_gap')}"))
    p_r = mean(dig, "popularity_recall@10")
    claims.append(("DIG beam search beats the popularity baseline on Recall@10", d_r > p_r,
                   f"{ms(dig, 'recall@10')} vs {ms(dig, 'popularity_recall@10')}"))
    u_r = mean(dig, "unified_recall@10")
    claims.append(("DIG unified (beam + rank-path rerank) beats popularity on Recall@10", u_r > p_r,
                   f"{ms(dig, 'unified_recall@10')} vs {ms(dig, 'popularity_recall@10')}"))
    a("A claim \"holds\" when the means compare as stated; the ± values show whether the difference")
    a("is larger than the seed-to-seed spread.")
    a("")
    a("| Claim | Holds here? | Numbers (mean ± std) |")
    a("|---|---|---|")
    for text, ok, nums in claims:
        a(f"| {text} | {'yes' if ok else '**no**'} | {nums} |")
    a("")
    notes = getattr(args, "notes", None)
    if notes and Path(notes).exists():
        a("## Findings")
        a("")
        a(Path(notes).read_text().strip())
        a("")
    a("Per-seed raw metrics: the JSON file next to this one.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/ml100k.yaml")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--out", default=None, help="markdown output (default benchmarks/results/paper_tables_<config>.md)")
    p.add_argument("--work", default=None, help="run/eval cache dir (default runs/paper_tables/<config>)")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--max-users", type=int, default=0, help="evaluate a seeded subset of users (0: all)")
    p.add_argument("--exclude-history", action="store_true")
    p.add_argument("--only", default="", help="';'-separated variant names to run (default: all but the optional ones)")
    p.add_argument("--force", action="store_true", help="retrain and re-evaluate even if cached")
    p.add_argument("--render-only", action="store_true",
                   help="train nothing: render the tables from the cached evaluations (rows with fewer seeds say so)")
    p.add_argument("--notes", default=None, help="markdown appended as a 'Findings' section (analysis of the run)")
    p.add_argument("--peers", default=None, help="JSON written by benchmarks/baselines.py: add its cornac peers as "
                   "rows of the main table and a 'Peers' section (settings, train time)")
    p.add_argument("--eval-overrides", nargs="*", default=[], help="extra overrides for every `dig eval`")
    p.add_argument("overrides", nargs="*", help="extra training overrides for every variant (e.g. train.epochs=4)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stem = Path(args.config).stem
    out = Path(args.out or REPO / "benchmarks" / "results" / f"paper_tables_{stem}.md")
    work = Path(args.work or REPO / "runs" / "paper_tables" / stem).resolve()
    wanted = {s.strip() for s in args.only.split(";") if s.strip()}
    unknown = wanted - {v.name for v in VARIANTS}
    if unknown:
        p.error(f"--only: unknown variant(s) {sorted(unknown)}; valid: {'; '.join(v.name for v in VARIANTS)}")
    t0 = time.time()
    res: Dict[str, List[Dict[str, object]]] = {v.name: [] for v in VARIANTS}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for v in VARIANTS:
            if args.render_only:
                cached = work / f"seed{seed}" / f"{slug(v.name)}.json"
                if cached.exists():
                    res[v.name].append(json.loads(cached.read_text()))
                continue
            if (wanted or v.optional) and v.name not in wanted:
                cached = work / f"seed{seed}" / f"{slug(v.name)}.json"
                if v.optional and not wanted and cached.exists():  # shown if it was run, never trained here
                    res[v.name].append(json.loads(cached.read_text()))
                continue
            res[v.name].append(train_and_eval(args, v, seed, work))
    if wanted:
        logger.info("partial run (--only): not writing the tables")
        return 0
    command = "python benchmarks/paper_tables.py " + " ".join(
        a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:]))
    md = render(args, res, command, time.time() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "results": res}, indent=2))
    print(md)
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
