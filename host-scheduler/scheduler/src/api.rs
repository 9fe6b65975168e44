//! The REST API (JSON over HTTP/1.1), served on the Unix socket `$STATE_DIR/api.sock` and, if
//! asked, on TCP.
//!
//! | request | answer |
//! |---|---|
//! | `GET /healthz` | 200 `{"status":"ok"}` |
//! | `GET /v1/slices` | 200 `[Slice]` |
//! | `GET /v1/slices/{name}` | 200 `Slice`, 404 |
//! | `POST /v1/slices` (`SliceSpec`) | 201 `Slice`, 400 bad input, 409 name taken or admission refused |
//! | `PATCH /v1/slices/{name}` (`SliceUpdate`) | 200 `Slice`, 404, 409 |
//! | `DELETE /v1/slices/{name}` | 204 |
//! | `POST /v1/slices/{name}/attach` | 200 `Slice` |
//! | `POST /v1/slices/{name}/detach` | 200 `Slice` |
//! | `GET /v1/util` | 200 `[Util]` |
//! | `POST /v1/usage/reports`, `GET /v1/usage/last-seq`, `GET /v1/usage`, `GET /v1/usage/export` | see [`crate::usage`] |
//! | `GET /metrics` | OpenMetrics text, see [`crate::metrics`] |
//!
//! Errors carry `{"error": "Sentence-case message."}`.
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::memory::{Claim, MemoryError};
use crate::registry::RegistryError;
use crate::service::{Core, ServiceError};
use crate::slice::{SliceRequest, SliceUpdate};

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// The message the answer carries.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        let status = match &e {
            ServiceError::Registry(r) => match r {
                RegistryError::Admission(a) if a.is_conflict() => StatusCode::CONFLICT,
                RegistryError::Admission(_) => StatusCode::BAD_REQUEST,
                RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
                RegistryError::NoFreeSlot => StatusCode::CONFLICT,
                RegistryError::Save { .. } | RegistryError::Load { .. } => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
            ServiceError::Start(_) | ServiceError::Board(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!("{e}");
        }
        ApiError::new(status, e.to_string())
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body, answering 400 with the parser's explanation.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("The request body is invalid: {e}."),
        )
    })
}

/// The API's routes.
pub fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/slices", get(list).post(create))
        .route(
            "/v1/slices/{name}",
            get(get_one).patch(update).delete(delete),
        )
        .route("/v1/slices/{name}/attach", post(attach))
        .route("/v1/slices/{name}/detach", post(detach))
        .route("/v1/util", get(util))
        .route("/v1/memory", get(memory))
        .route("/v1/slices/{name}/reclaim", post(reclaim))
        .route("/v1/slices/{name}/restore", post(restore))
        .route("/v1/slices/{name}/claim", post(claim))
        .fallback(not_found)
        .with_state(core)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "No such endpoint.")
}

async fn list(State(core): State<Arc<Core>>) -> impl IntoResponse {
    Json(core.list())
}

async fn get_one(State(core): State<Arc<Core>>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(core.get(&name)?).into_response())
}

async fn create(State(core): State<Arc<Core>>, body: Bytes) -> ApiResult<Response> {
    let req: SliceRequest = parse_body(&body)?;
    let slice = core.create(req)?;
    Ok((StatusCode::CREATED, Json(slice)).into_response())
}

async fn update(
    State(core): State<Arc<Core>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let upd: SliceUpdate = parse_body(&body)?;
    Ok(Json(core.update(&name, &upd)?).into_response())
}

async fn delete(State(core): State<Arc<Core>>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    core.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn attach(State(core): State<Arc<Core>>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(core.attach(&name)?).into_response())
}

async fn detach(State(core): State<Arc<Core>>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(core.detach(&name).await?).into_response())
}

async fn util(State(core): State<Arc<Core>>) -> impl IntoResponse {
    Json(core.util())
}

async fn memory(State(core): State<Arc<Core>>) -> impl IntoResponse {
    Json(core.memory())
}

impl From<MemoryError> for ApiError {
    fn from(e: MemoryError) -> ApiError {
        match e {
            MemoryError::Service(s) => s.into(),
            MemoryError::NotAttached(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            MemoryError::BeyondGuarantee { .. } | MemoryError::NothingToReclaim { .. } => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            MemoryError::Timeout(_) => ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
        }
    }
}

/// Takes a slice's device memory: its backend freezes it and swaps its memory out.
async fn reclaim(State(core): State<Arc<Core>>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(core.reclaim(&[name]).await?).into_response())
}

/// Gives a reclaimed slice its memory back.
async fn restore(State(core): State<Arc<Core>>, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(Json(core.restore(&[name]).await?).into_response())
}

/// A slice needs memory within its guarantee (its backend found the GPU full).
async fn claim(
    State(core): State<Arc<Core>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let c: Claim = parse_body(&body)?;
    Ok(Json(core.claim(&name, c.bytes).await?).into_response())
}
