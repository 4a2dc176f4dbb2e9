//! Event functions: a component that exports a handler the host calls once for each event a
//! subscription delivers (see `wit/event-function.wit`).
//!
//! ```ignore
//! fn handle(event: event::Delivery) -> event::Outcome {
//!     db::execute("INSERT INTO audit (id, topic) VALUES ($1, $2)", &[event.id.into(), event.topic.into()])?;
//!     Ok(())
//! }
//! wasmgate_sdk::export_event_function!(handle);
//! ```
//!
//! The host holds the run in a transaction: the handler's `db` calls commit only if it returns
//! `Ok`. A capability error converts into [`HandlerError::Retry`] (`?` retries with backoff).

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "wasmgate:platform/event-exports",
        pub_export_macro: true,
        export_macro_name: "__export_event_handler",
        default_bindings_module: "wasmgate_sdk::event::bindings",
    });
}

pub use bindings::exports::wasmgate::platform::event_handler::{Delivery, HandlerError};

/// What a handler returns.
pub type Outcome = Result<(), HandlerError>;

macro_rules! retry_on {
    ($($error:ty),*) => {
        $(impl From<$error> for HandlerError {
            fn from(e: $error) -> Self {
                HandlerError::Retry(format!("{e:?}"))
            }
        })*
    };
}

retry_on!(
    crate::db::Error,
    crate::cache::Error,
    crate::lock::Error,
    crate::events::Error,
    crate::Problem
);

/// Exports `handler` (a `fn(event::Delivery) -> event::Outcome`) as the component's
/// `wasmgate:platform/event-handler`.
#[macro_export]
macro_rules! export_event_function {
    ($handler:path) => {
        struct __WasmgateEvents;

        impl $crate::event::bindings::exports::wasmgate::platform::event_handler::Guest
            for __WasmgateEvents
        {
            fn handle(event: $crate::event::Delivery) -> $crate::event::Outcome {
                $handler(event)
            }
        }

        $crate::event::bindings::__export_event_handler!(__WasmgateEvents with_types_in $crate::event::bindings);
    };
}
