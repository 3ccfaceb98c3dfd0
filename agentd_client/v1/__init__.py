"""Generated from proto/agentd/v1 by scripts/gen_proto.py; do not edit."""
