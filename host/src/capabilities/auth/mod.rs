//! `wasmgate:platform/auth`: a function asks the host to issue, refresh or revoke tokens. The
//! tokens themselves (keys, sessions, revocations) live in `crate::auth`; this unit is the
//! guest-facing side, bounded in time like every capability call.

mod host;

use wasmtime::component::{HasData, Linker};

use super::bindings::wasmgate::platform::auth as wit;
use crate::auth::Auth;
use crate::runtime::GuestState;

pub use wit::Error as AuthCapError;

/// A function's handle: the process-wide auth service, when the manifest uses auth.
#[derive(Clone)]
pub struct FunctionAuth {
    auth: Option<Auth>,
}

impl FunctionAuth {
    pub fn new(auth: Option<Auth>) -> Self {
        Self { auth }
    }

    pub fn instance(&self) -> RequestAuth {
        RequestAuth(self.clone())
    }
}

/// A request's handle.
pub struct RequestAuth(FunctionAuth);

struct AuthCap;

impl HasData for AuthCap {
    type Data<'a> = &'a mut RequestAuth;
}

pub fn link(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<GuestState, AuthCap>(linker, |s| &mut s.caps.auth)
}
