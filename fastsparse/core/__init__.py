"""The engine every op is built on: the contract, validators, layout, backends and the ops.

Nothing here imports the layers above it (functional, methods, pruning, workflow).
"""
