#!/usr/bin/env python3
"""Builds gRPC request bodies (5-byte frame prefix + protobuf) for h2load, and loads keys.

Protobuf is encoded by hand from etcd's field numbers so the tools need no generated code.
"""
import struct
import sys


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(number, data):
    return varint(number << 3 | 2) + varint(len(data)) + data


def field_varint(number, value):
    return varint(number << 3) + varint(value)


def put_request(key, value):
    return field_bytes(1, key) + field_bytes(2, value)


def range_request(key, serializable=False):
    body = field_bytes(1, key)
    if serializable:
        body += field_varint(7, 1)
    return body


def txn_of_puts(pairs):
    # TxnRequest.success (2) holds RequestOp with request_put (2).
    return b"".join(field_bytes(2, field_bytes(2, put_request(k, v))) for k, v in pairs)


def frame(message):
    return struct.pack(">BI", 0, len(message)) + message


def write_bodies(directory):
    value = b"v" * 256
    with open(f"{directory}/put.bin", "wb") as f:
        f.write(frame(put_request(b"bench-key", value)))
    with open(f"{directory}/range.bin", "wb") as f:
        f.write(frame(range_request(b"bench-key")))


def load(endpoint, count, value_size):
    """Puts `count` distinct keys of `value_size` bytes through Txn batches of 100."""
    import grpc
    channel = grpc.insecure_channel(endpoint)
    txn = channel.unary_unary("/etcdserverpb.KV/Txn")
    value = b"x" * value_size
    batch = 100
    for start in range(0, count, batch):
        pairs = [(b"load/%08d" % i, value) for i in range(start, min(count, start + batch))]
        txn(txn_of_puts(pairs), timeout=30)
    channel.close()


def check(endpoint, directory):
    """Sends each body once through grpcio; a non-OK gRPC status raises."""
    import grpc
    channel = grpc.insecure_channel(endpoint)
    for name, method in (("put.bin", "Put"), ("range.bin", "Range")):
        with open(f"{directory}/{name}", "rb") as f:
            body = f.read()[5:]
        channel.unary_unary(f"/etcdserverpb.KV/{method}")(body, timeout=10)
    channel.close()


if __name__ == "__main__":
    if sys.argv[1] == "bodies":
        write_bodies(sys.argv[2])
    elif sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "load":
        load(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
