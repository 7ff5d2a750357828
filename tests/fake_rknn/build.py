"""Build the fake librknnrt.so with the system C compiler.

`build_fake_rknn()` returns the path of a library compiled from `fake_rknn.c` with the 2.3.2 symbol set;
`build_fake_rknn("1.5.2")` leaves out `rknn_mem_sync` and `rknn_create_mem2` like the 1.5.2 runtime (reference §1.6),
to test lazy binding. `api_version` / `drv_version` set the strings `RKNN_QUERY_SDK_VERSION` returns. Builds are
cached under `_build/` by a hash of the source and flags, so the suite compiles each variant once.
Also runnable as a script: `python tests/fake_rknn/build.py [VARIANT]` prints the path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "fake_rknn.c"
BUILD_DIR = HERE / "_build"

# variant -> (symbol-set macro, default api_version). The 2.3.2 string is the one the reference quotes from issue logs;
# the 1.5.2 one is a test value (its real build hash is not in the reference).
VARIANTS = {
    "2.3.2": ("232", "2.3.2 (429f97ae6b@2025-04-09T09:09:27)"),
    "1.5.2": ("152", "1.5.2 (fake@2023-08-01T00:00:00)"),
}


def _c_string(value: str) -> str:
    if any(ch in value for ch in '"\\\n'):
        raise ValueError(f"version strings may not contain quotes, backslashes or newlines: {value!r}")
    return f'"{value}"'


def build_fake_rknn(variant: str = "2.3.2", api_version: str | None = None, drv_version: str | None = None,
                    out_dir: Path | None = None) -> Path:
    """Compile (or reuse) the fake for `variant`; the path of its librknnrt.so."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc): the fake runtime is built by the tests")
    symbols, default_api = VARIANTS[variant]
    flags = ["-shared", "-fPIC", "-O1", "-g", "-pthread", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden",
             f"-DFAKE_RKNN_SYMBOLS={symbols}", f"-DFAKE_RKNN_API_VERSION={_c_string(api_version or default_api)}"]
    if drv_version is not None:
        flags.append(f"-DFAKE_RKNN_DRV_VERSION={_c_string(drv_version)}")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    out_dir = out_dir or BUILD_DIR / f"{variant}-{digest}"
    out = out_dir / "librknnrt.so"
    if not out.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp), "-lm"], check=True)
        tmp.replace(out)
    return out


if __name__ == "__main__":
    print(build_fake_rknn(sys.argv[1] if len(sys.argv) > 1 else "2.3.2"))
