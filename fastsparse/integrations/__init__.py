"""Training frameworks: a transformers `TrainerCallback` and a Lightning `Callback` that apply a
`SparseOptimizer`'s rules at the right hooks. Each module imports its framework; importing
fastsparse imports neither.
"""
