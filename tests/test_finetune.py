"""Fine-tuning: task files (detection, labels, splits, bad inputs), the step-budget schedule, the majority-label
warning, runs that beat chance, resume, BERT folders."""
import gzip
import json
from pathlib import Path

import pytest
import torch
from conftest import MICRO_OVERRIDES

import nasfast
from nasfast.cli.app import main
from nasfast.config import load_config
from nasfast.errors import UserError
from nasfast.nas.finetune import FinetuneSettings, load_task, schedule
from nasfast.training.trainer import Trainer


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A micro supernet's child exported as a transformers folder."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finetune")
    Trainer(load_config(None, MICRO_OVERRIDES), root / "run", progress=False).train()
    assert main(["export", "--run", str(root / "run"), "--arch", "mha:2|conv:3|ffn:40", "--out", str(root / "model")]) == 0
    return root / "model"


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def sentiment_slice(folder, split, n):
    path = Path(nasfast.__file__).parent / "tasks" / f"mr_sentiment_{split}.tsv.gz"
    return write(folder / f"{split}.tsv", gzip.decompress(path.read_bytes()).decode().splitlines()[: n + 1])


def test_embedded_tasks():
    s = load_task("sentiment")
    assert s.kind == "single" and s.label_names == ["0", "1"]
    assert (len(s.train.labels), len(s.dev.labels), len(s.test.labels)) == (8454, 1057, 1057)
    w = load_task("wic")
    assert w.kind == "pair" and (len(w.train.labels), len(w.dev.labels), len(w.test.labels)) == (6628, 878, 878)
    assert all(len(t) == 2 and t[0] and t[1] for t in w.train.texts[:50])  # sentence1/sentence2, lemma/pos ignored


def test_user_tsv_pair_detection_string_labels_and_seeded_split(tmp_path):
    rows = ["id\tsentence2\tlabel\tsentence1\tsource"] + [f"{i}\tsecond {i}\t{['yes', 'no', 'maybe'][i % 3]}\tfirst {i}\tx" for i in range(60)]
    task = load_task(str(write(tmp_path / "t.tsv", rows)), split_seed=3)
    assert task.kind == "pair" and task.label_names == ["maybe", "no", "yes"]  # sorted strings
    assert (len(task.train.labels), len(task.dev.labels), len(task.test.labels)) == (48, 6, 6)
    assert task.train.texts[0][0].startswith("first") and task.train.texts[0][1].startswith("second")
    seen = [t for s in (task.train, task.dev, task.test) for t in s.texts]
    assert len(set(seen)) == 60  # disjoint splits covering every example
    again = load_task(str(tmp_path / "t.tsv"), split_seed=3)
    assert again.dev.texts == task.dev.texts and load_task(str(tmp_path / "t.tsv"), split_seed=4).dev.texts != task.dev.texts
    nums = load_task(str(write(tmp_path / "n.tsv", ["label\tsentence"] + [f"{[2, 10, 1][i % 3]}\ts {i}" for i in range(40)])))
    assert nums.label_names == ["1", "2", "10"]  # integer labels sort numerically


def test_bad_task_files_exit_2_with_one_line(exported, tmp_path, capsys):
    good = write(tmp_path / "good.tsv", ["label\tsentence"] + [f"{i % 2}\tsentence {i}" for i in range(40)])
    (tmp_path / "latin1.tsv").write_bytes("label\tsentence\n1\tcaf\xe9\n".encode("latin-1"))
    cases = {
        "missing label column": (write(tmp_path / "a.tsv", ["text\tsentence", "x\ty"]), [], "no 'label' column"),
        "missing sentence column": (write(tmp_path / "b.tsv", ["label\ttext", "1\ty"]), [], "needs a 'sentence' column"),
        "empty": (write(tmp_path / "c.tsv", [""]), [], "is empty"),
        "header only": (write(tmp_path / "d.tsv", ["label\tsentence"]), [], "no examples"),
        "non-UTF-8": (tmp_path / "latin1.tsv", [], "not UTF-8"),
        "ragged row": (write(tmp_path / "e.tsv", ["label\tsentence", "1\ta", "0\tb\textra"]), [], "3 fields, the header has 2"),
        "one label": (write(tmp_path / "f.tsv", ["label\tsentence"] + [f"1\ts{i}" for i in range(40)]), [], "single label"),
        "unknown dev label": (good, ["--dev", str(write(tmp_path / "g.tsv", ["label\tsentence", "2\tnew"])),
                                     "--test", str(good)], "label '2' does not occur"),
        "pair dev for single task": (good, ["--dev", str(write(tmp_path / "h.tsv", ["label\tsentence1\tsentence2", "1\ta\tb"]))], "pair"),
        "missing file": (tmp_path / "nope.tsv", [], "not found"),
        "unknown task name": ("glue", [], "--task must be"),
    }
    for name, (task, extra, needle) in cases.items():
        rc = main(["finetune", "--model", str(exported), "--task", str(task), *extra, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0], (name, err)
    assert main(["finetune", "--model", str(tmp_path), "--task", str(good), "--out", str(tmp_path / "o")]) == 2
    assert "not a local model folder" in capsys.readouterr().err
    assert main(["finetune", "--model", str(exported), "--task", str(good), "--max-len", "999", "--out", str(tmp_path / "o")]) == 2
    assert "position embeddings" in capsys.readouterr().err
    with pytest.raises(UserError, match="own splits"):
        load_task("sentiment", dev=str(good))


@pytest.mark.slow
def test_finetune_beats_chance_on_sentiment_and_resumes(exported, tmp_path, capsys):
    train, dev, test = sentiment_slice(tmp_path, "train", 4000), sentiment_slice(tmp_path, "dev", 1057), sentiment_slice(tmp_path, "test", 1057)
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(exported), "--task", str(train), "--dev", str(dev), "--test", str(test), "--epochs", "4",
            "--lr", "3e-3", "--max-len", "32", "--seeds", "0", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out.splitlines()  # no raw Trainer log dicts: one line per dev evaluation
    assert not [l for l in stdout if l.lstrip().startswith("{")], stdout
    assert len([l for l in stdout if l.startswith("seed 0 step ") and ": dev accuracy " in l]) == 4, stdout
    res = json.loads((out / "results.json").read_text())
    majority = res["majority_baseline"]["test"]  # 0.528: the test labels are not balanced
    assert res["test_accuracy"]["mean"] > majority + 0.03 and res["dev_accuracy"]["mean"] > 0.56, res
    seed = res["seeds"][0]
    assert seed["dev_accuracy"] == max(e["dev_accuracy"] for e in seed["evals"])  # the best dev epoch was kept
    assert [e["epoch"] for e in seed["evals"]] == [1, 2, 3, 4] and res["majority_warning"] is None  # --epochs: one per epoch
    assert json.loads((out / "labels.json").read_text())["id2label"] == ["0", "1"]
    from transformers import AutoModelForSequenceClassification

    tuned = AutoModelForSequenceClassification.from_pretrained(str(out / "model"))
    assert tuned.config.id2label == {0: "0", 1: "1"} and type(tuned).__name__ == "NasfastForSequenceClassification"
    assert main(argv) == 0  # rerun: the seed's result comes from OUT/seeds, nothing is trained
    assert json.loads((out / "results.json").read_text())["seeds"] == res["seeds"]
    capsys.readouterr()
    assert main(argv[:-3] + ["--lr", "1e-3", "--out", str(out), "--no-progress"]) == 2  # other settings, same OUT
    assert "another model, task or settings" in capsys.readouterr().err
    cached = out / "seeds" / "seed0.json"  # a damaged or hand-edited seed cache: one line naming it, not a traceback
    for damaged, needle in (("{not json", "is not valid JSON"),
                            (cached.read_text().replace('"dev_accuracy": ', '"dev_accuracy": "high", "x": '),
                             'dev_accuracy must be a finite number in [0, 1], got "high"')):
        cached.write_text(damaged)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and str(cached) in err[0], err


def test_a_plain_bert_folder_fine_tunes_with_the_same_command(exported, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=48, max_position_embeddings=32))
    bert.save_pretrained(str(tmp_path / "bert"))
    tokenizer.save_pretrained(str(tmp_path / "bert"))
    rows = ["label\tsentence1\tsentence2"] + [f"{['same', 'different'][i % 2]}\tthe cat {i}\ta dog {i}" for i in range(50)]
    task = write(tmp_path / "pairs.tsv", rows)
    assert main(["finetune", "--model", str(tmp_path / "bert"), "--task", str(task), "--epochs", "1", "--max-len", "16",
                 "--seeds", "0", "1", "--out", str(tmp_path / "ft"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert res["task_kind"] == "pair" and res["labels"] == ["different", "same"] and len(res["seeds"]) == 2
    assert res["examples"] == {"train": 40, "dev": 5, "test": 5}
    assert json.loads((tmp_path / "ft" / "model" / "config.json").read_text())["model_type"] == "bert"


def test_schedule_is_a_step_budget_unless_epochs_are_given(exported, tmp_path, capsys):
    plan = schedule(FinetuneSettings(), 1920)  # the defaults do not depend on the task size
    assert (plan.total_steps, plan.warmup_steps, plan.eval_every) == (600, 60, 60)
    assert schedule(FinetuneSettings(), 100_000).total_steps == 600
    plan = schedule(FinetuneSettings(steps=None, epochs=3), 1920)  # 60 batches an epoch
    assert (plan.total_steps, plan.warmup_steps, plan.eval_every) == (180, 18, None)
    assert schedule(FinetuneSettings(steps=7, evals=3), 50).eval_every == 3
    for bad in (dict(steps=5, epochs=1), dict(steps=0), dict(evals=0)):
        with pytest.raises(UserError):
            FinetuneSettings(**bad)
    good = write(tmp_path / "good.tsv", ["label\tsentence"] + [f"{i % 2}\tsentence {i}" for i in range(40)])
    with pytest.raises(SystemExit) as exc:  # argparse: one or the other
        main(["finetune", "--model", str(exported), "--task", str(good), "--steps", "5", "--epochs", "1", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_a_model_that_cannot_beat_the_majority_label_is_flagged(exported, tmp_path, capsys):
    # Every sentence is the same, so any model answers one label on dev: it cannot beat the best constant answer.
    rows = ["label\tsentence"] + [f"{'yes' if i % 5 < 3 else 'no'}\tthe same sentence" for i in range(50)]
    assert main(["finetune", "--model", str(exported), "--task", str(write(tmp_path / "flat.tsv", rows)), "--steps", "2",
                 "--max-len", "16", "--seeds", "0", "1", "--out", str(tmp_path / "ft"), "--no-progress"]) == 0
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("nasfast: warning:")]
    assert len(err) == 1 and "seeds 0, 1 of 2" in err[0] and "no better than always answering" in err[0], err
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert res["majority_warning"] == err[0].removeprefix("nasfast: warning: ")
    assert [s["beats_majority"] for s in res["seeds"]] == [False, False]
    const = res["majority_baseline"]["dev_best_constant"]
    assert all(s["dev_accuracy"] <= const["accuracy"] for s in res["seeds"]) and const["accuracy"] >= 0.5


@pytest.mark.slow  # ~13 s on the 2-core CI machine: 600 steps
def test_the_default_schedule_learns_a_small_easy_task(exported, tmp_path, capsys):
    # 320 training rows are 10 batches an epoch: the old default (3 epochs at lr 1e-4) stopped after 30 steps
    # and was flagged here at 52% test accuracy.
    rng = __import__("random").Random(0)
    words = ["the", "a", "film", "story", "was", "is", "very", "quite", "and", "of"]
    rows = ["label\tsentence"] + [f"{['negative', 'positive'][y]}\t{' '.join(rng.choices(words, k=4))} {['bad', 'good'][y]} "
                                  f"{' '.join(rng.choices(words, k=3))}" for y in (rng.randrange(2) for _ in range(400))]
    assert main(["finetune", "--model", str(exported), "--task", str(write(tmp_path / "easy.tsv", rows)), "--max-len", "16",
                 "--seeds", "0", "--out", str(tmp_path / "ft"), "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert res["settings"]["steps"] == 600 and res["settings"]["epochs"] is None and res["majority_warning"] is None
    assert res["test_accuracy"]["mean"] >= 0.9 and res["seeds"][0]["beats_majority"], res
    assert len(res["seeds"][0]["evals"]) == 10
