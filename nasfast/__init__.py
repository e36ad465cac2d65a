"""nasfast: weight-sharing NAS supernets over a BERT search space."""
import os as _os
import sys as _sys

__version__ = "0.2.0"

from nasfast import _moved

_moved.install()  # old flat module paths import for one release, with a DeprecationWarning


def _running_as_cli() -> bool:
    """The `nasfast` console script or `python -m nasfast` (argv[0] is "-m" while the package imports)."""
    name = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    return name in ("nasfast", "-m", "__main__.py")


# Registers model_type "nasfast" with transformers' Auto classes, so an exported folder loads with
# AutoModelForMaskedLM / AutoModelForSequenceClassification.from_pretrained after `import nasfast`.
# That import loads torch; a Ctrl-C during it, from the command line, is one line like any other.
try:
    from nasfast.nas import hf_model as _hf_model  # noqa: F401 (registers the Auto classes)
except KeyboardInterrupt:
    if not _running_as_cli():
        raise
    print("nasfast: interrupted", file=_sys.stderr, flush=True)
    raise SystemExit(130) from None
