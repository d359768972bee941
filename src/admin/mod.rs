//! Administration: the admin console (the database `reprise` on the client
//! port), HTTP (/status, /metrics, a status page) and the metrics.

pub mod console;
pub mod events;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod reload;
pub mod stats;

/// The database name that opens the admin console.
pub const ADMIN_DATABASE: &str = "reprise";
