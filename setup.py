# Kept so that `pip install -e .` works with older pip/setuptools; all metadata is in pyproject.toml.
from setuptools import setup

setup()
