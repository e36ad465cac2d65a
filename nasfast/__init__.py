"""nasfast: weight-sharing NAS supernets over a BERT search space."""
__version__ = "0.1.0"
