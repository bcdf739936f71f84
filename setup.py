"""Build of moeflux._core from csrc/.

Every C file under csrc/ (except C unit-test mains and csrc/python/diag.c) is compiled
into one extension. MOEFLUX_BUILD_DIAG=1 (set by the Makefile's installs, for the tests
and bench/) also builds moeflux._diag, the test-only module of single backend ops:
diag.c with the backends and core/common.c, so the public _core carries none of it.
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


DIAG_C = os.path.join("csrc", "python", "diag.c")
# The Metal backend (csrc/backends/metal/: Objective-C glue and the plain C it calls)
# is built on macOS only; elsewhere backend.c answers "metal" with the reason.
METAL_DIR = os.path.join("csrc", "backends", "metal") + os.sep


def c_sources():
    files = sorted(glob.glob(os.path.join("csrc", "**", "*.c"), recursive=True))
    files = [f for f in files if os.sep + "tests" + os.sep not in f and f != DIAG_C]
    return for_platform(files) + [SHADERS_C]


def for_platform(files):
    """The Metal sources (plus its .m glue) on macOS; no Metal file elsewhere."""
    if sys.platform == "darwin":
        return files + sorted(glob.glob(METAL_DIR + "*.m"))
    return [f for f in files if not f.startswith(METAL_DIR)]


def diag_sources():
    """diag.c and what its ops need: the backends (CPU and the registry, which names
    CUDA and Metal) and core/common.c; no models, no _core binding."""
    backends = sorted(glob.glob(os.path.join("csrc", "backends", "**", "*.c"),
                                recursive=True))
    return [DIAG_C, os.path.join("csrc", "core", "common.c")] + \
        for_platform(backends) + [SHADERS_C]


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

extensions = [core]
if os.environ.get("MOEFLUX_BUILD_DIAG") == "1":
    extensions.append(Extension(
        "moeflux._diag",
        sources=diag_sources(),
        include_dirs=["csrc/include", "csrc"],
        extra_compile_args=compile_args(),
        extra_link_args=link_args(),
    ))

setup(
    packages=["moeflux", "moeflux.prep", "moeflux.prep.archs"],
    package_dir={"moeflux": "moeflux", "moeflux.prep": "prep"},
    package_data={"moeflux": ["py.typed", "_core.pyi"]},
    ext_modules=extensions,
)
