"""Training glue on transformers + accelerate (``pip install alphadpo_kernels[train]``).

``alphadpo-train`` / ``python -m alphadpo_kernels.train``; see trainer.py.
"""
