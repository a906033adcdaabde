//! The OpenAPI description, derived from the handlers' annotations and the
//! documents' types, so it cannot drift from what the gateway does.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::Problem;
use super::ops::Health;
use crate::calls::document::{AttemptDocument, CallbackDocument, ResultDocument, StatusDocument};

/// The API document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "switchboard",
        description = "Every interaction style between synchronous and asynchronous over RabbitMQ: synchronous answers, bounded waits that turn into 202 Accepted, polling and long-polling, signed callbacks, and event streams."
    ),
    paths(
        super::calls::start_call,
        super::calls::get_call,
        super::calls::cancel_call,
        super::calls::get_result,
        super::calls::retry_callback,
        super::event_routes::call_events,
        super::event_routes::events_sse,
        super::event_routes::events_ws,
        super::ops::healthz,
        super::ops::readyz,
        super::ops::metrics,
        super::ops::openapi,
        super::ops::asyncapi,
    ),
    components(schemas(
        StatusDocument,
        ResultDocument,
        CallbackDocument,
        AttemptDocument,
        Problem,
        Health
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "calls", description = "Start calls and follow them"),
        (name = "events", description = "Event streams"),
        (name = "operations", description = "Health, metrics and description"),
    )
)]
pub(crate) struct ApiDoc;

/// Declares the bearer token scheme.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
