"""Reads one record from a Kafka topic with confluent-kafka (its own, modern librdkafka).

Usage: kafka_read.py BOOTSTRAP TOPIC
Consumes TOPIC from the earliest offset in a fresh consumer group and prints the first record
as one JSON line: {"topic", "key", "value", "headers"} (headers as a list of [name, value]
pairs, in record order). Exits 2 if nothing arrives within 30 s.
"""
import json
import sys
import time
import uuid

from confluent_kafka import Consumer

bootstrap, topic = sys.argv[1:3]
consumer = Consumer({
    "bootstrap.servers": bootstrap,
    "group.id": f"interop-{uuid.uuid4()}",
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
    "fetch.wait.max.ms": 10,
})
consumer.subscribe([topic])
deadline = time.monotonic() + 30
try:
    while time.monotonic() < deadline:
        record = consumer.poll(0.5)
        if record is None:
            continue
        if record.error():
            print(f"consumer error: {record.error()}", file=sys.stderr)
            continue
        decode = lambda b: None if b is None else b.decode()
        print(json.dumps({
            "topic": record.topic(),
            "key": decode(record.key()),
            "value": decode(record.value()),
            "headers": [[name, decode(value)] for name, value in (record.headers() or [])],
        }), flush=True)
        sys.exit(0)
    print("no record within 30 s", file=sys.stderr)
    sys.exit(2)
finally:
    consumer.close()
