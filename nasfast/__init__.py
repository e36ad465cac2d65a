"""nasfast: weight-sharing NAS supernets over a BERT search space."""
__version__ = "0.1.0"

# Registers model_type "nasfast" with transformers' Auto classes, so an exported folder loads with
# AutoModelForMaskedLM / AutoModelForSequenceClassification.from_pretrained after `import nasfast`.
from . import hf_model as _hf_model  # noqa: E402,F401
