"""Generate the Python code of the building blocks' protos into ``micro/proto``.

``python scripts/gen_protos.py`` writes the files; ``--check`` exits 1 when
the committed files differ from what ``proto/`` generates (CI runs it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "micro" / "proto"
SCHEMA = "blocks.binpb"


def generate() -> dict[str, bytes]:
    """Compile every proto under ``proto/`` and return ``{file name: content}``."""
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        schema = Path(tmp) / SCHEMA
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}"]
        # The descriptor set keeps the proto comments, which python_out drops: the
        # registry serves it so help and API docs can show them.
        args += [f"--descriptor_set_out={schema}", "--include_source_info", *sources]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        # Flatten micro/<block>/v1/<block>_pb2.py to micro/proto/<block>_pb2.py: our protos
        # import nothing of each other, so the generated modules need no import rewriting.
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).rglob("*_pb2.py*"))}
        files[SCHEMA] = schema.read_bytes()
        return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if micro/proto is stale")
    check = parser.parse_args().check
    files = generate()
    stale = [
        name for name, text in files.items() if not (OUT / name).exists() or (OUT / name).read_bytes() != text
    ]
    if check:
        for name in stale:
            print(f"micro/proto/{name} does not match proto/: run python scripts/gen_protos.py")
        return 1 if stale else 0
    for name in stale:
        (OUT / name).write_bytes(content := files[name])
        print(f"wrote micro/proto/{name} ({len(content)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
