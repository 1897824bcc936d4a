"""Package discovery for setuptools; everything else is in pyproject.toml.

It lives here because pyproject.toml's [tool.setuptools.packages.find] only finds folders under
cifarviz/ and cannot add cifarviz._shipped, the data-only package that [tool.setuptools.package-dir]
maps onto the repository's checkpoints/ folder (a table cannot list both `find` and a name).
Namespace discovery, so a subpackage folder is packaged even if it lacks an __init__.py (tests/test_wheel.py
checks that every module is in the wheel).
"""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["cifarviz", "cifarviz.*"]), "cifarviz._shipped"])
