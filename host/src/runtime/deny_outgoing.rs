//! Guests make no outgoing HTTP requests: the platform's capabilities are the only way out.
//!
//! `wasi:http/outgoing-handler` stays linked (components built by common toolchains import it
//! even when unused), but every call fails with a `wasi:http` error the guest can handle.

use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

pub struct DenyOutgoing;

impl WasiHttpHooks for DenyOutgoing {
    fn send_request(
        &mut self,
        _request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                )>,
            > + Send,
    > {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}
