//! The one error type of the HTTP edge: every failure becomes a status and a JSON body
//! `{ "error": { "code": "...", "message": "..." } }`.

use crate::apps::secrets::SecretsError;
use crate::nn::backend::ChoiceError;
use crate::nn::ModelError;
use crate::runtime::{DeployError, InvokeError};
use crate::store::StoreError;
use crate::tenancy::TenancyError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error answered to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds the client should wait before it retries (`Retry-After`), for 503s.
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    /// An error with the given status, machine-readable code and human message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "request failed");
        }
        let body = crate::runtime::dispatch::error_body(self.code, &self.message);
        let mut response = (
            self.status,
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if let Some(seconds) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            error.to_string(),
        )
    }
}

impl From<DeployError> for ApiError {
    fn from(error: DeployError) -> Self {
        let code = match &error {
            DeployError::InvalidName(_) => "invalid_name",
            DeployError::NotWasm => "not_wasm",
            DeployError::CoreModule => "core_module",
            DeployError::Invalid(_) => "invalid_component",
            DeployError::WrongWorld(_) => "wrong_world",
            DeployError::InvalidSetting(_) => "invalid_setting",
            DeployError::NotFound(_) => "app_not_found",
            DeployError::NameTaken(_) | DeployError::Taken(_) => "name_taken",
            DeployError::Secrets(SecretsError::InvalidName(_) | SecretsError::InvalidApp(_)) => {
                "invalid_name"
            }
            DeployError::Secrets(
                SecretsError::ValueTooLarge { .. } | SecretsError::NotUtf8 { .. },
            ) => "invalid_secret",
            DeployError::Secrets(_) | DeployError::Store(_) | DeployError::Io(_) => "store_error",
        };
        let status = match code {
            "store_error" => StatusCode::INTERNAL_SERVER_ERROR,
            "app_not_found" => StatusCode::NOT_FOUND,
            "name_taken" => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, code, error.to_string())
    }
}

impl From<ModelError> for ApiError {
    fn from(error: ModelError) -> Self {
        let (status, code) = match &error {
            ModelError::InvalidName(_) => (StatusCode::BAD_REQUEST, "invalid_name"),
            ModelError::InvalidTarget(_) => (StatusCode::BAD_REQUEST, "invalid_target"),
            ModelError::NoBackend(ChoiceError::UnknownEncoding { .. }) => {
                (StatusCode::BAD_REQUEST, "unknown_encoding")
            }
            ModelError::NoBackend(ChoiceError::UnknownBackend { .. }) => {
                (StatusCode::BAD_REQUEST, "unknown_backend")
            }
            ModelError::NoBackend(ChoiceError::Unavailable(_)) => {
                (StatusCode::BAD_REQUEST, "backend_unavailable")
            }
            ModelError::NotLoaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "model_not_loaded"),
            ModelError::InvalidModel(_) => (StatusCode::BAD_REQUEST, "invalid_model"),
            ModelError::InvalidBatching(_) => (StatusCode::BAD_REQUEST, "invalid_batching"),
            ModelError::NotFound(_) => (StatusCode::NOT_FOUND, "model_not_found"),
            ModelError::Taken(_) => (StatusCode::CONFLICT, "name_taken"),
            ModelError::Store(_) | ModelError::Io(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "store_error")
            }
        };
        Self::new(status, code, error.to_string())
    }
}

impl From<TenancyError> for ApiError {
    fn from(error: TenancyError) -> Self {
        let (status, code) = match &error {
            TenancyError::InvalidName(_) => (StatusCode::BAD_REQUEST, "invalid_name"),
            TenancyError::DescriptionTooLong => (StatusCode::BAD_REQUEST, "invalid_key"),
            TenancyError::TenantExists(_) => (StatusCode::CONFLICT, "tenant_exists"),
            TenancyError::NoSuchTenant(_) => (StatusCode::NOT_FOUND, "tenant_not_found"),
            TenancyError::NoSuchKey(_) => (StatusCode::NOT_FOUND, "key_not_found"),
            TenancyError::OperatorTenant | TenancyError::AdminTokenKey => {
                (StatusCode::CONFLICT, "protected")
            }
            TenancyError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
        };
        Self::new(status, code, error.to_string())
    }
}

impl From<InvokeError> for ApiError {
    fn from(error: InvokeError) -> Self {
        Self {
            retry_after_secs: error.retry_after_secs(),
            ..Self::new(error.status(), error.code(), error.to_string())
        }
    }
}
