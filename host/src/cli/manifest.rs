//! Reading `tensorlet.toml`, the manifest that describes an app (schema: README, "The
//! manifest"). Unknown keys are refused with their line, so a typo never deploys silently;
//! the component's path is taken relative to the manifest.

use crate::apps::DeploySpec;
use anyhow::Context;
use std::path::{Path, PathBuf};

/// The deployment `path` describes and the component it names, if any.
pub fn read(path: &Path) -> anyhow::Result<(DeploySpec, Option<PathBuf>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the manifest {}", path.display()))?;
    let spec = parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let component = spec.app.component.as_ref().map(|component| {
        path.parent()
            .unwrap_or_else(|| Path::new("."))
            .join(component)
    });
    Ok((spec, component))
}

/// The deployment a manifest's text describes; errors name the line and the key.
pub fn parse(text: &str) -> Result<DeploySpec, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apps::traffic::RevisionRef;

    const EXAMPLE: &str = r#"
[app]
name = "pipeline"
component = "target/pipeline.wasm"
models = ["minilm"]

[limits]
timeout_secs = 20
cpu_ms = 500

[scaling]
max_concurrency = 4
min_instances = 1

[config]
embeddings_app = "openai"

[outbound]
allowed_hosts = ["openai.internal"]

[cache]
ttl_secs = 60

[rate_limit]
per_second = 100
burst = 200

[traffic]
sticky_header = "x-user"
split = [
  { revision = 1, percent = 90, tag = "stable" },
  { revision = "latest", percent = 10, tag = "canary" },
]

[fallback]
status = 503
body = "busy, try again"
"#;

    #[test]
    fn the_documented_example_reads_whole() {
        let spec = parse(EXAMPLE).unwrap();
        assert_eq!(spec.app.name.as_deref(), Some("pipeline"));
        assert_eq!(spec.limits.cpu_ms, Some(500));
        assert_eq!(spec.scaling.max_concurrency, Some(4));
        assert_eq!(spec.config["embeddings_app"], "openai");
        assert_eq!(spec.cache.unwrap().max_entry_bytes, 1 << 20);
        let traffic = spec.traffic.unwrap();
        assert_eq!(traffic.split[1].revision, RevisionRef::Latest);
        assert_eq!(traffic.split[0].tag.as_deref(), Some("stable"));
        assert_eq!(spec.fallback.unwrap().status, Some(503));
    }

    #[test]
    fn the_pipeline_examples_manifest_is_valid() {
        let spec = parse(include_str!("../../../components/pipeline/tensorlet.toml")).unwrap();
        let limits = crate::config::LimitsConfig::default();
        assert!(crate::apps::spec::settle(&spec, &limits).is_ok());
        assert_eq!(
            spec.outbound.allowed_hosts,
            vec!["openai.internal".to_string()]
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let error = parse("[app]\nname = \"x\"\n\n[limits]\ntimeout = 5\n").unwrap_err();
        assert!(error.contains("line 5"), "{error}");
        assert!(error.contains("timeout"), "{error}");
        let error = parse("[scaling]\nmin_instance = 1\n").unwrap_err();
        assert!(error.contains("min_instance"), "{error}");
        assert!(parse("[nonsense]\n").is_err());
    }

    #[test]
    fn the_component_path_is_relative_to_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tensorlet.toml");
        std::fs::write(&path, "[app]\ncomponent = \"app.wasm\"\n").unwrap();
        let (_, component) = read(&path).unwrap();
        assert_eq!(component, Some(dir.path().join("app.wasm")));
    }
}
