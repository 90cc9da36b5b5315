#!/usr/bin/env python3
"""An outside client of the compute API, in Python, knowing nothing of the
Rust types: it learns compute.v1 by gRPC reflection, creates a server, and
watches it (WatchServer, a server stream) until it is active, printing each
state it sees; then deletes it and watches it go.

It plays the sidecar's part by sending the trusted x-cirrus-* headers.
Needs: pip install grpcio grpcio-reflection

usage: outside_client.py HOST:PORT PROJECT_ID IMAGE_ID
"""
import sys

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main():
    addr, project, image = sys.argv[1], sys.argv[2], sys.argv[3]
    channel = grpc.insecure_channel(addr)
    grpc.channel_ready_future(channel).result(timeout=30)
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("compute.v1.Servers")

    def rpc(name):
        m = service.FindMethodByName(name)
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        kind = channel.unary_stream if m.server_streaming else channel.unary_unary
        call = kind(
            f"/compute.v1.Servers/{name}",
            request_serializer=req.SerializeToString,
            response_deserializer=resp.FromString,
        )
        return req, call

    caller = [
        ("x-cirrus-user-id", "python-user"),
        ("x-cirrus-user-name", "python"),
        ("x-cirrus-project-id", project),
        ("x-cirrus-roles", "member,reader"),
        ("x-cirrus-is-admin", "false"),
    ]
    Create, create = rpc("CreateServer")
    server = create(
        Create(name="from-python", flavor="m1.tiny", image_id=image, metadata={"lang": "python"}),
        metadata=caller,
        timeout=30,
    )
    print(f"created {server.id} {server.vm_state}/{server.task_state}")
    Ref, watch = rpc("WatchServer")
    seen = []
    for s in watch(Ref(id=server.id), metadata=caller, timeout=60):
        seen.append((s.vm_state, s.task_state))
        print(f"watch {s.vm_state}/{s.task_state or '-'} power={s.power_state} rev={s.revision}")
        if s.vm_state == "active" and not s.task_state:
            break
        assert s.vm_state == "building", f"unexpected {s.vm_state}: {s.fault.message}"
    assert seen[-1] == ("active", ""), seen
    _, delete = rpc("DeleteServer")
    delete(Ref(id=server.id), metadata=caller, timeout=30)
    for s in watch(Ref(id=server.id), metadata=caller, timeout=60):
        print(f"watch {s.vm_state}/{s.task_state or '-'}")
        if s.vm_state == "deleted":
            break
    print("OK")


if __name__ == "__main__":
    main()
