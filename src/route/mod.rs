//! Routing: classify SQL (pg_query) and decide where a statement may run.
//!
//! [`classify`](mod@classify) says what a client statement does (reads only, begins or
//! ends a transaction, changes session settings, creates session state);
//! [`catalog`] knows which functions a read may call on a subscriber;
//! [`normalize`] makes the cache keys that let [`Classifier`] parse each
//! statement shape once.

pub mod catalog;
pub mod classify;
pub mod normalize;
pub mod parsed;
pub mod policy;

pub use catalog::FunctionCatalog;
pub use classify::{Classification, Classifier, SettingArg, SqlPrepared, TxAfter, classify};
pub use normalize::cache_key;
