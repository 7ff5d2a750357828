"""Build the fake librkllmrt.so for one ABI generation with the system C compiler.

`build_fake("1.3.0", version="1.3.0")` returns the path of a library compiled from
`fake_rkllm.c` with `-DRKLLM_ABI=130 -DFAKE_VERSION="1.3.0"`. Builds are cached under
`_build/` by a hash of the source and flags, so the suite compiles each variant once.
Also runnable as a script: `python tests/fake_rkllm/build.py 1.3.0 [VERSION]` prints the path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "fake_rkllm.c"
BUILD_DIR = HERE / "_build"
ABI_FLAG = {"1.2.0": "120", "1.2.1": "121", "1.3.0": "130"}


def build_fake(abi: str, version: str | None = None, out_dir: Path | None = None) -> Path:
    """Compile (or reuse) the fake for `abi`, embedding `version` as the runtime's version string."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc): the fake runtime is built by the tests")
    flags = ["-shared", "-fPIC", "-O1", "-g", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter",
             "-Werror", f"-DRKLLM_ABI={ABI_FLAG[abi]}"]
    if version is not None:
        flags.append(f'-DFAKE_VERSION="{version}"')
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    out_dir = out_dir or BUILD_DIR / f"{abi}-{version or 'noversion'}-{digest}"
    out = out_dir / "librkllmrt.so"
    if not out.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp)], check=True)
        tmp.replace(out)
    return out


if __name__ == "__main__":
    print(build_fake(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
