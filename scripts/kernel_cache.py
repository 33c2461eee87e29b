#!/usr/bin/env python3
"""flashinfer's compiled kernels, kept between GPU machines (a fresh one compiles them again, minutes).

flashinfer JIT-compiles each kernel it first uses into its cache (~/.cache/flashinfer, or under
$FLASHINFER_WORKSPACE_BASE) and, before compiling, looks for a prebuilt module at
<package>/data/aot/<name>/<name>.so. So:

    python3 scripts/kernel_cache.py pack OUT/fi-cache.tar.xz      # the kernels this machine compiled
    python3 scripts/kernel_cache.py restore .fi-cache/*.tar.xz     # into flashinfer's prebuilt folder

scripts/gpu_run.sh does both. A restored kernel loads in under a second and is not packed again
(it never enters the JIT cache), so each call's archive holds only what that call compiled: keep
each under its own name in the git-ignored .fi-cache/ and send the folder along. An archive must
stay under the 16 MB a GPU call returns per file; xz packs a handful of kernels into a few MB.
"""

from __future__ import annotations

import argparse
import os
import tarfile
from pathlib import Path


def jit_cache() -> Path:
    return Path(os.environ.get("FLASHINFER_WORKSPACE_BASE", Path.home())) / ".cache" / "flashinfer"


def prebuilt_folder() -> Path:
    import flashinfer     # only here: packing needs no flashinfer, restoring needs its install path

    return Path(flashinfer.__file__).parent / "data" / "aot"


def pack(dest: Path) -> int:
    modules = sorted(jit_cache().rglob("*.so"))
    with tarfile.open(dest, "w:xz", preset=6) as archive:
        for module in modules:
            archive.add(module, arcname=f"{module.stem}/{module.name}")
    print(f"packed {len(modules)} kernels into {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    return len(modules)


def restore(sources: list[Path]) -> int:
    folder = prebuilt_folder()
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for source in sources:
        with tarfile.open(source, "r:xz") as archive:
            members = [m for m in archive.getmembers() if m.isfile() and _safe(m.name)]
            archive.extractall(folder, members=members, filter="data")
            count += len(members)
    print(f"restored {count} kernels into {folder}")
    return count


def _safe(name: str) -> bool:
    """Only <name>/<name>.so entries, as `pack` writes them."""
    parts = Path(name).parts
    return len(parts) == 2 and parts[1] == f"{parts[0]}.so"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pack", help="archive the kernels this machine compiled").add_argument("dest", type=Path)
    sub.add_parser("restore", help="unpack archives where flashinfer looks first").add_argument(
        "sources", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.dest)
    else:
        restore(args.sources)


if __name__ == "__main__":
    main()
