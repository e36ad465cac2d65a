"""Export to a transformers folder: exact logits vs the supernet, Auto classes in a fresh process, bad inputs."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import MICRO_OVERRIDES

from nasfast.analysis.runs import open_run
from nasfast.cli.app import main
from nasfast.config import load_config
from nasfast.training.trainer import Trainer

# Identity layers, attention and convolutions (whose padding masks matter), feed-forward.
CHILDREN = ["mha:2|identity|conv:5", "identity|identity|identity", "conv:3|mha:3|ffn:40", "identity|ffn:40|mha:2"]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    # dropout 0.3 so that a model accidentally left in training mode could not pass the equality test
    Trainer(load_config(None, MICRO_OVERRIDES + ["model.dropout=0.3"]), root / "run", progress=False).train()
    return root / "run"


def batch(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:], mask[2, 4:], mask[3, 22:] = 0, 0, 0  # padded rows of different lengths
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("child", CHILDREN)
def test_exported_masked_lm_computes_what_the_supernet_computes(micro_run, tmp_path, child):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "model"
    assert main(["export", "--run", str(micro_run), "--arch", child, "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    run = open_run(micro_run)
    supernet = run.supernet()
    arch = run.space.parse(child)
    model = AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "NasfastForMaskedLM" and model.config.operators == child.split("|")
    for seed in range(3):
        ids, mask = batch(run.corpus.vocab_size, seed)
        with torch.no_grad():
            expected = supernet(ids, mask, arch).logits
            got = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(got, expected)  # same modules, same ops, same order: bitwise
    # the exact parameter count the search budgets with
    from nasfast.space.supernet import child_num_params

    assert model.num_parameters() == child_num_params(run.space, arch, run.corpus.vocab_size, run.cfg.model.max_len)


@pytest.mark.slow
def test_auto_classes_in_a_fresh_process(micro_run, tmp_path):
    out = tmp_path / "model"
    assert main(["export", "--run", str(micro_run), "--arch", CHILDREN[0], "--out", str(out)]) == 0
    script = f"""
import json, torch, nasfast
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
enc = tok(["the king spoke to the people", "and it was so"], padding=True, return_tensors="pt")
mlm = AutoModelForMaskedLM.from_pretrained({str(out)!r}).eval()
cls = AutoModelForSequenceClassification.from_pretrained({str(out)!r}, num_labels=2).eval()
with torch.no_grad():
    logits = mlm(**enc).logits
    c = cls(**enc).logits
same = all(torch.equal(a, b) for a, b in zip(mlm.nasfast.state_dict().values(), cls.nasfast.state_dict().values()))
print(json.dumps({{"mlm": type(mlm).__name__, "cls": type(cls).__name__, "ids": enc["input_ids"].tolist(),
                  "mlm_shape": list(logits.shape), "cls_shape": list(c.shape), "same_encoder": same,
                  "first": logits[0, 1, :5].tolist()}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["mlm"] == "NasfastForMaskedLM" and res["cls"] == "NasfastForSequenceClassification" and res["same_encoder"]
    run = open_run(micro_run)
    tokenizer = run.corpus.tokenizer
    assert res["ids"][0] == tokenizer("the king spoke to the people")["input_ids"]  # the run's own tokenizer
    assert res["mlm_shape"][-1] == run.corpus.vocab_size and res["cls_shape"] == [2, 2]
    ids = torch.tensor(res["ids"])
    with torch.no_grad():
        expected = run.supernet()(ids, (ids != tokenizer.pad_token_id).long(), run.space.parse(CHILDREN[0])).logits
    assert torch.allclose(expected[0, 1, :5], torch.tensor(res["first"]), atol=1e-6)


def test_arch_from_search_json_and_arch_list(micro_run, tmp_path, capsys):
    (tmp_path / "archs.txt").write_text("# picked\n" + CHILDREN[2] + "\n" + CHILDREN[0] + "\n")
    assert main(["export", "--run", str(micro_run), "--arch", str(tmp_path / "archs.txt"), "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["operators"] == CHILDREN[2].split("|")
    (tmp_path / "search.json").write_text(json.dumps({"best": {"arch": CHILDREN[3]}}))
    assert main(["export", "--run", str(micro_run), "--arch", str(tmp_path / "search.json"), "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["operators"] == CHILDREN[3].split("|")  # replaced


def test_backend_key(micro_run, tmp_path):
    from nasfast.nas.hf_model import NasfastConfig, NasfastForMaskedLM

    assert main(["export", "--run", str(micro_run), "--arch", CHILDREN[0], "--out", str(tmp_path / "m"), "--backend", "triton"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["kernels_backend"] == "triton"
    from transformers import AutoModelForMaskedLM

    fused = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "m")).eval()  # Triton's interpreter on CPU
    run = open_run(micro_run)
    ids, mask = batch(run.corpus.vocab_size, 7)
    with torch.no_grad():
        expected = run.supernet()(ids, mask, run.space.parse(CHILDREN[0])).logits
        got = fused(input_ids=ids, attention_mask=mask).logits
    assert fused.nasfast.ops_for(ids.device).name == "triton"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert NasfastConfig().kernels_backend == "eager"  # default: runs anywhere
    with pytest.raises(ValueError, match="kernels_backend"):
        NasfastForMaskedLM(NasfastConfig(vocab_size=50, hidden_size=8, operators=["ffn:8"], max_position_embeddings=8, kernels_backend="cuda"))


def test_bad_inputs_exit_2_with_one_line(micro_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    cases = [
        (["--arch", "mha:2|mha:9|identity", "--out", str(tmp_path / "x")], "not in the space"),
        (["--arch", "mha:2|identity", "--out", str(tmp_path / "x")], "has 2 layers"),
        (["--arch", "nothing-here", "--out", str(tmp_path / "x")], "neither an arch string"),
        (["--arch", CHILDREN[0], "--out", str(tmp_path / "taken")], "not an earlier nasfast export"),
    ]
    for extra, needle in cases:
        assert main(["export", "--run", str(micro_run)] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert main(["export", "--run", str(tmp_path / "nope"), "--arch", CHILDREN[0], "--out", str(tmp_path / "x")]) == 2
