//! tensorlet: a serverless inference node for the edge.
//!
//! The modules follow the request path: [`api`] accepts HTTPS and routes, [`tenancy`]
//! authenticates, [`apps`] holds what is deployed, [`runtime`] admits the request,
//! instantiates the app's component and runs it, which calls into
//! [`nn`] (models) and [`kv`] (state), both kept by [`store`]. [`node`] wires them together and
//! [`cli`] is the command line.

pub mod api;
pub mod apps;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod jobs;
pub mod kv;
pub mod nn;
pub mod node;
pub mod runtime;
pub mod store;
pub mod telemetry;
pub mod tenancy;
#[cfg(test)]
pub mod testing;
pub mod tls;
