//! HTTP gateway (being written).

pub mod streams;
