"""The one compiled part of mimkit, optional: region decoding of JPEGs against the system's libjpeg-turbo
(`mimkit.data._jpeg_region`). Where a compiler or libjpeg's headers are missing, the build skips it with a
warning and mimkit decodes whole images instead (`mimkit.data.crop_decode`); everything else is in
pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mimkit.data._jpeg_region", ["src/mimkit/data/_jpeg_region.c"],
                             libraries=["jpeg"], optional=True)])
