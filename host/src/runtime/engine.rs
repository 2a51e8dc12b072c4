//! The node's one wasmtime [`Engine`]: pooling allocator, epoch interruption driven by one
//! ticker thread, and a cache of compiled components (in the blob store) keyed by the
//! component's digest and the engine's configuration, so that a restart does not recompile.

use crate::config::LimitsConfig;
use crate::store::blobs::Blobs;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances. Guests yield to the reactor at every tick, so this bounds how
/// long one busy guest holds a worker thread and how late a timeout can fire.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Builds the engine. Pool sizes follow the node's instance limit, times the depth of calls
/// between apps (a callee runs in the slot of its caller), plus the instances kept idle for
/// reuse; each memory slot is sized for the largest memory limit an app may ask for.
pub fn build_engine(limits: &LimitsConfig) -> wasmtime::Result<Engine> {
    let instances = limits
        .max_concurrent_instances
        .max(1)
        .saturating_mul(1 + limits.max_call_depth)
        .saturating_add(limits.max_idle_instances);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances)
        .total_core_instances(instances * 8)
        .total_memories(instances * 2)
        .total_tables(instances * 8)
        .max_memory_size((limits.max_memory_mib as usize) << 20)
        // Returning a finished instance's pages to the kernel costs TLB shoot-downs on every
        // core; batching those decommits was worth +35% hello throughput at 32 connections
        // here.
        .decommit_batch_size((instances as usize / 2).clamp(1, 64));
    // Resetting only the pages an instance wrote, in place, needs `PAGEMAP_SCAN`: without
    // it wasmtime would `memset` the whole kept region at every reset, which cost more here
    // than the page faults it saves.
    if limits.memory_keep_resident_mib > 0 && PoolingAllocationConfig::is_pagemap_scan_available() {
        pool.linear_memory_keep_resident((limits.memory_keep_resident_mib as usize) << 20)
            .pagemap_scan(wasmtime::Enabled::Yes);
    }
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .cranelift_opt_level(wasmtime::OptLevel::Speed)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

/// The thread that advances the engine's epoch; one per engine, stopped on drop. It counts
/// the ticks too (wasmtime does not say the engine's epoch), for the CPU budget.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    ticks: Arc<AtomicU64>,
}

impl EpochTicker {
    /// Starts ticking `engine` every [`EPOCH_TICK`].
    pub fn start(engine: &Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ticks = Arc::new(AtomicU64::new(0));
        let (engine, flag, count) = (engine.clone(), stop.clone(), ticks.clone());
        std::thread::Builder::new()
            .name("tensorlet-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    count.fetch_add(1, Ordering::Relaxed);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        Self { stop, ticks }
    }

    /// The ticks so far, shared: it follows the engine's epoch.
    pub fn ticks(&self) -> Arc<AtomicU64> {
        self.ticks.clone()
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Compiled components, kept in the blob store beside their component as
/// `<digest>.<engine hash>.cwasm`, and deleted with it.
pub struct ComponentCache {
    blobs: Arc<Blobs>,
    tag: String,
}

impl ComponentCache {
    /// A cache in `blobs` for components compiled by `engine`.
    pub fn new(engine: &Engine, blobs: Arc<Blobs>) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        Self {
            blobs,
            tag: format!("{:016x}.cwasm", hasher.finish()),
        }
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.blobs.derived_path(digest, &self.tag)
    }

    /// Whether a compiled artifact for `digest` is cached.
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).exists()
    }

    /// The compiled component of `digest` from the cache, if it is there and usable (a cold
    /// start: the file is mapped, not compiled). Blocking (file I/O).
    pub fn load(&self, engine: &Engine, digest: &str) -> Option<Component> {
        let path = self.path(digest);
        if !path.exists() {
            return None;
        }
        // SAFETY: the file was written by `Component::serialize` of this engine
        // configuration (the name carries its hash) into the node's private data dir.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cached component unusable; recompiling");
                None
            }
        }
    }

    /// The compiled component for `bytes` (blob `digest`, which the caller holds), from the
    /// cache or compiled now and cached. Blocking (file I/O and, on a miss, compilation).
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        digest: &str,
        bytes: &[u8],
    ) -> wasmtime::Result<Component> {
        if let Some(component) = self.load(engine, digest) {
            return Ok(component);
        }
        let component = Component::new(engine, bytes)?;
        crate::store::files::write_durably(&self.path(digest), &component.serialize()?, 0o644)?;
        Ok(component)
    }
}
