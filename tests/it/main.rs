//! All integration tests in one binary, against the real RabbitMQ.
//!
//! Every test takes a [`common::Ctx`] with a name prefix of its own, so tests
//! run in parallel and never see each other's messages. When no broker
//! answers, the first test to look stops the whole run with one message.

mod common;

mod bench;
mod broker;
mod events;
mod interop;
mod rpc;
mod settings;
mod worker;
