//! What one request's `Store` holds: WASI contexts, the resource table, and the limits that
//! make a misbehaving guest fail alone.

use std::time::Instant;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::deny_outgoing::DenyOutgoing;
use super::output::Captured;
use crate::capabilities::RequestCaps;

/// Tables and memories beyond this many elements are refused: a guest that grows a table
/// without bound gets a trap, not the host's memory.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Guest stdout and stderr kept per request and stream, for the log. A panic message and a
/// short trace fit; what a guest writes beyond it is counted and dropped, never host memory.
pub const OUTPUT_CAPACITY: usize = 64 * 1024;

pub struct GuestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    pub(crate) table: ResourceTable,
    /// The capabilities' per-request state; only the granted ones are linked.
    pub(crate) caps: RequestCaps,
    /// The function's `wasi:config/store` values (linked only when granted `config`).
    pub(crate) config: crate::capabilities::wasi_config::FunctionConfigValues,
    hooks: DenyOutgoing,
    /// What the guest wrote to stdout and stderr (a Rust panic message lands in stderr);
    /// logged with its request id, never sent to the client.
    pub stdout: Captured,
    pub stderr: Captured,
    memory_cap: usize,
    /// Set when the guest asked for more memory than its cap; the trap that follows is then
    /// reported as a memory problem rather than a generic failure.
    pub memory_exceeded: bool,
    /// Wall-clock deadline checked on every epoch tick.
    pub deadline: Instant,
    pub deadline_hit: bool,
}

impl GuestState {
    pub fn new(
        memory_cap: usize,
        deadline: Instant,
        caps: RequestCaps,
        function: &crate::capabilities::FunctionCaps,
    ) -> Self {
        let (stdout, stderr) = (
            Captured::new(OUTPUT_CAPACITY),
            Captured::new(OUTPUT_CAPACITY),
        );
        Self {
            // No preopens, no network, no stdin, only the function's own environment: a guest
            // reaches the world only through the capabilities the host links. Built once per
            // instance: nothing in it belongs to one request.
            wasi: WasiCtx::builder()
                .envs(function.env())
                .stdout(stdout.clone())
                .stderr(stderr.clone())
                .build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            caps,
            config: function.config().clone(),
            hooks: DenyOutgoing,
            stdout,
            stderr,
            memory_cap,
            memory_exceeded: false,
            deadline,
            deadline_hit: false,
        }
    }
}

impl GuestState {
    /// Readies a reused instance's state for its next request: new deadline, flags, empty
    /// output and capability handles; the instance's own memory is what carries over.
    pub fn reset(&mut self, deadline: Instant, caps: RequestCaps) {
        // Normally taken by the log at the end of the last run; emptied here in any case, so
        // no request's output is logged under another's id.
        self.stdout.take();
        self.stderr.take();
        self.caps = caps;
        self.deadline = deadline;
        self.deadline_hit = false;
        self.memory_exceeded = false;
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl ResourceLimiter for GuestState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.memory_exceeded = true;
            wasmtime::bail!(
                "guest asked for {desired} bytes of linear memory, over its cap of {}",
                self.memory_cap
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
