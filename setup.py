"""Package discovery, the one thing pyproject.toml cannot say: every package under jeidnn/ is found, and
configs/ (mapped to jeidnn.configs by [tool.setuptools.package-dir] in pyproject.toml) is added to them.
Everything else about the build is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["jeidnn", "jeidnn.*"]), "jeidnn.configs"])
