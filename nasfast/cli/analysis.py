"""Analysis commands (interference, ground truth, evaluate, rank, sample-archs): parsers and handlers.

Every handler checks its input before any heavy work and raises UserError (one line, exit 2).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nasfast.cli.common import command, quiet_libraries
from nasfast.errors import UserError
from nasfast.files import check_output_dir, check_output_file


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to the ``nasfast`` parser."""
    p = sub.add_parser("interference", help="gradient interference on a shared operator vs child distance",
                       description="Measure interference on the shared operator (--layer, --candidate) between base "
                                   "children and partners differing in exactly d other layers (docs/protocols.md §4).")
    p.add_argument("--run", required=True, help="run folder (config.yaml, data/, checkpoints/last.pt)")
    p.add_argument("--layer", required=True, type=int, help="layer of the shared operator, 0-based")
    p.add_argument("--candidate", required=True, help="candidate of the shared operator, e.g. ffn:512")
    p.add_argument("--distances", type=int, help="largest distance D (default: layers - 1)")
    p.add_argument("--bases", type=int, default=4, help="base children (default 4)")
    p.add_argument("--partners-per-distance", type=int, default=4, help="partners per base and distance (default 4)")
    p.add_argument("--batches", type=int, default=2, help="fixed dev batches per child (default 2)")
    p.add_argument("--seed", type=int, default=0, help="pair sampling seed")
    p.add_argument("--out", help="output folder (default RUN/interference/layer<I>-<candidate>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("ground-truth", help="train children from scratch for rank correlation (cached by arch)",
                       description="Train each child of --archs from scratch as a standalone model with the run's "
                                   "data and training settings; cached by arch id so reruns resume.")
    p.add_argument("--run", required=True, help="run folder whose config and data folder define the protocol")
    p.add_argument("--archs", required=True, help="arch list: one arch string per line")
    p.add_argument("--steps", type=int, help="training steps per child (default: the run's train.steps)")
    p.add_argument("--dev-batches", type=int, help="dev batches to score on (default: every dev block)")
    p.add_argument("--limit", type=int, help="train at most this many uncached children in this call")
    p.add_argument("--seed", type=int, help="training seed of the children: initialisation, batch order, masking "
                                            "(default: the run's train.seed; use one --out per seed for replicates)")
    p.add_argument("--out", help="output folder (default RUN/ground_truth)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("evaluate", help="inherited-weight dev loss/accuracy of children",
                       description="Dev MLM loss and accuracy of each child of --archs with the run's supernet weights.")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--archs", required=True, help="arch list: one arch string per line")
    p.add_argument("--dev-batches", type=int, help="dev batches to score on (default: every dev block)")
    p.add_argument("--out", help="output JSON (default RUN/estimates.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("rank", help="Kendall tau / Spearman rho of estimates vs ground truth",
                       description="Rank correlation between inherited-weight estimates and ground truth, by arch id.")
    p.add_argument("--estimates", required=True, help="JSON from nasfast evaluate")
    p.add_argument("--truth", required=True, help="ground_truth.json from nasfast ground-truth (or its folder)")
    p.add_argument("--metric", default="loss", choices=("loss", "accuracy"), help="score to rank by (default loss)")
    p.add_argument("--out", help="output folder for rank.json and rank_scatter.png (default: the estimates' folder)")
    p.add_argument("--replicate", action="append", metavar="TRUTH",
                   help="ground truth of the same children at another seed (repeatable): their Kendall tau with "
                        "--truth is the replicate ceiling, in rank.json and on the plot")

    p = sub.add_parser("sample-archs", help="a seeded arch list spread over parameter counts",
                       description="Write N distinct children, one per parameter-count quantile bin, seeded.")
    p.add_argument("--config", required=True, help="YAML run config (defines the space)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--n", required=True, type=int, help="number of children")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", required=True, help="output arch list file")


@command("interference")
def cmd_interference(args: argparse.Namespace) -> int:
    from nasfast.analysis import interference
    from nasfast.analysis.runs import open_run

    run = open_run(args.run)
    interference.check_request(run.space, args.layer, args.candidate, args.distances, args.bases,
                               args.partners_per_distance)  # before loading weights
    if args.batches < 1:
        raise UserError(f"--batches must be >= 1, got {args.batches}")
    safe = args.candidate.replace(":", "")
    out = check_output_dir(args.out if args.out else run.path / "interference" / f"layer{args.layer}-{safe}", "--out")
    quiet_libraries()
    model = run.supernet()
    report = interference.measure(
        model, run.space, args.layer, args.candidate, run.dev_batches(args.batches), run.device,
        distances=args.distances, bases=args.bases, partners_per_distance=args.partners_per_distance,
        seed=args.seed, progress=not args.no_progress,
    )
    report["run"] = str(run.path)
    paths = interference.write_report(report, out)
    print(interference.format_report(report))
    print(f"-> {paths['json']}, {paths['distance_png'].name}, {paths['similarity_png'].name}")
    return 0


def _read_archs(run, path):
    from nasfast.analysis.archlist import read_archs

    return read_archs(path, run.space)


@command("ground-truth")
def cmd_ground_truth(args: argparse.Namespace) -> int:
    from nasfast.analysis.groundtruth import run_ground_truth
    from nasfast.analysis.ranking import fmt
    from nasfast.analysis.runs import open_run

    run = open_run(args.run)
    if args.seed is not None:
        run = run.with_seed(args.seed)
    archs = _read_archs(run, args.archs)
    out = check_output_dir(args.out if args.out else run.path / "ground_truth", "--out")
    quiet_libraries()
    res = run_ground_truth(run, archs, out, steps=args.steps, dev_batches=args.dev_batches, limit=args.limit,
                           progress=not args.no_progress)
    print(f"{len(res['computed'])} trained, {len(res['cached'])} cached, {len(res['remaining'])} remaining "
          f"({res['protocol']['train']['steps']} steps each) -> {out / 'ground_truth.json'}")
    for r in res["results"]:
        print(f"  loss {fmt(r['loss'])}  acc {fmt(r['accuracy'])}  params {r['params']:>10,}  {r['arch']}")
    if res["diverged"]:
        print(f"  diverged (left out): {', '.join(res['diverged'])}")
    return 0


@command("evaluate")
def cmd_evaluate(args: argparse.Namespace) -> int:
    from nasfast.analysis.estimates import inherited_estimates
    from nasfast.analysis.runs import open_run
    from nasfast.files import atomic_write_text

    run = open_run(args.run)
    archs = _read_archs(run, args.archs)
    out = check_output_file(args.out if args.out else run.path / "estimates.json", "--out")
    quiet_libraries()
    res = inherited_estimates(run, archs, args.dev_batches, progress=not args.no_progress)
    atomic_write_text(out, json.dumps(res, indent=2))
    for r in res["results"]:
        print(f"  loss {r['loss']:.3f}  acc {r['accuracy']:.3f}  params {r['params']:>10,}  {r['arch']}")
    print(f"{len(res['results'])} children -> {out}")
    return 0


@command("rank")
def cmd_rank(args: argparse.Namespace) -> int:
    from nasfast.analysis import plots
    from nasfast.analysis.ranking import check_same_dev, fmt, load_results, rank_correlation, replicate_ceiling
    from nasfast.files import atomic_write_text

    estimates, truth = load_results(args.estimates), load_results(args.truth)
    replicates = [load_results(r) for r in args.replicate or []]
    out = check_output_dir(args.out if args.out else Path(args.estimates).parent, "--out")
    res = rank_correlation(estimates, truth, args.metric)
    res["estimates"], res["truth"] = str(args.estimates), str(args.truth)
    if replicates:
        res["replicate_ceiling"] = {**replicate_ceiling([truth, *replicates], args.metric),
                                    "replicates": [str(r) for r in args.replicate]}
    ceiling = res.get("replicate_ceiling", {}).get("tau")
    check_same_dev(res)
    atomic_write_text(out / "rank.json", json.dumps(res, indent=2))
    k, s = res["kendall"], res["spearman"]
    title = f"{args.metric}: Kendall τ = {fmt(k['tau'])}, Spearman ρ = {fmt(s['rho'])} (n = {k['n']})"
    children = res["children"]
    plots.save_figure(plots.rank_figure([c["truth"] for c in children], [c["estimate"] for c in children],
                                        args.metric, title, ceiling), out / "rank_scatter.png")
    print(f"Kendall tau  = {fmt(k['tau'], '+.3f')}  p = {fmt(k['p'], '.3g')}")
    print(f"Spearman rho = {fmt(s['rho'], '+.3f')}  p = {fmt(s['p'], '.3g')}")
    if replicates:
        print(f"replicate ceiling (Kendall tau between ground-truth seeds) = {fmt(ceiling, '+.3f')}")
    if res["undefined"]:  # the reason for an n/a above
        print(f"  n/a: {res['undefined']}")
    print(f"n = {k['n']} children matched by arch id ({len(res['only_in_estimates'])} only in estimates, "
          f"{len(res['only_in_truth'])} only in truth) -> {out / 'rank.json'}, rank_scatter.png")
    return 0


@command("sample-archs")
def cmd_sample_archs(args: argparse.Namespace) -> int:
    from nasfast.analysis.archlist import stratified_archs, write_archs
    from nasfast.space.checks import build_space, load_run_config
    from nasfast.space.supernet import child_num_params

    cfg = load_run_config(args.config, args.set)
    check_output_file(args.out, "--out")
    space = build_space(cfg)
    params = lambda a: child_num_params(space, a, cfg.data.vocab_size, cfg.model.max_len)  # noqa: E731
    archs = stratified_archs(space, args.n, args.seed, params)
    write_archs(args.out, space, archs)
    counts = [params(a) for a in archs]
    print(f"{len(archs)} children, {min(counts):,} .. {max(counts):,} params -> {args.out}")
    return 0
