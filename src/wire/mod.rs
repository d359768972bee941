//! Bytes in and out: message framing with a maximum size, the startup
//! packet, the few messages the proxy builds or inspects, client auth and
//! client TLS.

pub mod frame;
pub mod messages;
pub mod scram;
pub mod startup;
pub mod tls;

pub use frame::{Frame, FrameError, MessageStream};
pub use messages::PgError;
