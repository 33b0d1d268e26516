"""Build script: the Python package, with ``kernels/`` installed as ``gradproj.kernels``.

The compiled extension (``gradproj._C``) is added by ``get_extensions()``.
"""

from setuptools import find_packages, setup


def get_extensions() -> list:
    return []


packages = find_packages(include=["gradproj", "gradproj.*"]) + ["gradproj.kernels"]

setup(
    packages=packages,
    package_dir={"gradproj.kernels": "kernels"},
    ext_modules=get_extensions(),
)
