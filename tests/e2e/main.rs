//! End-to-end tests: the real `tensorlet` binary on loopback, real TLS, real sled files, the
//! real example components and a real model.

mod support;

mod attacks;
mod backends;
mod batching;
mod cluster;
mod crash;
mod deploy;
mod embeddings;
mod failures;
mod kubernetes;
mod kv;
mod llm;
mod nn;
mod operations;
mod services;
mod tenancy;
