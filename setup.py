"""setup.cfg holds the metadata; this file only adds twisted/plugins, which must stay a
namespace directory without __init__.py (setup.cfg's ``find:`` cannot express that)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["tfscache", "tfscache.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/tfscache_plugin.py"], "tfscache.proto": ["*.proto"]},
)
