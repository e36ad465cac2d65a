"""The NAS tail: architecture search on a trained supernet, export of a child to Hugging Face classes
(``hf_model``: AutoModel registration) and fine-tuning. May import the leaves, kernels, space, data,
training's building blocks and analysis; never the training loop, engines or cli."""
