#!/usr/bin/env python3
"""A worker of switchboard's `invoice` service, in Python with pika.

It follows switchboard's AMQP contract (DESIGN.md, "Serving from another
language"; the AsyncAPI document at GET /asyncapi.json):

- consume <prefix>.svc.<service>, which switchboard declares (`serve` or
  `switchboard declare`): never declare it here, its arguments are
  switchboard's;
- drop a request whose deadline passed (`x-sb-deadline-ms`, else
  `timestamp` + `expiration`): ack it, no reply, nobody waits for it;
- reply to `reply_to` through the default exchange with the request's
  `correlation_id`, the header `x-status`, its content type, and the
  request's `traceparent`; errors are 4xx/5xx with a problem+json body;
- ack only once the reply is confirmed by the broker.

    pip install -r examples/python/requirements.txt
    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f python3 examples/python/invoice_worker.py

An invoice: {"customer": "ACME", "currency": "EUR",
             "lines": [{"sku": "W-1", "quantity": 3, "unit_price_cents": 250}]}
"""

import json
import logging
import os
import signal
import sys
import time

import pika

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
PREFIX = os.environ.get("SWITCHBOARD_PREFIX", "sb")  # switchboard's amqp.prefix
SERVICE = os.environ.get("SERVICE", "invoice")
QUEUE = f"{PREFIX}.svc.{SERVICE}"
PREFETCH = int(os.environ.get("PREFETCH", "16"))  # requests in hand at once

log = logging.getLogger(SERVICE)


def problem(status, title, detail):
    """An error reply: x-status and an RFC 9457 problem+json body."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return status, "application/problem+json", json.dumps(body).encode()


def make_invoice(body):
    """The service itself: (status, content type, body) for a request body."""
    try:
        invoice = json.loads(body)
    except ValueError:
        return problem(400, "Bad Request", "the invoice is not JSON")
    if not isinstance(invoice, dict):
        return problem(422, "Invalid invoice", "the invoice must be a JSON object")
    errors = []
    customer = invoice.get("customer")
    if not isinstance(customer, str) or not customer.strip():
        errors.append("customer is missing")
    lines = invoice.get("lines")
    if not isinstance(lines, list) or not lines:
        errors.append("lines must be a non-empty list")
        lines = []
    total = 0
    for i, line in enumerate(lines):
        qty = line.get("quantity") if isinstance(line, dict) else None
        price = line.get("unit_price_cents") if isinstance(line, dict) else None
        if not isinstance(qty, int) or isinstance(qty, bool) or qty <= 0:
            errors.append(f"lines[{i}].quantity must be a positive integer")
        elif not isinstance(price, int) or isinstance(price, bool) or price < 0:
            errors.append(f"lines[{i}].unit_price_cents must be a non-negative integer")
        else:
            total += qty * price
    if errors:
        return problem(422, "Invalid invoice", "; ".join(errors))
    reply = {
        "customer": customer,
        "currency": invoice.get("currency", "EUR"),
        "lines": len(lines),
        "total_cents": total,
    }
    return 200, "application/json", json.dumps(reply).encode()


def deadline_passed(props):
    """Whether nobody waits for this request's answer any more."""
    headers = props.headers or {}
    now_ms = time.time() * 1000
    deadline = headers.get("x-sb-deadline-ms")
    if deadline is not None:
        try:
            return int(deadline) < now_ms
        except (TypeError, ValueError):
            pass
    if props.timestamp is not None and props.expiration is not None:
        try:
            # `timestamp` has whole seconds: allow the second it started in.
            return props.timestamp * 1000 + int(props.expiration) + 999 < now_ms
        except ValueError:
            pass
    return False


def trace_id(traceparent):
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 else "-"


def on_request(channel, method, props, body):
    call_id = props.correlation_id or "-"
    traceparent = (props.headers or {}).get("traceparent")
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", "replace")
    if deadline_passed(props):
        log.info("call_id=%s trace_id=%s expired: dropped", call_id, trace_id(traceparent))
        channel.basic_ack(method.delivery_tag)
        return
    try:
        status, content_type, reply = make_invoice(body)
    except Exception:
        # A bug, not the request's fault: give it back. A quorum queue counts
        # the delivery (x-delivery-count) and dead-letters it past its limit;
        # a classic queue cannot count, so a second failure dead-letters it.
        log.exception("call_id=%s failed", call_id)
        counted = "x-delivery-count" in (props.headers or {})
        channel.basic_reject(method.delivery_tag, requeue=counted or not method.redelivered)
        return
    if props.reply_to:
        headers = {"x-status": status}
        if traceparent:
            headers["traceparent"] = traceparent
        try:
            # Confirmed (confirm_delivery below): returns once the broker has it.
            channel.basic_publish(
                exchange="",
                routing_key=props.reply_to,
                body=reply,
                properties=pika.BasicProperties(
                    correlation_id=props.correlation_id,
                    content_type=content_type,
                    headers=headers,
                    delivery_mode=pika.DeliveryMode.Persistent,
                    app_id=f"{SERVICE}-worker-python",
                    timestamp=int(time.time()),
                ),
                mandatory=True,
            )
        except pika.exceptions.UnroutableError:
            log.info("call_id=%s the caller's reply queue is gone: reply dropped", call_id)
    log.info("call_id=%s trace_id=%s status=%s", call_id, trace_id(traceparent), status)
    channel.basic_ack(method.delivery_tag)


def main():
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("pika").setLevel(logging.WARNING)
    params = pika.URLParameters(AMQP_URL)
    params.client_properties = {"connection_name": f"{SERVICE}-worker-python"}
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    try:
        channel.queue_declare(QUEUE, passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        sys.exit(f"queue {QUEUE} does not exist: run `switchboard declare` or `switchboard serve` first")
    channel.confirm_delivery()
    channel.basic_qos(prefetch_count=PREFETCH)
    channel.basic_consume(QUEUE, on_request, auto_ack=False)
    # SIGTERM stops it as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    log.info("consuming %s", QUEUE)
    try:
        channel.start_consuming()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        # Requests in hand and not acked go back to the queue.
        if connection.is_open:
            connection.close()


if __name__ == "__main__":
    main()
