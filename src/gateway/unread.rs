//! Request bodies nobody reads end their connection.
//!
//! When a handler answers without reading the whole body it was sent (a
//! 401, a 403, a 413, a 408, a route that takes no body), actix-web would
//! keep the connection and read the rest of a chunked body to throw it away,
//! for as long as the client keeps sending: a chunk now and then holds the
//! connection for ever. [`hold`] keeps the request's body stream alive in
//! the answer's body until the answer is sent, so actix-web closes the
//! connection after it instead. A body read to its end, or none at all,
//! changes nothing.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use actix_web::HttpMessage;
use actix_web::body::{BodySize, BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::middleware::Next;
use bytes::Bytes;
use futures_util::Stream;

/// The `from_fn` middleware of the module doc.
pub async fn hold(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody + 'static, Holding>>, actix_web::Error> {
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req.headers().contains_key(header::CONTENT_LENGTH);
    // An upgraded connection (WebSocket) is the handler's to keep.
    if !has_body || req.headers().contains_key(header::UPGRADE) {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    let shared = Shared(Rc::new(RefCell::new(req.take_payload())));
    req.set_payload(Payload::Stream {
        payload: Box::pin(shared.clone()),
    });
    let res = next.call(req).await?;
    Ok(res
        .map_body(|_, body| Holding {
            body: BoxBody::new(body),
            _request_body: shared,
        })
        .map_into_right_body())
}

/// The request's body stream, shared by the handler (which reads it) and
/// the answer (which keeps it alive).
#[derive(Clone)]
struct Shared(Rc<RefCell<Payload>>);

impl Stream for Shared {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_next(cx)
    }
}

/// An answer's body, and the request body kept alive while it is sent.
pub struct Holding {
    body: BoxBody,
    _request_body: Shared,
}

impl MessageBody for Holding {
    type Error = <BoxBody as MessageBody>::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_next(cx)
    }
}
