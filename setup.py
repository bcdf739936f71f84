"""Build of moeflux._core from csrc/.

Every C file under csrc/ (except C unit-test mains) is compiled into one extension.
C11, optimised, warnings on; MOEFLUX_WERROR=1 (set by CI and `make test`) adds -Werror.
SIMD paths are chosen at run time inside the code (target attributes), so the same
build runs on any x86-64 and the portable fallback serves everything else.
"""
import glob
import os
import sys

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# The GPU kernel sources (shaders/) as C string literals for the CUDA backend, which
# compiles them at run time with NVRTC: written before the build, standard library only.
SHADERS_C = os.path.join("build", "gen", "mf_shaders.c")


def embed_shaders():
    sys.path.insert(0, os.path.join(HERE, "shaders"))
    try:
        import embed
    finally:
        sys.path.pop(0)
    embed.write(os.path.join(HERE, SHADERS_C))


# The Metal backend (csrc/backends/metal/: Objective-C glue and the plain C it calls)
# is built on macOS only; elsewhere backend.c answers "metal" with the reason.
METAL_DIR = os.path.join("csrc", "backends", "metal") + os.sep


def c_sources():
    files = sorted(glob.glob(os.path.join("csrc", "**", "*.c"), recursive=True))
    files = [f for f in files if os.sep + "tests" + os.sep not in f]
    if sys.platform == "darwin":
        files += sorted(glob.glob(METAL_DIR + "*.m"))
    else:
        files = [f for f in files if not f.startswith(METAL_DIR)]
    return files + [SHADERS_C]


def compile_args():
    args = ["-std=c11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden",
            "-D_GNU_SOURCE", "-DMF_BUILDING_LIB"]
    if sys.platform == "darwin":
        args.remove("-D_GNU_SOURCE")
        args.append("-D_DARWIN_C_SOURCE")
    if os.environ.get("MOEFLUX_WERROR") == "1":
        args.append("-Werror")
    if os.environ.get("MOEFLUX_TAP") == "1":
        args.append("-DMF_TAP_ENABLED")   # debug tap build (make tap)
    extra = os.environ.get("MOEFLUX_CFLAGS")
    if extra:
        args.extend(extra.split())
    return args


def link_args():
    args = ["-lpthread", "-lm"]
    if sys.platform.startswith("linux"):
        args.append("-ldl")   # dlopen of libcuda / libnvrtc (in libc from glibc 2.34)
    if sys.platform == "darwin":
        args += ["-framework", "Metal", "-framework", "Foundation"]
    extra = os.environ.get("MOEFLUX_LDFLAGS")
    if extra:
        args.extend(extra.split())
    return args


embed_shaders()
core = Extension(
    "moeflux._core",
    sources=c_sources(),
    include_dirs=["csrc/include", "csrc"],
    extra_compile_args=compile_args(),
    extra_link_args=link_args(),
)

setup(
    packages=["moeflux", "moeflux.prep"],
    package_dir={"moeflux": "moeflux", "moeflux.prep": "prep"},
    package_data={"moeflux": ["py.typed", "_core.pyi"]},
    ext_modules=[core],
)
