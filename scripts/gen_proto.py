"""Generates the committed gRPC stubs in agentd_client/v1 from proto/agentd/v1.

The stubs are committed (not built at install time) so that installing agentd needs no
protoc; `--check` regenerates into a temporary directory and fails if anything drifted.
The .proto files are copied under agentd_client/v1/ first so that the generated imports
(`from agentd_client.v1 import ...`) resolve inside the client package, which the daemon
imports them from too (agentd/api/gen/v1 re-exports them): one copy of the stubs, so one
registration of each message in protobuf's descriptor pool.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "proto" / "agentd" / "v1"
TARGET = ROOT / "agentd_client" / "v1"


def generate(out_root: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "agentd_client" / "v1"
        staged.mkdir(parents=True)
        protos = sorted(SOURCE.glob("*.proto"))
        for proto in protos:
            shutil.copy(proto, staged / proto.name)
        include = str(Path(protoc.__file__).parent / "_proto")
        plugin = Path(sys.executable).parent / "protoc-gen-mypy"
        args = ["protoc", f"--plugin=protoc-gen-mypy={plugin}", f"-I{tmp}", f"-I{include}",
                f"--python_out={out_root}",
                f"--grpc_python_out={out_root}", f"--mypy_out={out_root}",
                f"--plugin=protoc-gen-mypy_grpc={plugin.with_name('protoc-gen-mypy_grpc')}",
                f"--mypy_grpc_out={out_root}",
                *(str(staged / p.name) for p in protos)]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    out = out_root / "agentd_client" / "v1"
    (out / "__init__.py").write_text('"""Generated from proto/agentd/v1 by scripts/gen_proto.py; '
                                     'do not edit."""\n')
    return out


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        if check:
            names = sorted(p.name for p in fresh.iterdir() if p.is_file())
            current = sorted(p.name for p in TARGET.glob("*") if p.is_file())
            _, mismatch, errors = filecmp.cmpfiles(fresh, TARGET, names, shallow=False)
            if names != current or mismatch or errors:
                print("agentd_client/v1 is out of date with proto/: run `make proto`",
                      file=sys.stderr)
                return 1
            return 0
        if TARGET.exists():
            shutil.rmtree(TARGET)
        shutil.copytree(fresh, TARGET)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
