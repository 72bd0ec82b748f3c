"""Reads one message from a RabbitMQ topic exchange with pika, as another AMQP client would.

Usage: amqp_read.py URL EXCHANGE ROUTING_KEY
Binds an exclusive queue to EXCHANGE with ROUTING_KEY (the exchange must exist: declared
passively, so its durability is whatever the publisher gave it), prints READY, then prints the
first message as one JSON line: {"routing_key", "body", "content_type", "delivery_mode", "headers"}.
Exits 2 if nothing arrives within 20 s.
"""
import json
import sys

import pika

url, exchange, routing_key = sys.argv[1:4]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.exchange_declare(exchange=exchange, passive=True)
queue = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
channel.queue_bind(queue=queue, exchange=exchange, routing_key=routing_key)
print("READY", flush=True)

for method, properties, body in channel.consume(queue, inactivity_timeout=20):
    if method is None:
        print("no message within 20 s", file=sys.stderr)
        sys.exit(2)
    headers = {
        key: value.decode() if isinstance(value, bytes) else value
        for key, value in (properties.headers or {}).items()
    }
    print(json.dumps({
        "routing_key": method.routing_key,
        "body": body.decode(),
        "content_type": properties.content_type,
        "delivery_mode": properties.delivery_mode,
        "headers": headers,
    }), flush=True)
    channel.basic_ack(method.delivery_tag)
    break
connection.close()
