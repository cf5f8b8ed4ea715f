"""Package discovery for a repository whose root is the package (metadata: pyproject.toml).

ComfyUI loads the cloned folder itself as a custom-node pack, so there is no ``src/flux2kit`` folder:
the root maps to ``flux2kit`` and every package below it to ``flux2kit.<path>``. A declarative list
in pyproject.toml cannot express that mapping with discovery, and a hand-kept list silently drops
new sub-packages from ``pip install .``.
"""

from setuptools import find_packages, setup

SKIP = ("tests", "tests.*", "bench", "bench.*", "scripts", "scripts.*", "docs", "docs.*", "workflows", "web",
        "build", "build.*", "dist")

setup(
    package_dir={"flux2kit": "."},
    packages=["flux2kit", *(f"flux2kit.{p}" for p in find_packages(".", exclude=SKIP))],
)
