"""``nasfast export``: one child of a run's supernet as a Hugging Face model folder.

The child is taken out with ``Supernet.extract`` (copies of exactly its weights, inherited from the
checkpoint) and converted to ``NasfastForMaskedLM``; the folder holds ``config.json``,
``model.safetensors`` and the run's tokenizer, and loads with the Auto classes after ``import nasfast``.
"""
from __future__ import annotations

import copy
from pathlib import Path

from nasfast.analysis.runs import Run
from nasfast.errors import UserError
from nasfast.space.searchspace import Arch, SearchSpace


def resolve_arch(space: SearchSpace, text: str) -> Arch:
    """An arch string, or a file holding one: an arch list's first entry, or search.json's best child."""
    path = Path(text)
    if "|" not in text and path.suffix == ".json":
        import json

        if not path.is_file():
            raise UserError(f"--arch file not found: {path}")
        try:
            data = json.loads(path.read_text())
            return space.parse(data["best"]["arch"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} is not a search.json (no best.arch)") from None
    if "|" not in text and path.is_file():
        from nasfast.analysis.archlist import read_archs

        return read_archs(path, space)[0]
    if "|" not in text and space.num_layers > 1:
        raise UserError(f"--arch '{text}' is neither an arch string ('op|op|...') nor an existing file")
    return space.parse(text)


def prepare_tokenizer(tokenizer, max_len: int):
    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = max_len  # so truncation=True cuts at the position-embedding limit
    return tok


def export_child(run: Run, arch: Arch, out: Path, backend: str = "eager") -> Path:
    from nasfast.files import file_sha1
    from nasfast.nas.hf_model import save_folder, to_masked_lm
    from nasfast.training.checkpointer import CHECKPOINT

    supernet = run.supernet()
    static = supernet.extract(arch).cpu().eval()
    # Where the weights came from, findable from another folder or machine: the run's absolute path and
    # the checkpoint's content hash (the same key search's cache uses).
    source = {"run": str(Path(run.path).resolve()), "checkpoint_sha1": file_sha1(run.path / CHECKPOINT), "weights": "inherited"}
    model = to_masked_lm(static, run.corpus.tokenizer, backend, nasfast_source=source)
    return save_folder(model, prepare_tokenizer(run.corpus.tokenizer, run.cfg.model.max_len), out)
