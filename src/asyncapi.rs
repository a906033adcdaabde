//! The AMQP contract as an AsyncAPI 3.0 document, generated from the
//! settings and the wire conventions, so that it cannot drift from what
//! switchboard declares, sends and reads. Served at `GET /asyncapi.json` and
//! printed by `switchboard asyncapi`; the contract a worker or caller in
//! another language implements (DESIGN.md, "Serving from another language").
//!
//! Every name comes from [`Names`], every header and property name and value
//! from [`wire`], every queue's options and arguments from [`topology`], and
//! the status document and problem schemas from the OpenAPI description's,
//! so a change there changes this document.
//!
//! # Layout
//! - [`document`]: the whole document for some settings.
//! - `Field`, `Message`: one property or header of an AMQP message, and
//!   a message as a list of them; adding a message (a progress report, an
//!   event type) is one more `Message` and its place in a channel.
//! - the per-service channels and operations, the shared reply and events
//!   channels, and the schemas they use.

use std::str::FromStr;

use deadpool_lapin::lapin::{
    ExchangeKind,
    types::{AMQPValue, FieldTable},
    uri::{AMQPScheme, AMQPUri},
};
use serde_json::{Map, Value, json};

use crate::amqp::{Names, topology, wire};
use crate::settings::{QueueType, ServiceSettings, Settings};

/// The AsyncAPI version of the document.
pub(crate) const ASYNCAPI_VERSION: &str = "3.0.0";
/// The version of the AMQP bindings used.
const AMQP_BINDING: &str = "0.3.0";

/// Where a field travels in an AMQP 0-9-1 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// A basic property (`correlation_id`, `reply_to`, `expiration`...).
    Property,
    /// An entry of the `headers` table (`x-status`, `traceparent`...).
    Header,
}

/// One property or header of a message, as the document describes it: in
/// the message's `headers` schema under its AMQP name, with `x-amqp` saying
/// whether it is a basic property or an entry of the headers table.
#[derive(Debug, Clone)]
pub(crate) struct Field {
    /// The property's or header's name, as on the wire.
    pub name: &'static str,
    /// Property or header.
    pub slot: Slot,
    /// Its JSON schema (type, enum, const...).
    pub schema: Value,
    /// What it means and who sets it.
    pub description: String,
    /// Whether the message always has it.
    pub required: bool,
}

impl Field {
    fn property(name: &'static str, schema: Value, description: impl Into<String>) -> Self {
        Self {
            name,
            slot: Slot::Property,
            schema,
            description: description.into(),
            required: false,
        }
    }

    fn header(name: &'static str, schema: Value, description: impl Into<String>) -> Self {
        Self {
            slot: Slot::Header,
            ..Self::property(name, schema, description)
        }
    }

    fn required(mut self) -> Self {
        self.required = true;
        self
    }

    /// The field's schema with its description and where it travels.
    fn to_schema(&self) -> Value {
        let mut schema = self.schema.clone();
        if let Value::Object(o) = &mut schema {
            o.insert("description".into(), self.description.clone().into());
            let slot = match self.slot {
                Slot::Property => "property",
                Slot::Header => "header",
            };
            o.insert("x-amqp".into(), slot.into());
        }
        schema
    }
}

/// One message of the document: its properties and headers, its body.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    /// The key under `components.messages`.
    pub key: String,
    /// A short title.
    pub title: String,
    /// What it is, in a line.
    pub summary: String,
    /// Its content type (`content_type` property).
    pub content_type: &'static str,
    /// Its properties and headers.
    pub fields: Vec<Field>,
    /// The body's schema.
    pub payload: Value,
    /// The AMQP `type` property, when fixed.
    pub message_type: Option<String>,
}

impl Message {
    /// The message object.
    fn to_json(&self) -> Value {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for f in &self.fields {
            properties.insert(f.name.into(), f.to_schema());
            if f.required {
                required.push(Value::from(f.name));
            }
        }
        let mut headers = json!({
            "type": "object",
            "description": "The message's AMQP basic properties and `headers` table entries, by their wire names; `x-amqp` says which each is.",
            "properties": properties,
        });
        if !required.is_empty() {
            headers["required"] = Value::Array(required);
        }
        let mut m = json!({
            "name": self.key,
            "title": self.title,
            "summary": self.summary,
            "contentType": self.content_type,
            "headers": headers,
            "payload": self.payload,
        });
        if self.fields.iter().any(|f| f.name == "correlation_id") {
            m["correlationId"] = json!({"$ref": "#/components/correlationIds/callId"});
        }
        let mut amqp = json!({"bindingVersion": AMQP_BINDING});
        if let Some(t) = &self.message_type {
            amqp["messageType"] = t.clone().into();
        }
        m["bindings"] = json!({ "amqp": amqp });
        m
    }
}

/// Schema of a string property.
fn string() -> Value {
    json!({"type": "string"})
}

fn app_id(who: &str) -> Field {
    Field::property(
        "app_id",
        string(),
        format!(
            "`{}` on what switchboard publishes{who}; informational.",
            wire::APP_ID
        ),
    )
}

fn timestamp() -> Field {
    Field::property(
        "timestamp",
        json!({"type": "integer", "minimum": 0}),
        "When it was published, in seconds since the Unix epoch (AMQP timestamps have whole seconds).",
    )
}

fn delivery_mode() -> Field {
    Field::property(
        "delivery_mode",
        json!({"type": "integer", "enum": [1, wire::PERSISTENT]}),
        format!(
            "{} (persistent) on what switchboard publishes, so it survives a broker restart.",
            wire::PERSISTENT
        ),
    )
}

fn traceparent(what: &str) -> Field {
    Field::header(
        wire::HEADER_TRACEPARENT,
        json!({"type": "string", "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"}),
        format!("W3C trace context (a long string). {what}"),
    )
}

/// What a caller sends and a worker receives (DESIGN.md, "Request").
pub(crate) fn request_fields(service: &str, svc: &ServiceSettings) -> Vec<Field> {
    vec![
        Field::property(
            "content_type",
            string(),
            format!(
                "The payload's media type, as the caller set it (`{}` by default).",
                wire::CONTENT_JSON
            ),
        ),
        Field::property(
            "correlation_id",
            string(),
            "The call id. The reply carries it back unchanged.",
        )
        .required(),
        Field::property(
            "reply_to",
            string(),
            "Where the reply goes: publish it to the default exchange (\"\") with this as the routing key. Absent: the caller wants no reply.",
        ),
        Field::property(
            "message_id",
            string(),
            "The idempotency key (the call id unless the caller gave one): the same on every redelivery and on a repeated publish, so a worker can answer a request once.",
        ),
        Field::property(
            "expiration",
            json!({"type": "string", "pattern": "^[0-9]+$"}),
            format!(
                "Milliseconds from publishing until the call's deadline (the service's timeout, {} ms for {service}); the broker drops a request still queued then.",
                svc.timeout_ms
            ),
        ),
        Field::property(
            "type",
            json!({"type": "string", "const": service}),
            "The service's name.",
        ),
        app_id(" (other callers may set their own)"),
        timestamp(),
        delivery_mode(),
        traceparent("Continue the trace from it, and send it on in the reply."),
        Field::header(
            wire::HEADER_DEADLINE,
            json!({"type": "integer", "minimum": 0}),
            "The call's deadline in ms since the Unix epoch (a long-long integer). A worker drops (acks without a reply) a request whose deadline has passed: nobody waits for its answer. Absent: `timestamp` + `expiration` tell the same, to the second.",
        ),
        Field::header(
            wire::HEADER_ACCEPTS_PROGRESS,
            json!({"type": "boolean"}),
            format!(
                "True when the caller reads progress reports on `reply_to` (every switchboard caller): a worker may then send them (messages with the header `{}`) before the reply. Absent (a plain RPC client): send the reply only.",
                wire::HEADER_PROGRESS
            ),
        ),
        Field::header(
            wire::HEADER_CALLER_WAITS,
            json!({"type": "boolean"}),
            "True when the caller waits for the reply in memory (a library `call`, a synchronous HTTP call): a worker may then send the reply transient (`delivery_mode` 1), not mandatory, and ack the request as soon as the reply is written, without waiting for its confirm. Absent (a call that may outlive its caller, a plain RPC client): a persistent reply, acked after its confirm.",
        ),
    ]
}

/// A progress report a worker sends to `reply_to` before the reply
/// (DESIGN.md, "Progress").
pub(crate) fn progress_fields() -> Vec<Field> {
    vec![
        Field::property(
            "correlation_id",
            string(),
            "The request's `correlation_id`, unchanged.",
        )
        .required(),
        Field::property(
            "content_type",
            string(),
            "The note's media type: UTF-8 text.",
        ),
        Field::header(
            wire::HEADER_PROGRESS,
            json!({"type": "number", "minimum": 0, "maximum": 1}),
            "Makes the message a progress report, never the reply: the fraction of the work done, from 0 to 1 (an AMQP float or double, 0 or 1 as an integer, or a decimal string). A report outside 0 to 1 is dropped; one that comes after the reply is dropped.",
        )
        .required(),
        traceparent("The request's, passed on."),
        app_id(" (workers in other languages may set their own)"),
        timestamp(),
    ]
}

/// What a worker sends back to `reply_to` (DESIGN.md, "Reply").
pub(crate) fn reply_fields(error: bool) -> Vec<Field> {
    let status = if error {
        json!({"type": "integer", "minimum": 400, "maximum": 599})
    } else {
        json!({"type": "integer", "minimum": 100, "maximum": 399, "default": 200})
    };
    let mut status_field = Field::header(
        wire::HEADER_STATUS,
        status,
        "The reply's HTTP-style status: an integer (any AMQP integer type, or a decimal string) from 100 to 599, 200 when absent. 400 and above is an error, whose body is problem+json. The gateway answers HTTP with it.",
    );
    if error {
        status_field = status_field.required();
    }
    vec![
        Field::property(
            "correlation_id",
            string(),
            "The request's `correlation_id`, unchanged: it is how the caller finds its call.",
        )
        .required(),
        Field::property(
            "content_type",
            if error {
                json!({"type": "string", "const": wire::CONTENT_PROBLEM})
            } else {
                string()
            },
            "The reply body's media type (`application/octet-stream` when absent).",
        ),
        status_field,
        traceparent("The request's, passed on (or the worker's own span in the same trace)."),
        app_id(" (workers in other languages may set their own)"),
        timestamp(),
        delivery_mode(),
    ]
}

/// The properties of a CloudEvent on the events exchange.
fn event_fields(event_type: Option<&str>) -> Vec<Field> {
    vec![
        Field::property(
            "content_type",
            json!({"type": "string", "const": wire::CONTENT_CLOUDEVENTS}),
            "CloudEvents structured mode: the body is the whole event.",
        ),
        Field::property("message_id", string(), "The event's `id`."),
        Field::property(
            "type",
            match event_type {
                Some(t) => json!({"type": "string", "const": t}),
                None => string(),
            },
            "The event's `type`, so a subscriber can filter without reading the body.",
        ),
        app_id(""),
        timestamp(),
        delivery_mode(),
        traceparent("The event's `traceparent` extension, when it has one."),
    ]
}

/// The request message of `service`.
fn request_message(service: &str, svc: &ServiceSettings) -> Message {
    Message {
        key: format!("{service}.request"),
        title: format!("Request to {service}"),
        summary: format!(
            "A call of {service}: the caller's payload, untouched, with its content type."
        ),
        content_type: wire::CONTENT_JSON,
        fields: request_fields(service, svc),
        payload: json!({"description": "The caller's payload, passed through untouched (any content type)."}),
        message_type: Some(service.to_owned()),
    }
}

/// What a worker may send to a request's `reply_to`: the reply, and the
/// problem+json error. (A message added here is on the replies channel and
/// among the replies of every call and serve operation.)
fn reply_messages() -> Vec<Message> {
    vec![
        Message {
            key: "reply".into(),
            title: "Reply".into(),
            summary: "The answer to a request, with `x-status` below 400 (200 when absent)."
                .into(),
            content_type: wire::CONTENT_JSON,
            fields: reply_fields(false),
            payload: json!({"description": "The service's answer, in its own content type."}),
            message_type: None,
        },
        Message {
            key: "errorReply".into(),
            title: "Error reply".into(),
            summary: "A request the service refuses or cannot answer: `x-status` 400 to 599 and an RFC 9457 problem+json body.".into(),
            content_type: wire::CONTENT_PROBLEM,
            fields: reply_fields(true),
            payload: json!({"$ref": "#/components/schemas/Problem"}),
            message_type: None,
        },
        Message {
            key: "progress".into(),
            title: "Progress report".into(),
            summary: format!(
                "How far a request is, sent before its reply when the request carries `{}`: the header `{}` and an optional note as the body. It never ends the call.",
                wire::HEADER_ACCEPTS_PROGRESS,
                wire::HEADER_PROGRESS
            ),
            content_type: wire::CONTENT_TEXT,
            fields: progress_fields(),
            payload: json!({"type": "string", "maxLength": wire::MAX_PROGRESS_NOTE, "description": "A note on the work (UTF-8 text; empty: none)."}),
            message_type: None,
        },
    ]
}

/// Any CloudEvent, and one message per call lifecycle event type.
fn event_messages() -> Vec<Message> {
    let mut out = vec![Message {
        key: "event".into(),
        title: "Event".into(),
        summary: "A CloudEvent 1.0 in structured JSON mode: services' domain events and the calls' lifecycle.".into(),
        content_type: wire::CONTENT_CLOUDEVENTS,
        fields: event_fields(None),
        payload: json!({"$ref": "#/components/schemas/CloudEvent"}),
        message_type: None,
    }];
    for (ty, summary) in wire::CALL_LIFECYCLE_EVENTS {
        out.push(Message {
            key: (*ty).to_owned(),
            title: (*ty).to_owned(),
            summary: (*summary).to_owned(),
            content_type: wire::CONTENT_CLOUDEVENTS,
            fields: event_fields(Some(ty)),
            payload: json!({
                "allOf": [
                    {"$ref": "#/components/schemas/CloudEvent"},
                    {
                        "type": "object",
                        "required": ["subject", "data"],
                        "properties": {
                            "type": {"const": ty},
                            "source": {"type": "string", "description": "The gateway that brokered the call: `switchboard/<instance>`."},
                            "subject": {"type": "string", "description": "The call id."},
                            "data": {"$ref": "#/components/schemas/StatusDocument"},
                        },
                    },
                ],
            }),
            message_type: Some((*ty).to_owned()),
        });
    }
    out
}

/// A table of AMQP arguments as JSON.
fn arguments(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), amqp_value(v)))
            .collect(),
    )
}

fn amqp_value(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => (*b).into(),
        AMQPValue::ShortShortInt(i) => (*i).into(),
        AMQPValue::ShortShortUInt(i) => (*i).into(),
        AMQPValue::ShortInt(i) => (*i).into(),
        AMQPValue::ShortUInt(i) => (*i).into(),
        AMQPValue::LongInt(i) => (*i).into(),
        AMQPValue::LongUInt(i) => (*i).into(),
        AMQPValue::LongLongInt(i) => (*i).into(),
        AMQPValue::ShortString(s) => s.as_str().into(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned().into(),
        other => format!("{other:?}").into(),
    }
}

fn exchange_type(kind: &ExchangeKind) -> String {
    match kind {
        ExchangeKind::Direct => "direct".into(),
        ExchangeKind::Fanout => "fanout".into(),
        ExchangeKind::Headers => "headers".into(),
        ExchangeKind::Topic => "topic".into(),
        ExchangeKind::Custom(c) => c.clone(),
    }
}

/// The AMQP binding of a channel on a queue switchboard declares.
fn queue_binding(name: &str, vhost: &str, args: &FieldTable, bound: Value) -> Value {
    let opts = topology::durable_queue();
    json!({
        "amqp": {
            "is": "queue",
            "queue": {
                "name": name,
                "durable": opts.durable,
                "exclusive": opts.exclusive,
                "autoDelete": opts.auto_delete,
                "vhost": vhost,
            },
            "x-arguments": arguments(args),
            "x-bindings": bound,
            "bindingVersion": AMQP_BINDING,
        }
    })
}

/// The AMQP binding of a channel that publishes to `exchange`.
fn exchange_binding(exchange: &str, kind: &ExchangeKind, vhost: &str) -> Value {
    let opts = topology::durable_exchange();
    json!({
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": exchange,
                "type": exchange_type(kind),
                "durable": opts.durable,
                "autoDelete": opts.auto_delete,
                "vhost": vhost,
            },
            "bindingVersion": AMQP_BINDING,
        }
    })
}

fn reference(path: &str) -> Value {
    json!({ "$ref": path })
}

/// Keys of a channel's messages: each refers to the component of that key.
fn channel_messages<'a>(keys: impl IntoIterator<Item = &'a str>) -> Value {
    Value::Object(
        keys.into_iter()
            .map(|k| {
                (
                    k.to_owned(),
                    reference(&format!("#/components/messages/{k}")),
                )
            })
            .collect(),
    )
}

/// The reply of an operation whose requests carry `reply_to`.
fn reply_of_request() -> Value {
    json!({
        "address": {
            "description": "The request's `reply_to`: publish the reply to the default exchange with it as the routing key.",
            "location": "$message.header#/reply_to",
        },
        "channel": reference("#/channels/replies"),
        "messages": reply_messages()
            .iter()
            .map(|m| reference(&format!("#/channels/replies/messages/{}", m.key)))
            .collect::<Vec<_>>(),
    })
}

/// The broker's address from `amqp.url`, without its user or password.
fn server(settings: &Settings) -> (Value, String) {
    let uri = AMQPUri::from_str(settings.amqp.first_node()).ok();
    let vhost = uri
        .as_ref()
        .map(|u| u.vhost.clone())
        .unwrap_or_else(|| "/".into());
    let (host, protocol) = match &uri {
        Some(u) => (
            format!("{}:{}", u.authority.host, u.authority.port),
            match u.scheme {
                AMQPScheme::AMQPS => "amqps",
                AMQPScheme::AMQP => "amqp",
            },
        ),
        None => ("127.0.0.1:5672".into(), "amqp"),
    };
    let server = json!({
        "host": host,
        "protocol": protocol,
        "protocolVersion": "0.9.1",
        "description": format!("The RabbitMQ broker of `amqp.url`, vhost `{vhost}`."),
        "security": [reference("#/components/securitySchemes/user")],
    });
    (server, vhost)
}

/// The JSON schema of a CloudEvent as switchboard publishes and reads it.
fn cloud_event_schema() -> Value {
    json!({
        "type": "object",
        "description": "CloudEvents 1.0, structured JSON mode.",
        "required": ["specversion", "id", "source", "type"],
        "properties": {
            "specversion": {"type": "string", "const": "1.0"},
            "id": {"type": "string", "description": "Unique per source."},
            "source": {"type": "string", "description": "Who emitted it (a URI reference)."},
            "type": {"type": "string", "description": "The event type, e.g. `orders.created`; `switchboard.call.*` for the calls' lifecycle."},
            "subject": {"type": "string", "description": "What it is about (the call id for lifecycle events)."},
            "time": {"type": "string", "format": "date-time"},
            "datacontenttype": {"type": "string"},
            "data": {"description": "The payload."},
            "traceparent": {"type": "string", "description": "W3C trace context (distributed tracing extension)."},
            (wire::EXT_CALLER): {"type": "string", "description": "Lifecycle events: the caller (token name) that made the call; event streams show each caller only its own."},
        },
    })
}

/// The schemas the documents share with the OpenAPI description.
fn shared_schemas() -> Map<String, Value> {
    use utoipa::OpenApi;
    let openapi = crate::gateway::openapi::ApiDoc::openapi();
    let mut out = Map::new();
    if let Some(components) = openapi.components {
        for name in [
            "StatusDocument",
            "ResultDocument",
            "CallbackDocument",
            "AttemptDocument",
            "Problem",
        ] {
            if let Some(schema) = components.schemas.get(name)
                && let Ok(v) = serde_json::to_value(schema)
            {
                out.insert(name.into(), v);
            }
        }
    }
    out
}

/// The AsyncAPI document of the AMQP side for `settings`: per service its
/// request channel and queue (bindings, arguments), dead-letter queue, the
/// operations of a caller and of a worker, and the messages with every
/// property and header switchboard reads or writes; the replies; the events
/// exchange with its CloudEvents, and the events log that keeps them.
pub fn document(settings: &Settings) -> Value {
    let names = Names::new(settings.amqp.prefix.clone());
    let (server, vhost) = server(settings);
    let exchanges = topology::shared_exchanges(&names);
    let [requests, dead, events] = &exchanges;
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    for m in reply_messages().iter().chain(event_messages().iter()) {
        messages.insert(m.key.clone(), m.to_json());
    }
    for (service, svc) in &settings.services {
        let request = request_message(service, svc);
        messages.insert(request.key.clone(), request.to_json());
        let queue = names.service_queue(service);
        let dead_queue = names.dead_queue(service);
        let redelivery = match svc.queue_type {
            QueueType::Quorum => format!(
                "The queue counts deliveries: a request given back past its delivery limit (`x-delivery-limit` = {}) is dead-lettered.",
                svc.delivery_limit
            ),
            QueueType::Classic => "A classic queue does not count deliveries: a worker rejects without requeue (to the dead letters) a request that fails again after a redelivery.".to_owned(),
        };
        let served_by = match svc.handler {
            Some(_) => "a built-in handler of `switchboard serve`",
            None => "workers outside switchboard",
        };
        channels.insert(
            format!("{service}.requests"),
            json!({
                "address": service,
                "title": format!("Calls of {service}"),
                "description": format!("Publish a request of {service} to the exchange `{}` with routing key `{service}` (or to the default exchange with routing key `{queue}`), mandatory, so that a request nothing takes comes back instead of vanishing.", requests.0),
                "messages": channel_messages([request.key.as_str()]),
                "bindings": exchange_binding(&requests.0, &requests.1, &vhost),
            }),
        );
        channels.insert(
            format!("{service}.queue"),
            json!({
                "address": queue,
                "title": format!("Work queue of {service}"),
                "description": format!("The queue workers of {service} consume (served by {served_by}); `switchboard serve` and `switchboard declare` declare it with exactly these arguments: a worker only consumes it. {redelivery}"),
                "messages": channel_messages([request.key.as_str()]),
                "bindings": queue_binding(
                    &queue,
                    &vhost,
                    &topology::service_queue_arguments(&names, service, svc),
                    json!([{"exchange": requests.0, "routingKey": service}]),
                ),
            }),
        );
        channels.insert(
            format!("{service}.deadLetters"),
            json!({
                "address": dead_queue,
                "title": format!("Dead letters of {service}"),
                "description": format!("Requests of {service} rejected without requeue, past the delivery limit, or expired in the queue, routed by `{}` with routing key `{service}`; they wait here for an operator.", dead.0),
                "messages": channel_messages([request.key.as_str()]),
                "bindings": queue_binding(
                    &dead_queue,
                    &vhost,
                    &topology::dead_queue_arguments(svc.queue_type),
                    json!([{"exchange": dead.0, "routingKey": service}]),
                ),
            }),
        );
        operations.insert(
            format!("{service}.call"),
            json!({
                "action": "send",
                "title": format!("Call {service}"),
                "summary": format!("What a caller does: publish a request of {service}, then read the reply from its `reply_to` by `correlation_id`."),
                "channel": reference(&format!("#/channels/{service}.requests")),
                "messages": [reference(&format!("#/channels/{service}.requests/messages/{}", request.key))],
                "reply": reply_of_request(),
                "bindings": {"amqp": {
                    "expiration": svc.timeout_ms,
                    "deliveryMode": wire::PERSISTENT,
                    "mandatory": true,
                    "timestamp": true,
                    "bindingVersion": AMQP_BINDING,
                }},
                "tags": [{"name": "caller"}],
            }),
        );
        operations.insert(
            format!("{service}.serve"),
            json!({
                "action": "receive",
                "title": format!("Serve {service}"),
                "summary": format!("What a worker of {service} does: consume the queue with manual acks and a prefetch, answer each request to its `reply_to`, then ack."),
                "description": WORKER_CONVENTIONS,
                "channel": reference(&format!("#/channels/{service}.queue")),
                "messages": [reference(&format!("#/channels/{service}.queue/messages/{}", request.key))],
                "reply": reply_of_request(),
                "bindings": {"amqp": {"ack": true, "bindingVersion": AMQP_BINDING}},
                "tags": [{"name": "worker"}],
            }),
        );
        operations.insert(
            format!("{service}.deadLetters"),
            json!({
                "action": "receive",
                "title": format!("Inspect dead letters of {service}"),
                "summary": "What an operator (or the gateway's dead-letter watch) reads: requests that were never answered.",
                "channel": reference(&format!("#/channels/{service}.deadLetters")),
                "messages": [reference(&format!("#/channels/{service}.deadLetters/messages/{}", request.key))],
                "tags": [{"name": "operator"}],
            }),
        );
    }
    let replies = reply_messages();
    channels.insert(
        "replies".into(),
        json!({
            "address": null,
            "title": "Replies",
            "description": format!("Each request's `reply_to`: a queue of the caller's (a tutorial-6 client's exclusive server-named queue; switchboard's `{}`), or RabbitMQ's direct reply-to `{}`. Published to the default exchange with the address as routing key, mandatory: a reply whose caller is gone comes back and is dropped.", names.reply_queue("<instance>"), wire::DIRECT_REPLY_TO),
            "messages": channel_messages(replies.iter().map(|m| m.key.as_str())),
            "bindings": {"amqp": {
                "is": "routingKey",
                "exchange": {"name": "", "type": "default", "vhost": vhost},
                "bindingVersion": AMQP_BINDING,
            }},
        }),
    );
    let event_keys: Vec<Message> = event_messages();
    channels.insert(
        "events".into(),
        json!({
            "address": events.0,
            "title": "Events",
            "description": format!("The fanout exchange `{}`: every subscriber binds a queue of its own (temporary, or durable to keep events while away) and receives every event.", events.0),
            "messages": channel_messages(event_keys.iter().map(|m| m.key.as_str())),
            "bindings": exchange_binding(&events.0, &events.1, &vhost),
        }),
    );
    let (by_type, by_type_kind) = topology::events_types_exchange(&names);
    channels.insert(
        "eventsByType".into(),
        json!({
            "address": by_type,
            "title": "Events by type",
            "description": format!("The direct exchange `{by_type}`, bound to `{}` (an exchange-to-exchange binding), so every event reaches it with its routing key, its CloudEvent type: a queue bound to it with a type as key receives only the events of that type. Events published without their type as key reach it with the empty key. Declared, with its binding, by switchboard's workers, whose cancellation watch binds `{}` here.", events.0, wire::EVENT_CALL_CANCELLED),
            "messages": channel_messages(event_keys.iter().map(|m| m.key.as_str())),
            "bindings": exchange_binding(&by_type, &by_type_kind, &vhost),
        }),
    );
    let log = names.events_log();
    channels.insert(
        "eventsLog".into(),
        json!({
            "address": log,
            "title": "Events log",
            "description": format!("The stream queue `{log}`, bound to `{}`: every event within the retention (`amqp.events_log_max_age`, `amqp.events_log_max_bytes`), in order, for any number of readers; nothing is removed by reading. Its offsets are the positions (`id`, `Last-Event-ID`) of the gateway's `/v1/events`. Read it with a prefetch and manual acks (acks only move the credit on), saying where to start with the consume argument `{}`: `first`, `last`, `next`, an offset or a timestamp; each delivery carries its offset in the header of the same name. RabbitMQ may deliver from the start of the chunk holding the offset asked for: skip lower offsets.", events.0, wire::HEADER_STREAM_OFFSET),
            "messages": channel_messages(event_keys.iter().map(|m| m.key.as_str())),
            "bindings": queue_binding(
                &log,
                &vhost,
                &topology::events_log_arguments(&settings.amqp.events_log()),
                json!([{"exchange": events.0, "routingKey": ""}]),
            ),
        }),
    );
    let event_refs: Vec<Value> = event_keys
        .iter()
        .map(|m| reference(&format!("#/channels/events/messages/{}", m.key)))
        .collect();
    let by_type_refs: Vec<Value> = event_keys
        .iter()
        .map(|m| reference(&format!("#/channels/eventsByType/messages/{}", m.key)))
        .collect();
    let log_refs: Vec<Value> = event_keys
        .iter()
        .map(|m| reference(&format!("#/channels/eventsLog/messages/{}", m.key)))
        .collect();
    operations.insert(
        "events.replay".into(),
        json!({
            "action": "receive",
            "title": "Replay the events log",
            "summary": "Consume the events log from any offset (or time) on: what was published while you were away, within the retention, then live events.",
            "channel": reference("#/channels/eventsLog"),
            "messages": log_refs,
            "tags": [{"name": "events"}],
        }),
    );
    operations.insert(
        "events.publish".into(),
        json!({
            "action": "send",
            "title": "Publish events",
            "summary": "Publish a CloudEvent to the events exchange (persistent, confirmed), with its type as routing key: the fanout ignores the key, and the events-by-type exchange routes on it (an event published without it reaches only the queues bound there with the empty key). Services publish their own domain events; the gateway publishes the calls' lifecycle.",
            "channel": reference("#/channels/events"),
            "messages": event_refs,
            "tags": [{"name": "events"}],
        }),
    );
    operations.insert(
        "events.subscribe".into(),
        json!({
            "action": "receive",
            "title": "Subscribe to events",
            "summary": "Bind a queue of your own to the events exchange and consume it.",
            "channel": reference("#/channels/events"),
            "messages": event_refs,
            "tags": [{"name": "events"}],
        }),
    );
    operations.insert(
        "events.subscribeByType".into(),
        json!({
            "action": "receive",
            "title": "Subscribe to events of some types",
            "summary": "Bind a queue of your own to the events-by-type exchange with each type you want as key, and consume it: the other events are not sent to it.",
            "channel": reference("#/channels/eventsByType"),
            "messages": by_type_refs,
            "tags": [{"name": "events"}],
        }),
    );
    let mut schemas = shared_schemas();
    schemas.insert("CloudEvent".into(), cloud_event_schema());
    json!({
        "asyncapi": ASYNCAPI_VERSION,
        "id": format!("urn:switchboard:{}", names.prefix()),
        "info": {
            "title": "switchboard AMQP contract",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!("How to call and serve the services of this switchboard deployment over AMQP 0-9-1 (names under the prefix `{}`), generated from its settings. The HTTP side is described at `/openapi.json`.\n\n{WORKER_CONVENTIONS}", names.prefix()),
        },
        "defaultContentType": wire::CONTENT_JSON,
        "servers": {"rabbitmq": server},
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "correlationIds": {
                "callId": {
                    "description": "The call id: the request's `correlation_id`, echoed by its reply.",
                    "location": "$message.header#/correlation_id",
                },
            },
            "securitySchemes": {
                "user": {
                    "type": "userPassword",
                    "description": "The user and password of the AMQP URL (RabbitMQ's `guest` may only log in from localhost).",
                },
            },
        },
    })
}

/// What every worker must do, whatever its language (DESIGN.md).
pub(crate) const WORKER_CONVENTIONS: &str = "A worker of a service: consumes its queue (never declares it: switchboard does, with its arguments) with manual acks and a prefetch; for each request, drops it (ack, no reply) when `x-sb-deadline-ms` (else `timestamp` + `expiration`) has passed; otherwise answers to `reply_to` through the default exchange with the same `correlation_id`, its content type, the header `x-status` (200 when absent; 400 and above with an `application/problem+json` body for errors) and the request's `traceparent`; acks only once the reply is published (confirmed; for a request with `x-sb-caller-waits`, it may send the reply transient and ack once it is written), so a worker that dies mid-request leaves it to be delivered again. A request it cannot handle now is rejected with requeue (a quorum queue counts it towards the delivery limit, then dead-letters it); one it never can is answered with an error status. While it works it may send progress reports to `reply_to` (header `x-sb-progress`, 0 to 1, and a text note) when the request carries `x-sb-accepts-progress`; and it may watch for `switchboard.call.cancelled` (`subject` = the call id), through a queue bound to the events-by-type exchange with that key (or to the events exchange, receiving every event), to drop a request not yet begun (ack, no reply) and stop a running one.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_header_of_the_wire_conventions_is_described() {
        let s = Settings::load_from(None, None, Vec::new()).unwrap();
        let doc = document(&s);
        let request = &doc["components"]["messages"]["echo.request"]["headers"]["properties"];
        for name in [
            wire::HEADER_TRACEPARENT,
            wire::HEADER_DEADLINE,
            "correlation_id",
            "reply_to",
            "expiration",
            "message_id",
            "type",
            "app_id",
            "timestamp",
            "content_type",
        ] {
            assert!(request.get(name).is_some(), "request lacks {name}");
        }
        assert!(request.get(wire::HEADER_ACCEPTS_PROGRESS).is_some());
        let progress = &doc["components"]["messages"]["progress"];
        assert!(progress["headers"]["properties"][wire::HEADER_PROGRESS].is_object());
        assert!(
            doc["components"]["messages"][wire::EVENT_CALL_CANCELLED].is_object()
                && doc["components"]["messages"][wire::EVENT_CALL_PROGRESS].is_object()
        );
        let error = &doc["components"]["messages"]["errorReply"];
        assert_eq!(error["contentType"], wire::CONTENT_PROBLEM);
        assert!(error["headers"]["properties"][wire::HEADER_STATUS].is_object());
        assert_eq!(
            error["payload"]["$ref"], "#/components/schemas/Problem",
            "{error}"
        );
        assert!(doc["components"]["schemas"]["StatusDocument"].is_object());
        assert!(doc["components"]["schemas"]["Problem"].is_object());
    }

    #[test]
    fn no_password_of_the_amqp_url_appears() {
        let env = vec![(
            "SWITCHBOARD__AMQP__URL".to_owned(),
            "amqps://app:s3cr3t-pw@rabbit.example:5671/prod".to_owned(),
        )];
        let s = Settings::load_from(None, None, env).unwrap();
        let text = document(&s).to_string();
        assert!(!text.contains("s3cr3t-pw"));
        assert!(text.contains("rabbit.example:5671"));
        assert!(text.contains("\"amqps\""));
    }
}
