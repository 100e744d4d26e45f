"""Build the C kernels and the Cython binding as one extension, mpskernels._native.

Hot code is compiled once per instruction set: files named `*__avx2.c` / `*__avx512.c` get
that ISA's flags, everything else is baseline, and the dispatch tables pick one at import
(src/runtime/cpu.c). Set MPSKERNELS_WERROR=1 to build our C with -Wall -Wextra -Werror.
"""
import glob
import os
import platform

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

X86 = platform.machine().lower() in ("x86_64", "amd64")
ISA_FLAGS = {
    "__avx2.c": ["-mavx2", "-mfma", "-mf16c"],
    "__avx512.c": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl",
                   "-mavx2", "-mfma", "-mf16c"],
}
OUR_FLAGS = ["-std=c11", "-O3", "-fno-math-errno", "-fno-trapping-math", "-pthread"]
if os.environ.get("MPSKERNELS_WERROR"):
    OUR_FLAGS += ["-Wall", "-Wextra", "-Werror"]
EXTRA = os.environ.get("MPSKERNELS_CFLAGS", "").split()


def c_sources():
    sources = sorted(glob.glob("src/**/*.c", recursive=True))
    if not X86:
        sources = [s for s in sources if not s.endswith(tuple(ISA_FLAGS))]
    return sources


class BuildExt(build_ext):
    """Adds per-file flags: ISA flags by file name, strict warnings only on our own C."""

    def build_extensions(self):
        compile_one = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            flags = list(extra_postargs) + EXTRA
            if src.startswith("src") or "/src/" in src.replace(os.sep, "/"):
                flags += OUR_FLAGS
                for suffix, isa in ISA_FLAGS.items():
                    if src.endswith(suffix):
                        flags += isa
            else:  # Cython's generated C: optimise, but its warnings are not ours
                flags += ["-O2", "-Wno-unused-function", "-Wno-unreachable-code"]
            compile_one(obj, src, ext, cc_args, flags, pp_opts)

        if self.compiler.compiler_type == "unix":
            self.compiler._compile = _compile
        super().build_extensions()


extension = Extension(
    "mpskernels._native",
    sources=["mpskernels/_native.pyx"] + c_sources(),
    depends=sorted(glob.glob("src/**/*.h", recursive=True)),   # a changed header rebuilds
    include_dirs=["src", numpy.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_link_args=["-pthread"],
    libraries=["m"],
)

setup(
    ext_modules=cythonize([extension], language_level=3,
                          compiler_directives={"boundscheck": False, "wraparound": False}),
    cmdclass={"build_ext": BuildExt},
)
