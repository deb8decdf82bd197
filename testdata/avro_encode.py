"""Encodes JSON-lines click events as Confluent-framed Avro records with
fastavro (an encoder independent of the decoder Sluice uses).

usage: python avro_encode.py EVENTS.jsonl OUT.hex WRITER_V1.avsc WRITER_V2.avsc

The first half of the events is written with schema id 1 (WRITER_V1), the
rest with id 2 (WRITER_V2). Three bad records follow: a good body under an
unknown schema id (99), a record cut short, and bytes without the framing.
Writes one record per line, hex-encoded.
"""

import io
import json
import struct
import sys
from datetime import datetime

import fastavro


def millis(ts: str) -> int:
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


def framed(schema_id: int, schema, record) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return b"\x00" + struct.pack(">I", schema_id) + buf.getvalue()


def main() -> int:
    events, out, v1_path, v2_path = sys.argv[1:5]
    v1 = fastavro.parse_schema(json.load(open(v1_path)))
    v2 = fastavro.parse_schema(json.load(open(v2_path)))
    lines = [json.loads(l) for l in open(events) if l.strip()]
    half = len(lines) // 2
    records = []
    for i, e in enumerate(lines):
        rec = {
            "user_id": e["user_id"],
            "item_id": e.get("item_id"),
            "price": e.get("price"),
            "ts": millis(e["ts"]),
        }
        if i < half:
            rec["session"] = i // 10
            records.append(framed(1, v1, rec))
        else:
            rec["channel"] = "app" if i % 2 else "web"
            records.append(framed(2, v2, rec))
    good = records[-1]
    records.append(b"\x00" + struct.pack(">I", 99) + good[5:])
    records.append(good[:-2])
    records.append(b"\x07not avro")
    with open(out, "w") as f:
        for r in records:
            f.write(r.hex() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
