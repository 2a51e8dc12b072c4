//! The admin API's OpenAPI 3.1 document, served at `/openapi.json`: generated from the
//! handlers' `#[utoipa::path]` descriptions as the router is built (one list of routes for both),
//! under `/v1/admin`, with the admin token as its bearer security scheme.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{InfoBuilder, OpenApi, OpenApiBuilder, SecurityRequirement};

/// The document for the admin routes described by `admin`.
pub fn document(admin: OpenApi) -> OpenApi {
    let mut document = OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("tensorlet admin API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Deploy apps, split their traffic, roll back, manage secrets, models, jobs, \
                     tenants and API keys; read logs and usage. Every route needs \
                     `Authorization: Bearer <API key>`; a key sees its tenant's things and may do \
                     what its role allows (the node's admin token, in its data dir, is the \
                     operator's key). Errors are `{\"error\": {\"code\", \"message\"}}`.",
                ))
                .build(),
        )
        .build()
        .nest("/v1/admin", admin);
    let components = document.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "api_key",
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    document.security = Some(vec![SecurityRequirement::new(
        "api_key",
        Vec::<String>::new(),
    )]);
    document
}
