"""Issue 29, class 3: values read from files are type-checked like config values.

Every hostile value exits 2 with one line naming the file and the field (or row, or arch), or is
dropped with a warning that says what and why; none gives a traceback or a silent wrong answer.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from runhelpers import assert_one_line, cli


def _main(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process (real argument parsing and error handling, without a 4 s interpreter start)."""
    from nasfast.cli.app import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# --- DeepSpeed JSON ---------------------------------------------------------------------------------
DS_BAD = [
    ('{"gradient_clipping": "abc"}', 'gradient_clipping must be a finite number >= 0 or "auto", got "abc"'),
    ('{"gradient_clipping": NaN}', "gradient_clipping must be a finite number"),
    ('{"zero_optimization": {"stage": "two"}}', 'zero_optimization.stage must be an integer 0-3, got "two"'),
    ('{"zero_optimization": {"stage": true}}', "zero_optimization.stage must be an integer 0-3, got true"),
    ('{"zero_optimization": {"stage": 2.0}}', "zero_optimization.stage must be an integer 0-3, got 2.0"),
    ('{"zero_optimization": [2]}', "zero_optimization must be an object, got [2]"),
    ('{"zero_optimization": {"stage": 2, "contiguous_gradients": "yes"}}',
     'zero_optimization.contiguous_gradients must be true or false, got "yes"'),
    ('{"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}}', "zero_optimization.reduce_bucket_size must be an integer >= 0"),
    ('{"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "big"}}', "zero_optimization.stage3_prefetch_bucket_size"),
    ('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}', "zero_optimization.offload_optimizer.device"),
    ('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": "no"}}}',
     'zero_optimization.offload_optimizer.pin_memory must be true or false, got "no"'),
    ('{"zero_optimization": {"stage": 2, "overlap_com": true}}', "zero_optimization.overlap_com is not a DeepSpeed setting"),
    ('{"bf16": true}', "bf16 must be an object, got true"),
    ('{"bf16": {"enabled": "yes"}}', 'bf16.enabled must be true or false or "auto", got "yes"'),
    ('{"fp16": {"enabled": 1}}', "fp16.enabled must be true or false, got 1"),
    ('{"train_micro_batch_size_per_gpu": 4.0}', 'train_micro_batch_size_per_gpu must be an integer >= 1 or "auto", got 4.0'),
    ('{"gradient_accumulation_steps": "1"}', 'gradient_accumulation_steps must be an integer >= 1 or "auto", got "1"'),
    ('{"steps_per_print": "10"}', 'steps_per_print must be an integer >= 1, got "10"'),
    ('{"wall_clock_breakdown": "false"}', 'wall_clock_breakdown must be true or false, got "false"'),
]


@pytest.mark.parametrize("content,message", DS_BAD)
def test_deepspeed_json_values_are_checked(tmp_path, micro_yaml, capsys, monkeypatch, content, message):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    ds = tmp_path / "ds.json"
    ds.write_text(content)
    rc, _, err = _main(capsys, "pretrain", "--config", micro_yaml, "--out", tmp_path / "run", "--deepspeed", ds)
    line = assert_one_line(err, message)
    assert rc == 2 and str(ds) in line, line
    assert not (tmp_path / "run").exists()


def test_deepspeed_json_accepts_what_deepspeed_accepts(tmp_path, micro_config, monkeypatch):
    """The checks are not stricter than DeepSpeed where it is right: 5e8 sizes, nested offload, the shipped configs."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from nasfast.engines.deepspeed import load_ds_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8, "overlap_comm": False,
                                                    "offload_optimizer": {"device": "cpu", "pin_memory": True}},
                              "bf16": {"enabled": False}, "gradient_clipping": 1}))
    assert load_ds_config(str(ds), micro_config, 1)["zero_optimization"]["stage"] == 2
    for shipped in sorted((Path(__file__).resolve().parents[1] / "configs" / "ds").glob("*.json")):
        cfg = micro_config
        cfg.train.bf16 = "bf16" in shipped.name
        load_ds_config(str(shipped), cfg, 1)


@pytest.mark.slow
def test_deepspeed_bad_value_real_cli(tmp_path, micro_yaml):
    ds = tmp_path / "ds.json"
    ds.write_text('{"gradient_clipping": "abc", "zero_optimization": {"stage": 2}}')
    res = cli("pretrain", "--config", micro_yaml, "--out", tmp_path / "run", "--deepspeed", ds, env={"DS_ACCELERATOR": "cpu"})
    assert res.returncode == 2
    assert_one_line(res.stderr, f'nasfast pretrain: error: {ds}: gradient_clipping must be a finite number >= 0 or "auto", got "abc"')


# --- corpus text columns ------------------------------------------------------------------------------
def _lines(n: int = 400) -> list[str]:
    """Real text for a corpus big enough for the micro config's blocks."""
    import gzip
    from importlib import resources

    with gzip.open(resources.files("nasfast") / "corpus" / "austen.txt.gz", "rt", encoding="utf-8") as fh:
        return [l.strip() for l, _ in zip(fh, range(4 * n)) if l.strip()][:n]


def _prepare(capsys, micro_yaml, corpus: Path, out: Path) -> tuple[int, str, str]:
    return _main(capsys, "prepare-data", "--config", micro_yaml, "--set", f"data.corpus=[{corpus}]", "--out", out, "--no-progress")


@pytest.mark.parametrize("bad,shown", [(42, "'42' (a number)"), (["a", "b"], "(a list)"), ({"t": "x"}, "(an object)"),
                                       (True, "(a boolean)")])
def test_jsonl_text_field_that_is_not_text_is_refused(tmp_path, micro_yaml, capsys, bad, shown):
    corpus = tmp_path / "c.jsonl"
    rows = [{"text": l} for l in _lines(50)]
    rows[2]["text"] = bad
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = _prepare(capsys, micro_yaml, corpus, tmp_path / "prep")
    line = assert_one_line(err, f"{corpus} line 3: 'text' must be text, got")
    assert rc == 2 and shown in line, line
    assert not (tmp_path / "prep").exists()


@pytest.mark.slow
def test_parquet_numeric_text_column_is_refused_real_cli(tmp_path, micro_yaml):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": list(range(100)), "other": ["x"] * 100}), corpus)
    res = cli("prepare-data", "--config", micro_yaml, "--set", f"data.corpus=[{corpus}]", "--out", tmp_path / "prep", "--no-progress")
    assert res.returncode == 2
    assert_one_line(res.stderr, f"{corpus}: column 'text' holds int64, not text; set data.text_column")


def test_saved_dataset_list_column_is_refused(tmp_path, micro_yaml, capsys):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": [["a", "b"]] * 20}).save_to_disk(str(folder))
    rc, _, err = _prepare(capsys, micro_yaml, folder, tmp_path / "prep")
    assert rc == 2
    assert_one_line(err, f"{folder}: column 'text' holds list<item: string>, not text")


def test_a_few_null_texts_are_dropped_with_a_count(tmp_path, micro_yaml, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _lines(400)
    texts[5] = texts[77] = None
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts}), corpus)
    rc, out, err = _prepare(capsys, micro_yaml, corpus, tmp_path / "prep")
    assert rc == 0, err
    assert_one_line(err, f"corpus file {corpus}: skipped 2 row(s) whose 'text' is null")


# --- rank: estimates and ground truth ---------------------------------------------------------------
ARCHS = [f"mha:2|ffn:40|{op}" for op in ("mha:2", "mha:3", "ffn:40", "conv:3", "conv:5")]


def _results(tmp_path: Path, name: str, losses: list, accuracy=0.5, raw: dict | None = None) -> Path:
    rows = [{"arch": a, "loss": l, "accuracy": accuracy} for a, l in zip(ARCHS, losses)]
    for i, change in (raw or {}).items():
        rows[i].update(change)
        rows[i] = {k: v for k, v in rows[i].items() if v is not ...}
    path = tmp_path / name
    path.write_text(json.dumps({"results": rows}))  # NaN / Infinity as Python's json writes them (evaluate does)
    return path


@pytest.mark.slow
def test_rank_leaves_out_a_nan_estimate_with_a_warning_real_cli(tmp_path):
    est = _results(tmp_path, "estimates.json", [1.0, float("nan"), 3.0, 4.0, 5.0])
    truth = _results(tmp_path, "truth.json", [1.1, 2.1, 3.1, 4.1, 5.1])
    res = cli("rank", "--estimates", est, "--truth", truth)
    assert res.returncode == 0, res.stderr
    assert_one_line(res.stderr, f"{est}: left out 1 child(ren) whose loss is not a finite number (NaN or inf: "
                                f"diverged or not scored): {ARCHS[1]}")
    assert "n = 4 children" in res.stdout and "n/a" not in res.stdout
    assert len(json.loads((tmp_path / "rank.json").read_text())["children"]) == 4


def test_rank_refuses_when_too_few_finite_scores_remain(tmp_path, capsys):
    est = _results(tmp_path, "estimates.json", [1.0, float("nan"), float("inf"), 4.0, 5.0])
    truth = _results(tmp_path, "truth.json", [1.1, 2.1, 3.1, float("-inf"), 5.1])
    rc, _, err = _main(capsys, "rank", "--estimates", est, "--truth", truth)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 3 and "Traceback" not in err, err  # two warnings (what was left out), one error
    assert "left out 2 child(ren)" in lines[0] and "left out 1 child(ren)" in lines[1]
    assert "error: only 2 children with a finite loss" in lines[2] and "after leaving out 3 non-finite" in lines[2]


@pytest.mark.parametrize("change,message", [
    ({"loss": "abc"}, 'result 2 (mha:2|ffn:40|ffn:40): loss must be a number, got "abc"'),
    ({"loss": None}, "result 2 (mha:2|ffn:40|ffn:40): loss must be a number, got null"),
    ({"loss": True}, "result 2 (mha:2|ffn:40|ffn:40): loss must be a number, got true"),
    ({"accuracy": ...}, "result 2 (mha:2|ffn:40|ffn:40): accuracy must be a number, got null"),
    ({"accuracy": 1.5}, "result 2 (mha:2|ffn:40|ffn:40): accuracy must be a number in [0, 1], got 1.5"),
    ({"loss": -0.5}, "result 2 (mha:2|ffn:40|ffn:40): loss must be a number in [0, inf], got -0.5"),
    ({"arch": 7}, "result 2: arch must be an arch string, got 7"),
    ({"arch": ARCHS[0], "loss": 9.0}, f"result 2 ({ARCHS[0]}) is listed twice with different scores"),
])
def test_rank_refuses_a_malformed_ground_truth_value(tmp_path, capsys, change, message):
    est = _results(tmp_path, "estimates.json", [1.0, 2.0, 3.0, 4.0, 5.0])
    truth = _results(tmp_path, "truth.json", [1.1, 2.1, 3.1, 4.1, 5.1], raw={2: change})
    rc, _, err = _main(capsys, "rank", "--estimates", est, "--truth", truth)
    assert rc == 2
    assert_one_line(err, f"error: {truth}: {message}")


def test_rank_says_why_a_correlation_is_na(tmp_path, capsys):
    est = _results(tmp_path, "estimates.json", [2.0] * 5)
    truth = _results(tmp_path, "truth.json", [1.1, 2.1, 3.1, 4.1, 5.1])
    rc, out, _ = _main(capsys, "rank", "--estimates", est, "--truth", truth)
    assert rc == 0 and "Kendall tau  = n/a" in out
    assert "n/a: every estimate loss is the same (2): a rank correlation is undefined" in out


# --- cache entries (ground truth, search) ------------------------------------------------------------
def test_search_cache_entry_with_a_bad_score_is_refused(tmp_path):
    from nasfast.errors import UserError
    from nasfast.nas.search import ScoreCache

    cache = ScoreCache(tmp_path / "cache", {"p": 1})
    cache.put("a|b", {"score": 1.0, "loss": 1.0, "accuracy": 0.5})
    assert cache.get("a|b")["score"] == 1.0
    path = cache.path("a|b")
    record = json.loads(path.read_text())
    for scores, message in (({"score": "1.0"}, 'scores.score must be a number, got "1.0"'),
                            ({"score": 1.0, "accuracy": None}, "scores.accuracy must be a number, got null"),
                            ("oops", 'scores must be an object, got "oops"')):
        path.write_text(json.dumps({**record, "scores": scores}))
        with pytest.raises(UserError, match=f"^{re.escape(f'{path}: {message}')}$"):
            cache.get("a|b")
    path.write_text('{"arch": "a|b", "prot')
    with pytest.raises(UserError, match=r"is not valid JSON .*; remove it \(it is recomputed\)"):
        cache.get("a|b")


@pytest.fixture(scope="module")
def gt_run(tmp_path_factory):
    """A trained micro run, an arch list and its ground truth (2 steps per child)."""
    from conftest import MICRO_OVERRIDES

    from nasfast.config import load_config
    from nasfast.training.trainer import Trainer

    root = tmp_path_factory.mktemp("gt")
    cfg = load_config(None, MICRO_OVERRIDES + ["train.steps=2", "train.eval_every=2", "train.ckpt_every=2"])
    Trainer(cfg, root / "run", progress=False).train()
    (root / "archs.txt").write_text("mha:2|ffn:40|identity\nconv:3|mha:3|ffn:40\n")
    res = cli("ground-truth", "--run", root / "run", "--archs", root / "archs.txt", "--steps", "1", "--no-progress")
    assert res.returncode == 0, res.stderr
    return root


@pytest.mark.parametrize("change,message", [({"loss": "low"}, 'loss must be a number, got "low"'),
                                            ({"params": "1M"}, 'params must be an integer >= 0, got "1M"'),
                                            ({"diverged": "no"}, 'diverged must be true or false, got "no"')])
@pytest.mark.slow
def test_ground_truth_cache_entry_values_are_checked_real_cli(gt_run, tmp_path, change, message):
    out = tmp_path / "gt"
    shutil.copytree(gt_run / "run" / "ground_truth", out)
    entry = sorted((out / "cache").glob("*.json"))[0]
    entry.write_text(json.dumps({**json.loads(entry.read_text()), **change}))
    res = cli("ground-truth", "--run", gt_run / "run", "--archs", gt_run / "archs.txt", "--steps", "1", "--out", out,
              "--no-progress")
    assert res.returncode == 2
    assert_one_line(res.stderr, f"{entry}: {message}")
