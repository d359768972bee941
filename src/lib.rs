//! Reprise: a PostgreSQL-wire proxy that makes several PostgreSQL servers act
//! as one highly available, read-scalable database.
//!
//! The whole server is [`run`]: tests start it in-process on port 0, the
//! binary starts it from a config file.

pub mod admin;
pub mod backend;
pub mod config;
pub mod group;
pub mod local;
pub mod replication;
pub mod route;
pub mod server;
pub mod session;
pub mod wire;

pub use server::{Server, run, runtime};
pub mod demo;
