"""The KServe v2 messages (`inference.*`, protos/kserve/v2/grpc_predict_v2.proto), built from the
descriptor set serving/api/codegen.py writes, in a descriptor pool of their own.

Why not generated `_pb2` modules: those register `inference.ModelInferRequest` and friends in
protobuf's default pool, and so does tritonclient. The two definitions differ (ours is a subset),
so importing both in one process fails with "duplicate symbol". A private pool never collides,
and the wire format is the same.

    from serving.api.kserve_protos import kserve
    req = kserve.ModelInferRequest.FromString(data)
"""
from __future__ import annotations

from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from serving.api import codegen

if not codegen.is_up_to_date():
    codegen.generate_protos()

#: Full name of the service (the path of its RPCs: /inference.GRPCInferenceService/ModelInfer).
SERVICE_NAME = "inference.GRPCInferenceService"


def _load() -> tuple[SimpleNamespace, dict[str, tuple[bool, bool]], dict[str, int]]:
    """The message classes by name, each RPC's (client streams, server streams), and Triton's
    DataType values by name."""
    files = descriptor_pb2.FileDescriptorSet.FromString(
        (codegen.GEN_DIR / codegen.KSERVE_DESCRIPTOR_SET).read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    (proto,) = files.file
    classes = {m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{proto.package}.{m.name}"))
               for m in proto.message_type}
    (service,) = proto.service
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.method}
    data_types = {v.name: v.number for v in pool.FindEnumTypeByName(f"{proto.package}.DataType").values}
    return SimpleNamespace(**classes), methods, data_types


#: kserve.ModelInferRequest, kserve.ModelInferResponse, ... (every message of the .proto);
#: DATA_TYPES["TYPE_STRING"] == 13 (Triton's model_config.proto DataType).
kserve, METHODS, DATA_TYPES = _load()

__all__ = ["kserve", "METHODS", "DATA_TYPES", "SERVICE_NAME"]
