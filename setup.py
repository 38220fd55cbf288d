"""Builds the optional crop-aware JPEG decoder (datasvc._jpegcrop) over the libjpeg API.

The extension is optional: when libjpeg's headers are missing the build goes on without it and
datasvc.decode falls back to a library decoder.
"""

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler failure leaves the fallback in place
            print(f"WARNING: datasvc._jpegcrop not built ({e}); using the library decoder")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"WARNING: {ext.name} not built ({e}); using the library decoder")


def extensions():
    from setuptools import Extension

    return [
        Extension(
            "datasvc._jpegcrop",
            ["datasvc/_jpegcrop.c"],
            libraries=["jpeg"],
            extra_compile_args=["-O3"],
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
