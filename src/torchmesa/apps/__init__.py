"""Applications built on the library, apart from it: the ``torchmesa`` command, the demo,
the benchmark suite, and the built-in models and datasets they (and the examples) train.

Nothing in the core imports from here; ``torchmesa.apps`` imports the core's public API.
"""
