//! All integration tests in one binary, against the real RabbitMQ.
//!
//! Every test takes a [`common::Ctx`] with a name prefix of its own, so tests
//! run in parallel and never see each other's messages. When no broker
//! answers, the first test to look stops the whole run with one message.

mod common;
mod toolchains;

mod asyncapi;
mod bench;
mod broker;
mod callback_ops;
mod callbacks;
mod cancel;
mod configuration;
mod consumers;
mod declare;
mod dependents;
mod deploy;
mod events;
mod events_log;
mod examples;
mod faults;
mod gateway;
mod hostile;
mod hub;
mod instances;
mod interop;
mod management;
mod metrics;
mod parsing;
mod progress;
mod rpc;
mod security;
mod settings;
mod store;
mod trace;
mod worker;
