//! `wasmgate:platform/events`: a function publishes events through the platform's outbox.
//!
//! An event is a row in the outbox table of the platform database, written in a transaction:
//! the guest's own (`publish-in`), so it commits or vanishes with the writes it announces; the
//! run's, when the host holds the run in one (an event handler); or one of its own, committed
//! before `publish` returns. Each event gets a time-ordered id and the next sequence number of
//! its `(topic, key)`, taken from a counter row that stays locked until the transaction ends,
//! so one key's sequence is the order its events committed in. A relay hands committed rows to
//! the broker (not built yet: see the README).
//!
//! Topics are global (any function may subscribe to any topic); the publishing function is
//! recorded with each event.

#[cfg(test)]
mod conformance;
mod host;
pub mod outbox;

use std::sync::Arc;

use wasmtime::component::{HasData, Linker, ResourceTable};

use super::bindings::wasmgate::platform::events as wit;
use super::db::RequestDb;
use crate::runtime::GuestState;

pub use wit::{Error as EventsError, Event, Published};

/// A function's handle: its name, recorded with each event it publishes.
#[derive(Clone)]
pub struct FunctionEvents {
    function: Arc<str>,
    /// `false` in a shadow run: events are checked and answered, never written.
    publishes: bool,
}

impl FunctionEvents {
    pub fn new(function: &str) -> Self {
        Self {
            function: function.into(),
            publishes: true,
        }
    }

    pub fn instance(&self) -> RequestEvents {
        RequestEvents(self.clone())
    }

    /// For a shadow run: every publish is checked and answered as if written, and none is.
    pub fn discarding(&self) -> RequestEvents {
        RequestEvents(Self {
            function: self.function.clone(),
            publishes: false,
        })
    }
}

/// A request's handle.
pub struct RequestEvents(FunctionEvents);

/// What the generated bindings see: the events handle, the request's database state (the
/// transaction an event goes into) and the resource table (the guest's transactions).
pub struct EventsView<'a> {
    pub table: &'a mut ResourceTable,
    pub db: &'a mut RequestDb,
    pub events: &'a mut RequestEvents,
}

struct EventsCap;

impl HasData for EventsCap {
    type Data<'a> = EventsView<'a>;
}

pub fn link(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<GuestState, EventsCap>(linker, |s| EventsView {
        table: &mut s.table,
        db: &mut s.caps.db,
        events: &mut s.caps.events,
    })
}
