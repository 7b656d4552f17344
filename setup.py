"""Builds the ID map's native kernels (tables/csrc) as a torch extension at install time.

Everything else about the package is in pyproject.toml. The extension compiles against the
installed torch, so install with `pip install --no-build-isolation` after torch (the
Makefile does): an isolated build would fetch a torch of its own.
"""

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension(
            "tables.collisionless._idmap_native",
            ["tables/collisionless/csrc/idmap_native.cpp"],
            extra_compile_args=["-O3"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
