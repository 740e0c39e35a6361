"""Build hooks pyproject.toml cannot express: the cffi tracker module and the preload library."""

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PRELOAD = "vmckpt.engine.native.libvmckpt_preload"


class BuildExt(build_ext):
    """Builds the preload library as a plain shared object, not a Python extension module."""

    def get_ext_filename(self, fullname: str) -> str:
        filename = super().get_ext_filename(fullname)
        if fullname.split(".")[-1] == PRELOAD.split(".")[-1]:
            return str(Path(filename).with_name("libvmckpt_preload.so"))
        return filename

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return [] if ext.name == PRELOAD else super().get_export_symbols(ext)


setup(
    cffi_modules=["engine/native/build_native.py:ffi", "engine/native/build_nbd.py:ffi"],
    ext_modules=[
        Extension(
            PRELOAD,
            sources=["engine/native/preload.c"],
            extra_compile_args=["-O2", "-fvisibility=hidden", "-Wall", "-Wextra"],
            libraries=["dl"],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
