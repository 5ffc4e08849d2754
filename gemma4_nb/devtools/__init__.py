"""Developer tools beside the product: benchmarks, tiny random checkpoints, the demo notebook run.

Nothing in the runtime or the notebook layer imports these.
"""
