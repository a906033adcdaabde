//! switchboard: every interaction style between synchronous and
//! asynchronous, over RabbitMQ.
//!
//! Actix actors consume AMQP work queues and run handlers ([`worker`]); an
//! RPC client emulates request/response with correlation ids and reply
//! queues ([`rpc`]); a fanout exchange broadcasts CloudEvents ([`events`]).
//! The wire conventions of DESIGN.md live in [`amqp::wire`].
//!
//! # The front door
//! What an application needs is re-exported here: [`Settings`] to load the
//! configuration, [`Broker`] to connect, [`Worker`] to serve a service with
//! a [`Handler`] (a [`Request`] in, a [`Reply`] or [`HandlerError`] out),
//! [`RpcClient`] to send a [`Call`], [`CloudEvent`] and [`Subscription`]
//! for events, [`start_gateway`] for the HTTP gateway, and [`Error`]. The
//! modules below hold the rest (their options, the wire conventions, the
//! parts the gateway and the command line are built of); README.md's
//! library example is compiled as a test of this crate.
//!
//! Modules and items are private unless an application needs them
//! (`#![warn(unreachable_pub)]` keeps a `pub` from leaking out of a private
//! module). A module kept public for more than its front-door types says
//! why in its own documentation: [`amqp::wire`] and [`amqp::topology`]
//! (the contract a worker in another language follows), [`amqp::consumer`]
//! (supervised consumers of an application's own queues), [`calls`] (the
//! call store, readable beside a gateway), [`events::hub`] and
//! [`gateway::streams`] (relaying the events fanout to streams an
//! application serves itself). What the integration tests need of a
//! running gateway, they get through [`RunningGateway`]'s accessors, as an
//! application would.
//!
//! # Layout
//! - [`settings`]: typed settings (defaults, file, environment).
//! - [`calls`]: the call store (SQLite or PostgreSQL) and the status document.
//! - [`amqp`]: the broker face (pool, topology, confirmed publishing, wire conventions).
//! - `message`: the [`Request`] and [`Reply`] that rpc and worker share.
//! - [`worker`]: the worker actor and the handler API.
//! - [`rpc`]: the RPC client and its reply-router actor.
//! - [`events`]: CloudEvents broadcast and subscription, and the hub relaying them to streams.
//! - [`gateway`]: the HTTP gateway (sync, bounded wait, polling, callbacks, SSE/WebSocket streams).
//! - [`callbacks`]: signed delivery of results to callback URLs, with retries.
//! - [`app`]: `serve` and `declare`: the configured services' topology and workers.
//! - [`asyncapi`]: the AMQP contract as an AsyncAPI 3.0 document.
//! - [`telemetry`]: logging and trace context.
//! - [`management`]: RabbitMQ's management API, for `switchboard status`.
//! - `metrics`: the Prometheus metrics of every part, and their exposition.
//! - `error`: the library's error type.
//!
//! The load generator (`switchboard bench`) is a crate beside this one,
//! `switchboard-bench` (`bench/`), built on the public API above.

#![warn(missing_docs, unreachable_pub)]

pub mod amqp;
pub mod app;
pub mod asyncapi;
pub mod callbacks;
pub mod calls;
mod error;
pub mod events;
pub mod gateway;
pub mod management;
mod message;
mod metrics;
pub mod rpc;
pub mod settings;
pub mod telemetry;
pub mod worker;

pub use amqp::Broker;
pub use error::{Error, Result, Unreachable};
pub use events::{CloudEvent, SubscribeOptions, Subscription};
pub use gateway::{RunningGateway, start as start_gateway};
pub use message::{Reply, Request};
pub use rpc::{Call, PendingReply, RpcClient, RpcOptions};
pub use settings::Settings;
pub use worker::{Handler, HandlerError, Worker, WorkerHandle};

/// The lapin switchboard is built on, with the vendored AMQP parser under
/// it (vendor/README.md). Applications use this one: a lapin of their own
/// from crates.io would be a second copy, with crates.io's parser and types
/// that are not switchboard's.
pub use deadpool_lapin::lapin;

/// README.md's code, compiled by `cargo test` (its library example is
/// `no_run`: it needs a broker and an `echo` service in the settings).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
