"""Build of fastpeft.

The Triton kernels live in the top-level folder ``kernels/`` and are installed as the subpackage
``fastpeft.kernels`` (never as a top-level ``kernels`` module: that name belongs to another PyPI package).
"""
from setuptools import setup

setup(
    packages=["fastpeft", "fastpeft.ops", "fastpeft.kernels"],
    package_dir={"fastpeft.kernels": "kernels"},
)
