"""Analysis tooling on a micro run: interference, ground truth (cache/resume), evaluate, rank, sample-archs."""
import json
import random

import pytest
import torch
from conftest import MICRO_OVERRIDES

from nasfast.analysis.archlist import read_archs, stratified_archs
from nasfast.analysis.groundtruth import cache_path, run_ground_truth
from nasfast.analysis.interference import check_request, child_pass, compare, cosine, sample_partner
from nasfast.analysis.ranking import kendall, rank_correlation, spearman
from nasfast.analysis.runs import open_run
from nasfast.cli.app import main
from nasfast.config import load_config, save_config
from nasfast.errors import UserError
from nasfast.space.evaluation import evaluate_child
from nasfast.space.searchspace import hamming
from nasfast.space.supernet import child_num_params
from nasfast.training.trainer import Trainer

ARCHS = ["mha:2|ffn:40|identity", "conv:3|mha:3|conv:5", "identity|identity|ffn:40", "ffn:40|conv:5|mha:2", "mha:3|identity|conv:3"]


@pytest.fixture(autouse=True)
def _one_thread():
    # On the shared 2-core machine, 2 OpenMP threads under load spin against each other (~50x slower).
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("analysis")
    cfg = load_config(None, MICRO_OVERRIDES + ["train.eval_every=6", "train.ckpt_every=6"])
    Trainer(cfg, root / "run", progress=False).train()
    save_config(cfg, root / "micro.yaml")
    (root / "archs.txt").write_text("\n".join(ARCHS) + "\n")
    return root


@pytest.fixture(scope="module")
def run(micro_run):
    return open_run(micro_run / "run")


def expect_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


# --- similarity computations -------------------------------------------------------------------
def test_cosine_exact_cases():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 1000, 12345):
        a = torch.randn(n, generator=g)
        assert cosine(a, a.clone()) == 1.0
        assert cosine(a, -a) == -1.0
        assert cosine(a, 3.0 * a) == pytest.approx(1.0, abs=1e-12)  # 3a rounds in fp32
    assert cosine(torch.zeros(4), torch.ones(4)) is None
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == 0.0


def test_partner_keeps_operator_and_differs_in_exactly_d_layers(micro_space):
    rng = random.Random(0)
    for _ in range(200):
        base = micro_space.random_arch(rng)
        layer, d = rng.randrange(3), rng.randint(1, 2)
        partner, changed = sample_partner(micro_space, base, layer, d, rng)
        assert partner[layer] == base[layer] and hamming(base, partner) == d
        assert layer not in changed and [l for l in range(3) if partner[l] != base[l]] == changed


def test_similarities_known_answers(run):
    model = run.supernet()
    batches = run.dev_batches(1)
    names = run.space.names
    ffn, mha, conv, ident = names.index("ffn:40"), names.index("mha:2"), names.index("conv:3"), names.index("identity")
    base = (mha, ffn, conv)
    one = child_pass(model, base, 1, batches, run.device)
    # the same child computed twice: everything identical, cos exactly 1
    assert compare(one, child_pass(model, base, 1, batches, run.device)) == {"grad_cos": 1.0, "input_sim": 1.0, "output_sim": 1.0}
    # differing only AFTER the operator: same input and output, different gradient
    after = compare(one, child_pass(model, (mha, ffn, ident), 1, batches, run.device))
    assert after["input_sim"] == 1.0 and after["output_sim"] == 1.0 and after["grad_cos"] < 1.0
    # differing BEFORE the operator: its input changes
    before = compare(one, child_pass(model, (conv, ffn, conv), 1, batches, run.device))
    assert before["input_sim"] < 1.0 and before["output_sim"] < 1.0 and before["grad_cos"] < 1.0
    # at layer 0 the input is the embedding: identical for every child
    first = compare(child_pass(model, (ffn, mha, conv), 0, batches, run.device), child_pass(model, (ffn, conv, ident), 0, batches, run.device))
    assert first["input_sim"] == 1.0 and first["output_sim"] == 1.0
    # the gradient is the one autograd gives for the child's token-weighted loss
    op = model.layers[1][ffn]
    model.zero_grad(set_to_none=True)
    b = batches[0]
    with torch.enable_grad():
        model(b["input_ids"], b["attention_mask"], base, b["labels"]).loss.backward()
    expected = torch.cat([p.grad.flatten() for p in op.parameters()]).double()
    torch.testing.assert_close(one.grad, expected, rtol=1e-5, atol=1e-9)
    model.zero_grad(set_to_none=True)


def test_check_request(micro_space):
    assert check_request(micro_space, 1, "ffn:40", None) == (micro_space.names.index("ffn:40"), 2)
    with pytest.raises(UserError, match="larger than the 2 other layers"):
        check_request(micro_space, 1, "ffn:40", 3)
    with pytest.raises(UserError, match="no parameters"):
        check_request(micro_space, 1, "identity", 1)
    with pytest.raises(UserError, match="out of range"):
        check_request(micro_space, 3, "ffn:40", 1)


# --- correlation wrappers ----------------------------------------------------------------------
def test_correlation_wrappers_hand_made():
    x = [1, 2, 3, 4, 5]
    y = [1, 3, 2, 5, 4]  # two discordant pairs of 10; sum of squared rank differences 4
    assert kendall(x, y)["tau"] == pytest.approx(0.6)
    assert spearman(x, y)["rho"] == pytest.approx(0.8)
    assert kendall(x, x)["tau"] == pytest.approx(1.0) and spearman(x, x[::-1])["rho"] == pytest.approx(-1.0)
    assert 0 < kendall(x, y)["p"] < 1 and 0 < spearman(x, y)["p"] < 1
    assert spearman(x, [2.0] * 5)["rho"] is None  # undefined, JSON-safe


def test_rank_correlation_matches_by_arch_id():
    est = {"results": [{"arch": a, "loss": l, "accuracy": 0.0} for a, l in zip("abcde", [1.0, 2.0, 3.0, 4.0, 9.0])]}
    true = {"results": [{"arch": a, "loss": l, "accuracy": 0.0} for a, l in zip("edcbf", [50.0, 40.0, 30.0, 20.0, 0.0])]}
    res = rank_correlation(est, true)
    assert [c["arch"] for c in res["children"]] == ["b", "c", "d", "e"]
    assert res["kendall"]["tau"] == pytest.approx(1.0) and res["spearman"]["rho"] == pytest.approx(1.0)
    assert res["only_in_estimates"] == ["a"] and res["only_in_truth"] == ["f"]
    with pytest.raises(UserError, match="only 1 children"):
        rank_correlation(est, {"results": true["results"][:1]})


# --- arch lists --------------------------------------------------------------------------------
def test_sample_archs_command(micro_run, micro_space, tmp_path, capsys):
    out = tmp_path / "a.txt"
    assert main(["sample-archs", "--config", str(micro_run / "micro.yaml"), "--n", "8", "--seed", "3", "--out", str(out)]) == 0
    archs = read_archs(out, micro_space)
    assert len(archs) == 8 == len(out.read_text().splitlines())
    params = [child_num_params(micro_space, a, 400, 32) for a in archs]
    assert params == sorted(params) and params[-1] > params[0]
    again = tmp_path / "b.txt"
    main(["sample-archs", "--config", str(micro_run / "micro.yaml"), "--n", "8", "--seed", "3", "--out", str(again)])
    assert again.read_text() == out.read_text()
    # one child per parameter-count quantile bin of the whole (small) space
    count = lambda a: child_num_params(micro_space, a, 400, 32)  # noqa: E731
    assert len(set(stratified_archs(micro_space, micro_space.size, 0, count))) == micro_space.size


# --- commands end to end -----------------------------------------------------------------------
def test_evaluate_ground_truth_rank_end_to_end(micro_run, run, capsys):
    r = micro_run / "run"
    archs = str(micro_run / "archs.txt")
    assert main(["evaluate", "--run", str(r), "--archs", archs, "--dev-batches", "2", "--no-progress"]) == 0
    est = json.loads((r / "estimates.json").read_text())
    assert [x["arch"] for x in est["results"]] == ARCHS and est["kind"] == "estimates"
    direct = evaluate_child(run.supernet(), run.space.parse(ARCHS[1]), run.dev_batches(2), run.device)
    assert est["results"][1]["loss"] == pytest.approx(direct["loss"], rel=1e-6)

    gt = micro_run / "gt"
    assert main(["ground-truth", "--run", str(r), "--archs", archs, "--steps", "3", "--dev-batches", "2",
                 "--out", str(gt), "--no-progress"]) == 0
    assert "5 trained, 0 cached" in capsys.readouterr().out
    truth = json.loads((gt / "ground_truth.json").read_text())
    assert truth["complete"] and [x["arch"] for x in truth["results"]] == ARCHS and truth["dev"] == est["dev"]
    assert all(x["steps"] == 3 and x["loss"] > 0 for x in truth["results"])
    # a replicate seed: its own protocol (seed pinned), different losses, same dev set
    assert main(["ground-truth", "--run", str(r), "--archs", archs, "--steps", "3", "--dev-batches", "2", "--seed", "7",
                 "--out", str(micro_run / "gt7"), "--no-progress"]) == 0
    rep = json.loads((micro_run / "gt7" / "ground_truth.json").read_text())
    assert rep["protocol"]["train"]["seed"] == 7 and truth["protocol"]["train"]["seed"] != 7 and rep["dev"] == truth["dev"]
    assert [x["loss"] for x in rep["results"]] != [x["loss"] for x in truth["results"]]
    capsys.readouterr()

    assert main(["rank", "--estimates", str(r / "estimates.json"), "--truth", str(gt), "--out", str(micro_run / "rank")]) == 0
    printed = capsys.readouterr().out
    assert "Kendall tau" in printed and "Spearman rho" in printed
    res = json.loads((micro_run / "rank" / "rank.json").read_text())
    assert res["kendall"]["n"] == 5 and -1 <= res["kendall"]["tau"] <= 1
    assert (micro_run / "rank" / "rank_scatter.png").stat().st_size > 1000


def test_ground_truth_cache_and_resume(run, tmp_path):
    archs = [run.space.parse(a) for a in ARCHS]
    out = tmp_path / "gt"
    kw = dict(steps=2, dev_batches=1, progress=False)
    first = run_ground_truth(run, archs, out, limit=2, **kw)
    assert first["computed"] == ARCHS[:2] and first["remaining"] == ARCHS[2:] and not first["complete"]

    class Interrupt(Exception):
        pass

    def stop(arch_id, record):
        raise Interrupt  # killed right after the third child's cache entry is written

    with pytest.raises(Interrupt):
        run_ground_truth(run, archs, out, on_trained=stop, **kw)
    assert sorted(p.name for p in (out / "cache").iterdir()) == sorted(cache_path(out, a).name for a in ARCHS[:3])
    seen = []
    rest = run_ground_truth(run, archs, out, on_trained=lambda a, r: seen.append(a), **kw)
    assert seen == rest["computed"] == ARCHS[3:] and rest["cached"] == ARCHS[:3] and rest["complete"]
    again = run_ground_truth(run, archs, out, **kw)
    assert again["computed"] == [] and again["results"] == rest["results"]
    # the cached result is what an uninterrupted computation gives (training is deterministic)
    fresh = run_ground_truth(run, archs[2:3], tmp_path / "fresh", **kw)
    assert fresh["results"][0]["loss"] == rest["results"][2]["loss"]
    with pytest.raises(UserError, match="different protocol"):
        run_ground_truth(run, archs, out, steps=3, dev_batches=1, progress=False)


def test_interference_command(micro_run, capsys):
    out = micro_run / "interf"
    argv = ["interference", "--run", str(micro_run / "run"), "--layer", "1", "--candidate", "ffn:40", "--bases", "2",
            "--partners-per-distance", "2", "--batches", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Spearman(d, grad cos)" in printed and "Spearman(input sim, grad cos)" in printed
    report = json.loads((out / "interference.json").read_text())
    assert len(report["pairs"]) == 2 * 2 * 2 and [r["distance"] for r in report["by_distance"]] == [1, 2]
    assert all(r["count"] == 4 and r["grad_cos_std"] >= 0 for r in report["by_distance"])
    for p in report["pairs"]:
        assert p["partner"].split("|")[1] == "ffn:40" == p["base"].split("|")[1]
        assert p["changed_before"] + p["changed_after"] == p["distance"] and -1 <= p["grad_cos"] <= 1
        if p["changed_before"] == 0:
            assert p["input_sim"] == 1.0 == p["output_sim"]
    assert {"distance_vs_grad_cos", "input_sim_vs_grad_cos", "output_sim_vs_grad_cos", "input_sim_vs_grad_cos_given_d",
            "output_sim_vs_grad_cos_by_distance"} <= set(report["correlations"])
    assert (out / "grad_cos_vs_distance.png").is_file() and (out / "grad_cos_vs_similarity.png").is_file()
    # the same seed samples the same pairs
    assert main(argv + ["--out", str(micro_run / "interf2")]) == 0
    assert json.loads((micro_run / "interf2" / "interference.json").read_text())["pairs"] == report["pairs"]


def test_bad_inputs_exit_2_with_one_line(micro_run, tmp_path, capsys):
    r, archs = str(micro_run / "run"), str(micro_run / "archs.txt")
    missing = str(tmp_path / "nope")
    expect_error(capsys, ["interference", "--run", missing, "--layer", "0", "--candidate", "ffn:40"], "run folder not found")
    expect_error(capsys, ["evaluate", "--run", missing, "--archs", archs], "run folder not found")
    expect_error(capsys, ["ground-truth", "--run", missing, "--archs", archs], "run folder not found")
    expect_error(capsys, ["interference", "--run", r, "--layer", "1", "--candidate", "ffn:40", "--distances", "5"], "--distances 5 is larger")
    expect_error(capsys, ["interference", "--run", r, "--layer", "7", "--candidate", "ffn:40"], "--layer 7")
    expect_error(capsys, ["interference", "--run", r, "--layer", "0", "--candidate", "ffn:99"], "ffn:99")
    bad = tmp_path / "bad.txt"
    bad.write_text("mha:2|ffn:40|identity\nmha:2|ffn:99|identity\n")
    expect_error(capsys, ["evaluate", "--run", r, "--archs", str(bad)], "bad.txt:2")
    expect_error(capsys, ["ground-truth", "--run", r, "--archs", str(bad)], "ffn:99")
    expect_error(capsys, ["evaluate", "--run", r, "--archs", missing], "arch list not found")
    expect_error(capsys, ["rank", "--estimates", missing, "--truth", missing], "results file not found")
    expect_error(capsys, ["sample-archs", "--config", str(micro_run / "micro.yaml"), "--n", "999", "--out", str(tmp_path / "a")],
                 "more than the 216 children")


def test_observation2_controls_for_distance():
    """Similarity and grad cos both fall with d but are unrelated within each d: pooled Spearman is
    strongly positive, the partial one given d is not; a real within-d relation is detected."""
    import numpy as np

    from nasfast.analysis.interference import correlations

    rng = np.random.default_rng()
    pairs = []
    for d in (1, 2, 3):
        for _ in range(40):
            sim, noise = rng.normal(-d, 0.3), rng.normal(-d, 0.3)
            pairs.append({"distance": d, "input_sim": float(sim), "output_sim": float(sim + rng.normal(0, 0.05)),
                          "grad_cos": float(noise)})
    c = correlations(pairs)
    assert c["input_sim_vs_grad_cos"]["rho"] > 0.6 and c["input_sim_vs_grad_cos"]["p"] < 1e-6
    assert abs(c["input_sim_vs_grad_cos_given_d"]["rho"]) < 0.3
    assert all(abs(v["rho"]) < 0.5 for v in c["input_sim_vs_grad_cos_by_distance"].values())
    for p in pairs:  # now make grad cos follow similarity within each d
        p["grad_cos"] = p["input_sim"] + float(rng.normal(0, 0.05))
    c = correlations(pairs)
    assert c["input_sim_vs_grad_cos_given_d"]["rho"] > 0.8 and c["input_sim_vs_grad_cos_given_d"]["p"] < 1e-6
