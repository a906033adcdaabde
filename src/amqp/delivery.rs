//! [`InFlight`]: a delivery that must be settled exactly once. `ack`,
//! `requeue` and `dead_letter` consume it, so a second settlement does not
//! compile.

use deadpool_lapin::lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicRejectOptions},
};

use crate::error::Result;

/// A delivery not yet acked or rejected.
#[derive(Debug)]
pub struct InFlight {
    delivery: Delivery,
}

impl InFlight {
    /// Wraps a delivery taken from a consumer.
    pub fn new(delivery: Delivery) -> Self {
        Self { delivery }
    }

    /// Takes the body out (without copying it); the delivery keeps the rest.
    pub fn take_payload(&mut self) -> bytes::Bytes {
        bytes::Bytes::from(std::mem::take(&mut self.delivery.data))
    }

    /// The delivery, to read.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// Done: the broker forgets the message.
    pub async fn ack(self) -> Result<()> {
        self.delivery
            .acker
            .ack(BasicAckOptions { multiple: false })
            .await?;
        Ok(())
    }

    /// Not done: the broker delivers it again (a quorum queue counts it
    /// towards `x-delivery-limit`).
    pub async fn requeue(self) -> Result<()> {
        self.delivery
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await?;
        Ok(())
    }

    /// Given up: the broker dead-letters it to the queue's dead-letter exchange.
    pub async fn dead_letter(self) -> Result<()> {
        self.delivery
            .acker
            .reject(BasicRejectOptions { requeue: false })
            .await?;
        Ok(())
    }
}
