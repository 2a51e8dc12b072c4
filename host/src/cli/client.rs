//! The admin API client behind the CLI. On the node's own machine it needs no flags: it reads
//! the node's URL, certificate and admin token from the data dir.

use crate::apps::DeploySpec;
use anyhow::{anyhow, bail, Context};
use futures_util::StreamExt;
use serde_json::Value;
use std::path::Path;

pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    /// A client for `server` (or the node running from `data_dir`).
    pub fn connect(
        server: Option<&str>,
        token: Option<&str>,
        data_dir: &Path,
    ) -> anyhow::Result<Self> {
        let base = match server {
            Some(server) => server.trim_end_matches('/').to_string(),
            None => std::fs::read_to_string(data_dir.join(crate::node::ENDPOINT_FILE))
                .map(|url| url.trim().to_string())
                .unwrap_or_else(|_| "https://127.0.0.1:8443".to_string()),
        };
        let token = match token {
            Some(token) => token.to_string(),
            None => std::fs::read_to_string(crate::tenancy::token::admin_token_path(data_dir))
                .map(|t| t.trim().to_string())
                .with_context(|| format!("no admin token: pass --token, or run on the node with --data-dir pointing at its data dir ({})", data_dir.display()))?,
        };
        let mut builder = reqwest::Client::builder().use_rustls_tls();
        let cert_path = crate::tls::generated_cert_path(data_dir);
        if let Ok(pem) = std::fs::read(&cert_path) {
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("reading {}", cert_path.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(Self {
            http: builder.build()?,
            base,
            token,
        })
    }

    /// The node's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| {
                format!(
                    "cannot reach the node at {} (is `tensorlet serve` running?)",
                    self.base
                )
            })?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = body["error"]["message"].as_str().unwrap_or("no details");
            bail!("{status}: {message}");
        }
        Ok(body)
    }

    /// GETs `path` and hands back the response as it streams (for followers).
    pub async fn get_streaming(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the node at {}", self.base))?;
        let status = response.status();
        if !status.is_success() {
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let message = body["error"]["message"].as_str().unwrap_or("no details");
            bail!("{status}: {message}");
        }
        Ok(response)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    /// PUTs `body` as JSON to the admin API's `path`.
    pub async fn put_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// POSTs `body` as JSON to the admin API's `path`.
    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// PUTs raw bytes (a secret's value) to the admin API's `path`.
    pub async fn put_bytes(&self, path: &str, body: Vec<u8>) -> anyhow::Result<Value> {
        self.send(self.http.put(format!("{}{path}", self.base)).body(body))
            .await
    }

    /// Deploys `app` as `spec` says (`overlay`: only what it sets changes), with `component`
    /// (or the newest revision's component).
    pub async fn deploy(
        &self,
        app: &str,
        spec: &DeploySpec,
        component: Option<&Path>,
        dry_run: bool,
        overlay: bool,
    ) -> anyhow::Result<Value> {
        let mut spec = spec.clone();
        spec.app.component = None;
        let mut form =
            reqwest::multipart::Form::new().text("manifest", serde_json::to_string(&spec)?);
        if let Some(component) = component {
            let bytes = tokio::fs::read(component)
                .await
                .with_context(|| format!("cannot read {}", component.display()))?;
            form = form.part("component", reqwest::multipart::Part::bytes(bytes));
        }
        let request = self
            .http
            .put(format!("{}/v1/admin/apps/{app}", self.base))
            .query(&[("dry_run", dry_run), ("overlay", overlay)])
            .multipart(form);
        let body = self.send(request).await?;
        if body.get("app").is_none() {
            return Err(anyhow!("unexpected answer: {body}"));
        }
        Ok(body)
    }

    pub async fn add_model(
        &self,
        name: &str,
        file: &Path,
        query: &[(&str, String)],
    ) -> anyhow::Result<Value> {
        let handle = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("cannot open {}", file.display()))?;
        let length = handle.metadata().await?.len();
        let bar = super::fetch::progress("uploading and loading", Some(length));
        let chunks = tokio_util::io::ReaderStream::new(handle).inspect({
            let bar = bar.clone();
            move |chunk| {
                if let Ok(chunk) = chunk {
                    bar.inc(chunk.len() as u64);
                }
            }
        });
        let request = self
            .http
            .put(format!("{}/v1/admin/models/{name}", self.base))
            .query(query)
            .header(reqwest::header::CONTENT_LENGTH, length)
            .body(reqwest::Body::wrap_stream(chunks));
        let body = self.send(request).await;
        bar.finish_and_clear();
        let body = body?;
        body.get("model")
            .cloned()
            .ok_or_else(|| anyhow!("unexpected answer: {body}"))
    }
}
