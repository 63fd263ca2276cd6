"""Integrations with other training libraries (each an optional extra: ``pip install alphadpo_kernels[trl]``).

Import the one you use directly, e.g. ``from alphadpo_kernels.integrations.trl import AlphaDPOTrainer``; nothing
here is imported by ``import alphadpo_kernels``.
"""
