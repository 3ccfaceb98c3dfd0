"""The gRPC stubs, generated into the client package (agentd_client/v1, `make proto`).

They are imported from there, not generated twice: the daemon and a client in one process
must register each protobuf message once. The daemon's code keeps importing
`from agentd.api.gen.v1 import agentd_pb2`.
"""

from agentd_client.v1 import agentd_pb2, agentd_pb2_grpc, audit_pb2, audit_pb2_grpc

__all__ = ["agentd_pb2", "agentd_pb2_grpc", "audit_pb2", "audit_pb2_grpc"]
