"""Training frameworks: callbacks that apply a run's sparsity rules (`fastsparse.Rule`) at the
right hooks of a transformers `Trainer` (`fastsparse.integrations.transformers`) and of a
Lightning `Trainer` (`fastsparse.integrations.lightning`). Each module imports its framework;
importing fastsparse imports neither.
"""
