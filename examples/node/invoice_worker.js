#!/usr/bin/env node
// A worker of switchboard's `invoice` service, in Node.js with amqplib.
//
// It follows switchboard's AMQP contract (DESIGN.md, "Serving from another
// language"; the AsyncAPI document at GET /asyncapi.json):
// - consume <prefix>.svc.<service>, which switchboard declares (`serve` or
//   `switchboard declare`): never declare it here, its arguments are
//   switchboard's;
// - drop a request whose deadline passed (`x-sb-deadline-ms`, else
//   `timestamp` + `expiration`): ack it, no reply, nobody waits for it;
// - reply to `reply_to` through the default exchange with the request's
//   `correlation_id`, the header `x-status`, its content type, and the
//   request's `traceparent`; errors are 4xx/5xx with a problem+json body;
// - ack only once the reply is confirmed by the broker.
//
//   (cd examples/node && npm ci) && node examples/node/invoice_worker.js
//
// An invoice: {"customer": "ACME", "currency": "EUR",
//              "lines": [{"sku": "W-1", "quantity": 3, "unit_price_cents": 250}]}
'use strict';

const amqp = require('amqplib');

const AMQP_URL = process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f';
const PREFIX = process.env.SWITCHBOARD_PREFIX || 'sb'; // switchboard's amqp.prefix
const SERVICE = process.env.SERVICE || 'invoice';
const QUEUE = `${PREFIX}.svc.${SERVICE}`;
const PREFETCH = Number(process.env.PREFETCH || 16); // requests in hand at once

const log = (line) => console.log(`${new Date().toISOString()} ${SERVICE} ${line}`);

// An error reply: x-status and an RFC 9457 problem+json body.
function problem(status, title, detail) {
  const body = { type: 'about:blank', title, status, detail };
  return [status, 'application/problem+json', Buffer.from(JSON.stringify(body))];
}

const isCount = (n, min) => Number.isInteger(n) && n >= min;

// The service itself: [status, content type, body] for a request body.
function makeInvoice(body) {
  let invoice;
  try {
    invoice = JSON.parse(body.toString('utf8'));
  } catch {
    return problem(400, 'Bad Request', 'the invoice is not JSON');
  }
  if (invoice === null || typeof invoice !== 'object' || Array.isArray(invoice)) {
    return problem(422, 'Invalid invoice', 'the invoice must be a JSON object');
  }
  const errors = [];
  if (typeof invoice.customer !== 'string' || !invoice.customer.trim()) {
    errors.push('customer is missing');
  }
  let lines = invoice.lines;
  if (!Array.isArray(lines) || lines.length === 0) {
    errors.push('lines must be a non-empty list');
    lines = [];
  }
  let total = 0;
  lines.forEach((line, i) => {
    const { quantity, unit_price_cents: price } = line || {};
    if (!isCount(quantity, 1)) errors.push(`lines[${i}].quantity must be a positive integer`);
    else if (!isCount(price, 0)) errors.push(`lines[${i}].unit_price_cents must be a non-negative integer`);
    else total += quantity * price;
  });
  if (errors.length) return problem(422, 'Invalid invoice', errors.join('; '));
  const reply = {
    customer: invoice.customer,
    currency: invoice.currency || 'EUR',
    lines: lines.length,
    total_cents: total,
  };
  return [200, 'application/json', Buffer.from(JSON.stringify(reply))];
}

// Whether nobody waits for this request's answer any more.
function deadlinePassed(props) {
  const now = Date.now();
  const deadline = Number((props.headers || {})['x-sb-deadline-ms']);
  if (Number.isFinite(deadline)) return deadline < now;
  const ttl = Number(props.expiration);
  if (props.timestamp !== undefined && Number.isFinite(ttl)) {
    // `timestamp` has whole seconds: allow the second it started in.
    return Number(props.timestamp) * 1000 + ttl + 999 < now;
  }
  return false;
}

const traceId = (tp) => (typeof tp === 'string' && tp.split('-').length === 4 ? tp.split('-')[1] : '-');

async function main() {
  const connection = await amqp.connect(AMQP_URL, {
    clientProperties: { connection_name: `${SERVICE}-worker-node` },
  });
  // Confirms: a reply is acked by the broker before its request is.
  const channel = await connection.createConfirmChannel();
  try {
    await channel.checkQueue(QUEUE);
  } catch {
    console.error(`queue ${QUEUE} does not exist: run \`switchboard declare\` or \`switchboard serve\` first`);
    process.exit(2);
  }
  await channel.prefetch(PREFETCH);
  // A mandatory reply whose caller's queue is gone comes back here: dropped.
  channel.on('return', (msg) => log(`call_id=${msg.properties.correlationId} the caller's reply queue is gone: reply dropped`));

  await channel.consume(QUEUE, async (msg) => {
    if (msg === null) return; // the queue was deleted
    const props = msg.properties;
    const callId = props.correlationId || '-';
    const traceparent = (props.headers || {}).traceparent;
    if (deadlinePassed(props)) {
      log(`call_id=${callId} trace_id=${traceId(traceparent)} expired: dropped`);
      channel.ack(msg);
      return;
    }
    let status, contentType, body;
    try {
      [status, contentType, body] = makeInvoice(msg.content);
    } catch (e) {
      // A bug, not the request's fault: give it back. A quorum queue counts
      // the delivery and dead-letters it past its limit; a classic queue
      // cannot count, so a second failure dead-letters it.
      log(`call_id=${callId} failed: ${e}`);
      const counted = 'x-delivery-count' in (props.headers || {});
      channel.reject(msg, counted || !msg.fields.redelivered);
      return;
    }
    if (props.replyTo) {
      const headers = { 'x-status': status };
      if (traceparent) headers.traceparent = traceparent;
      try {
        channel.publish('', props.replyTo, body, {
          correlationId: props.correlationId,
          contentType,
          headers,
          persistent: true,
          mandatory: true,
          appId: `${SERVICE}-worker-node`,
          timestamp: Math.floor(Date.now() / 1000),
        });
        await channel.waitForConfirms();
      } catch (e) {
        // Not confirmed: leave the request to be delivered again.
        log(`call_id=${callId} reply not confirmed (${e}): given back`);
        channel.reject(msg, true);
        return;
      }
    }
    log(`call_id=${callId} trace_id=${traceId(traceparent)} status=${status}`);
    channel.ack(msg);
  }, { noAck: false });
  log(`consuming ${QUEUE}`);

  const stop = async () => {
    log('stopping');
    // Requests in hand and not acked go back to the queue.
    await connection.close().catch(() => {});
    process.exit(0);
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
