"""Regenerate the Python modules of the protos in this folder: `python -m twotower.protos.generate`.

Runs grpcio-tools' bundled protoc (pip install -e '.[test]') and writes, next to each `<name>.proto`,
`<name>_pb2.py`, `<name>_pb2.pyi` and `<name>_pb2_grpc.py`.

protoc derives Python module names from the proto's path relative to its -I root. This folder is
installed as the package `twotower.protos`, so each proto is staged as `twotower/protos/<name>.proto`
in a temporary root: the message classes then get `__module__ = "twotower.protos.<name>_pb2"` (Ray
Serve's proxy pickles request messages to the replica, and pickle finds a class by that name; with a
bare `<name>_pb2` it fails) and the _grpc module imports `from twotower.protos import <name>_pb2`. The
descriptor's file name is `twotower/protos/<name>.proto` (what reflection reports).

The generated files are committed; tests/protos/test_generated_in_sync.py checks they match.
`--out DIR` writes elsewhere (the test uses it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("twotower_v1.proto",)
PACKAGE_PATH = Path("twotower", "protos")  # where the protos sit in the import namespace


def generated_names(proto: str) -> list[str]:
    stem = proto.removesuffix(".proto")
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Generate every proto of PROTOS into out_dir; returns the written files."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("grpcio-tools is needed: pip install -e '.[test]'") from e
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        root, gen = Path(tmp) / "src", Path(tmp) / "gen"
        (root / PACKAGE_PATH).mkdir(parents=True)
        gen.mkdir()
        for proto in PROTOS:
            shutil.copyfile(PROTO_DIR / proto, root / PACKAGE_PATH / proto)
            args = ["grpc_tools.protoc", f"-I{root}", f"-I{well_known}", f"--python_out={gen}", f"--pyi_out={gen}",
                    f"--grpc_python_out={gen}", str(root / PACKAGE_PATH / proto)]  # fmt: skip
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
            for name in generated_names(proto):
                shutil.copyfile(gen / PACKAGE_PATH / name, out_dir / name)
                written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=PROTO_DIR, help="output folder (default: next to the protos)")
    args = ap.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
