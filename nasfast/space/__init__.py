"""The search space and the supernet: candidate kinds, spaces and architectures, the supernet and its
static children, the child samplers (SPOS, MAGIC-T), MAGIC-A's alignment loss, child evaluation and the
config checks that need these registries. Imports only the leaves (config, errors, files, rng) and
``nasfast.kernels``; never data, training, engines, nas or cli."""

from nasfast import _moved

__getattr__ = _moved.forward_old_names(__name__, "nasfast.space.searchspace")
