"""Regenerate proto/gen/ from the .proto files under proto/ (`make proto`).

protoc writes imports relative to its include root (``from containerd.types
import mount_pb2``); they are rewritten to live under ``proto.gen`` so the
generated code needs no sys.path tricks.
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "gen"
GRPC_SERVICES = {Path("agent.proto")}


def _sources() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.proto") if OUT not in p.parents)


def _top_level_packages(sources: list[Path]) -> set[str]:
    return {p.relative_to(ROOT).parts[0].removesuffix(".proto") for p in sources}


def main() -> int:
    sources = _sources()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    well_known = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={OUT}", f"--pyi_out={OUT}"]
    if protoc.main(args + [str(p) for p in sources]) != 0:
        return 1
    # Only the agent API is served over gRPC; containerd's services go over ttrpc.
    grpc_sources = [str(p) for p in sources if p.relative_to(ROOT) in GRPC_SERVICES]
    if protoc.main([*args[:3], f"--grpc_python_out={OUT}", *grpc_sources]) != 0:
        return 1
    ours = "|".join(sorted(re.escape(p) for p in _top_level_packages(sources)))
    rewrite = re.compile(rf"^(from|import) ((?:{ours})(?:_pb2\w*)?)\b", re.M)
    for py in OUT.rglob("*.py*"):
        text = rewrite.sub(r"\1 proto.gen.\2", py.read_text())
        py.write_text(text)
    for d in [OUT, *(p for p in OUT.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    print(f"generated {len(sources)} proto files into {OUT.relative_to(ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
