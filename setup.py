"""Installs the pure-Python package. The optional compiled extension in ``csrc/`` will be built here once it
exists; ``pip install`` must never fail because of it."""

from setuptools import setup

setup()
