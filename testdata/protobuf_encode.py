"""Encodes JSON-lines click events as Confluent-framed Protobuf records
with Google's protobuf runtime, the .proto files compiled by protoc (from
grpcio-tools): an encoder independent of the decoder Sluice uses.

usage: python protobuf_encode.py EVENTS.jsonl OUT.hex WRITER_V1.proto WRITER_V2.proto
(the tests give it examples/protobuf/clicks_v1.proto and clicks.proto)

The first half of the events is written with schema id 1 (WRITER_V1, where
Click is the second message: message indexes [1]), the rest with id 2
(WRITER_V2, Click first: indexes [0], written as one zero byte). Four bad
records follow: a good body under an unknown schema id (99), one whose
message indexes name `Header` instead of `Click`, a record cut short, and
bytes without the framing. Writes one record per line, hex-encoded.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
from datetime import datetime

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


def millis(ts: str) -> int:
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


def compile_proto(path: str):
    """The messages of one .proto file, in a pool of their own."""
    with tempfile.TemporaryDirectory() as out:
        desc = os.path.join(out, "set.pb")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{os.path.dirname(os.path.abspath(path))}",
                "--include_imports",
                f"--descriptor_set_out={desc}",
                os.path.basename(path),
            ],
            check=True,
        )
        files = descriptor_pb2.FileDescriptorSet.FromString(open(desc, "rb").read())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    return lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def zigzag(n: int) -> bytes:
    """Confluent's varint (zig-zag, as Kafka's ByteUtils.writeVarint)."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def framed(schema_id: int, indexes: list, body: bytes) -> bytes:
    if indexes == [0]:
        ix = b"\x00"
    else:
        ix = zigzag(len(indexes)) + b"".join(zigzag(i) for i in indexes)
    return b"\x00" + struct.pack(">I", schema_id) + ix + body


def main() -> int:
    events, out, v1_path, v2_path = sys.argv[1:5]
    v1 = compile_proto(v1_path)
    v2 = compile_proto(v2_path)
    click_v1, header_v1, click_v2 = v1("sluice.test.Click"), v1("sluice.test.Header"), v2("sluice.test.Click")
    lines = [json.loads(l) for l in open(events) if l.strip()]
    half = len(lines) // 2
    records = []
    for i, e in enumerate(lines):
        m = (click_v1 if i < half else click_v2)()
        m.user_id = e["user_id"]
        if e.get("item_id") is not None:
            m.item_id = e["item_id"]
        if e.get("price") is not None:
            m.price = e["price"]
        ms = millis(e["ts"])
        m.ts.seconds, m.ts.nanos = ms // 1000, (ms % 1000) * 1_000_000
        if i < half:
            m.session = i // 10
            records.append(framed(1, [1], m.SerializeToString()))
        else:
            m.channel = "app" if i % 2 else "web"
            records.append(framed(2, [0], m.SerializeToString()))
    good = records[-1]
    body = good[6:]
    records.append(framed(99, [0], body))
    records.append(framed(1, [0], header_v1(producer="p").SerializeToString()))
    records.append(good[:-2])
    records.append(b"\x07not protobuf")
    with open(out, "w") as f:
        for r in records:
            f.write(r.hex() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
