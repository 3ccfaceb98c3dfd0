"""The committed gRPC stubs must match proto/: nobody edits one without the other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class TestGeneratedStubs:
    def test_stubs_match_the_protos(self) -> None:
        """Regenerating agentd_client/v1 from proto/ changes nothing (else: run `make proto`)."""
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--check"],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
