#!/usr/bin/env python3
"""An outside client of the image service, in Python, knowing nothing of the
Rust types: it learns the API by gRPC reflection, then creates an image,
uploads random bytes in a client stream, downloads them in a server stream
(whole and by range) and checks the SHA-256 both ways.

It plays the sidecar's part by sending the trusted x-cirrus-* headers.
Needs: pip install grpcio grpcio-reflection

usage: outside_client.py HOST:PORT PROJECT_ID
"""
import hashlib
import os
import sys

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

MIB = 1024 * 1024


def main():
    addr, project = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(
        addr, options=[("grpc.max_receive_message_length", 8 * MIB)]
    )
    grpc.channel_ready_future(channel).result(timeout=30)
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("image.v1.Images")

    def msg(name):
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    def enum(type_name, value):
        return pool.FindEnumTypeByName(type_name).values_by_name[value].number

    def rpc(name):
        m = service.FindMethodByName(name)
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        kind = {
            (False, False): channel.unary_unary,
            (True, False): channel.stream_unary,
            (False, True): channel.unary_stream,
            (True, True): channel.stream_stream,
        }[(m.client_streaming, m.server_streaming)]
        return kind(
            f"/image.v1.Images/{name}",
            request_serializer=req.SerializeToString,
            response_deserializer=resp.FromString,
        )

    caller = [
        ("x-cirrus-user-id", "python-user"),
        ("x-cirrus-user-name", "python"),
        ("x-cirrus-project-id", project),
        ("x-cirrus-roles", "member,reader"),
        ("x-cirrus-is-admin", "false"),
    ]
    data = os.urandom(5 * MIB + 4321)
    digest = hashlib.sha256(data).hexdigest()

    image = rpc("CreateImage")(
        msg("image.v1.CreateImageRequest")(
            name="from-python",
            disk_format=enum("image.v1.DiskFormat", "DISK_FORMAT_RAW"),
            container_format=enum("image.v1.ContainerFormat", "CONTAINER_FORMAT_BARE"),
            expected_size=len(data),
            expected_sha256=digest,
            properties={"os_type": "linux"},
        ),
        metadata=caller,
        timeout=30,
    )
    Upload = msg("image.v1.UploadRequest")

    def chunks():
        for i, at in enumerate(range(0, len(data), MIB)):
            yield Upload(image_id=image.id if i == 0 else "", data=data[at : at + MIB])

    done = rpc("Upload")(chunks(), metadata=caller, timeout=120)
    active = enum("image.v1.Status", "STATUS_ACTIVE")
    assert done.status == active, f"status {done.status} after upload"
    assert done.size == len(data), f"size {done.size}"
    assert done.sha256 == digest, f"server sha256 {done.sha256} != {digest}"

    Download = msg("image.v1.DownloadRequest")
    h = hashlib.sha256()
    n = 0
    for chunk in rpc("Download")(Download(image_id=image.id), metadata=caller, timeout=120):
        h.update(chunk.data)
        n += len(chunk.data)
    assert n == len(data), f"downloaded {n} bytes"
    assert h.hexdigest() == digest, f"downloaded sha256 {h.hexdigest()} != {digest}"

    part = b"".join(
        c.data
        for c in rpc("Download")(
            Download(image_id=image.id, offset=MIB - 10, length=20),
            metadata=caller,
            timeout=30,
        )
    )
    assert part == data[MIB - 10 : MIB + 10], "ranged download differs"

    # Without the sidecar's headers the service refuses, with a clear code.
    try:
        rpc("GetImage")(msg("image.v1.GetImageRequest")(id=image.id), timeout=30)
        raise AssertionError("an unauthenticated GetImage succeeded")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e.code()

    print(f"round trip ok {image.id} {digest}")


if __name__ == "__main__":
    main()
