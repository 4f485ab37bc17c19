//! The admin API and SIGHUP reload: hot swap of the step-tracing policy.
//!
//! Off by default. `--admin-port PORT` serves it on its own listener, bound to `--admin-host`
//! (127.0.0.1 unless configured otherwise), so exposing the OpenAI API on a public address never
//! exposes policy uploads with it. Routes:
//!
//! - `GET /admin/policy`: the active policy (name, digest, size, load time, origin, generation)
//!   and the swap counters, as JSON.
//! - `POST /admin/policy` with a component as the body (`?name=NAME` sets `policy.name`, default
//!   `upload:<first 12 digest hex digits>`; `&arg=KEY=VALUE`, repeatable, replaces the server's
//!   `--step-tracing-policy-arg`s for this policy, so one with parameters of its own can be
//!   swapped in, and a bare `&arg=` passes none): compiled and checked off the step loop
//!   ([`PolicySwitch::swap`]), then active from the next step. A bad component is a 400 with an
//!   OpenAI-style error body naming the problem, and the old policy keeps running; with step
//!   tracing off it is a 409.
//!
//! - `GET /openapi.json`: the admin API's own OpenAPI description (generated from the handlers'
//!   annotations; the main API's `/openapi.json` does not include the admin API).
//!
//! SIGHUP (whether or not the admin API is on) re-reads `--step-tracing-policy` (or the
//! built-in default) and swaps it in the same way; a failure is logged and changes nothing.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::policy::DEFAULT_POLICY_WASM;
use crate::step_tracing::{ActivePolicy, PolicyOrigin, PolicySwitch};

use super::errors::ApiError;
use super::openapi::{self, AdminDoc, ErrorBody};

/// Largest accepted upload: a Python or JavaScript policy with its interpreter is 12–20 MB.
pub const MAX_POLICY_UPLOAD_BYTES: usize = 64 << 20;

/// What the admin handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// `None` when step tracing is disabled.
    pub switch: Option<Arc<PolicySwitch>>,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    let api = OpenApiRouter::with_openapi(AdminDoc::openapi())
        .routes(routes!(get_policy, post_policy))
        .layer(DefaultBodyLimit::max(MAX_POLICY_UPLOAD_BYTES));
    openapi::publish(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// `GET /admin/policy`'s body.
#[derive(Debug, Serialize, ToSchema)]
struct PolicyStatus {
    step_tracing_enabled: bool,
    /// The active policy: name, digest, size, load time, origin, generation.
    #[schema(value_type = Option<Object>)]
    active: Option<ActivePolicy>,
    /// The server's policy parameters (what a swap without `arg`s configures), as
    /// `[key, value]` pairs.
    #[schema(value_type = Vec<Vec<String>>)]
    params: Vec<(String, String)>,
    swaps: u64,
    swaps_refused: u64,
}

fn status(switch: Option<&PolicySwitch>) -> PolicyStatus {
    PolicyStatus {
        step_tracing_enabled: switch.is_some(),
        active: switch.map(PolicySwitch::active),
        params: switch
            .map(|s| s.params().to_configure())
            .unwrap_or_default(),
        swaps: switch.map_or(0, PolicySwitch::swaps),
        swaps_refused: switch.map_or(0, PolicySwitch::refused),
    }
}

/// A policy component, as uploaded.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
struct PolicyUpload(Vec<u8>);

#[utoipa::path(
    get,
    path = "/admin/policy",
    tag = "admin",
    operation_id = "get_policy",
    responses((status = 200, description = "The active policy and the swap counters", body = PolicyStatus))
)]
async fn get_policy(State(state): State<AdminState>) -> Response {
    axum::Json(status(state.switch.as_deref())).into_response()
}

/// The query of an upload: `name`, and the `arg`s if any was given.
#[derive(Debug, Default, PartialEq)]
struct UploadQuery {
    name: Option<String>,
    args: Option<Vec<(String, String)>>,
}

fn parse_upload_query(query: Option<&str>) -> Result<UploadQuery, ApiError> {
    let mut parsed = UploadQuery::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "name" => {
                let name = value.trim();
                if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                    return Err(ApiError::invalid_param(
                        "name",
                        "`name` must be 1-128 printable characters",
                    ));
                }
                parsed.name = Some(name.to_string());
            }
            "arg" => {
                let args = parsed.args.get_or_insert_with(Vec::new);
                if value.is_empty() {
                    continue;
                }
                let pair = crate::policy::params::parse_key_value(&value)
                    .map_err(|e| ApiError::invalid_param("arg", e))?;
                args.push(pair);
            }
            other => {
                return Err(ApiError::invalid_param(
                    other,
                    format!("unknown query parameter `{other}` (expected `name` and `arg`)"),
                ));
            }
        }
    }
    Ok(parsed)
}

#[utoipa::path(
    post,
    path = "/admin/policy",
    tag = "admin",
    operation_id = "swap_policy",
    params(
        ("name" = Option<String>, Query, description = "`policy.name` of the new policy (1-128 printable characters)"),
        ("arg" = Option<Vec<String>>, Query, description = "`KEY=VALUE` policy parameters (repeatable); a bare `arg=` passes none"),
    ),
    request_body(content = PolicyUpload, content_type = "application/octet-stream", description = "A policy component (.wasm)"),
    responses(
        (status = 200, description = "Swapped in: the new active policy", body = Object),
        (status = 400, description = "Refused (not a valid policy, or a bad query); the active policy is unchanged", body = ErrorBody),
        (status = 408, description = "The body did not arrive within --http-read-timeout", body = ErrorBody),
        (status = 409, description = "Step tracing is disabled", body = ErrorBody),
        (status = 413, description = "The body is over 64 MiB", body = ErrorBody),
    )
)]
async fn post_policy(
    State(state): State<AdminState>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        // Over MAX_POLICY_UPLOAD_BYTES (413) or an interrupted upload: an OpenAI-style error too.
        Err(rejection) => {
            return ApiError::status(rejection.status(), rejection.body_text())
                .with_code("policy_refused")
                .into_response();
        }
    };
    let Some(switch) = state.switch else {
        return ApiError::conflict(
            "step tracing is disabled, so there is no policy to replace (start the server with \
             --step-tracing-enabled)",
        )
        .with_code("step_tracing_disabled")
        .into_response();
    };
    let query = match parse_upload_query(query.as_deref()) {
        Ok(query) => query,
        Err(error) => return error.into_response(),
    };
    let name = query.name.unwrap_or_else(|| {
        let digest = crate::policy::digest_of(&body);
        let hex = digest.trim_start_matches("sha256:");
        format!("upload:{}", &hex[..hex.len().min(12)])
    });
    let args = query.args;
    if body.is_empty() {
        return ApiError::invalid(
            "the request body must be a policy component (.wasm); it is empty",
        )
        .with_code("policy_refused")
        .into_response();
    }
    let swapped = tokio::task::spawn_blocking(move || {
        switch.swap(&name, &body, PolicyOrigin::Admin, args.as_deref())
    })
    .await;
    match swapped {
        Ok(Ok(active)) => (StatusCode::OK, axum::Json(active)).into_response(),
        Ok(Err(error)) => ApiError::invalid(format!(
            "policy refused, the active policy is unchanged: {error}"
        ))
        .with_code("policy_refused")
        .into_response(),
        Err(join) => {
            ApiError::internal(format!("the policy swap task failed: {join}")).into_response()
        }
    }
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::route_not_found(method.as_str(), uri.path()).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}

/// Binds the admin listener (and says where, warning when it is not loopback).
pub async fn bind(host: &str, port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port} for the admin API"))?;
    let address = listener.local_addr().context("reading the admin address")?;
    if !address.ip().is_loopback() {
        tracing::warn!(
            "the admin API (policy uploads) listens on the non-loopback address {address}"
        );
    }
    tracing::info!("admin API listening on http://{address}");
    Ok(listener)
}

/// Serves the admin API on `listener` until `drain` resolves, cutting off clients slower than
/// `read_timeout` as the main API does.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    read_timeout: std::time::Duration,
    drain: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    super::http::serve(
        listener,
        router(state),
        read_timeout,
        MAX_POLICY_UPLOAD_BYTES,
        drain,
    )
    .await
    .context("serving the admin API")
}

/// Reloads the policy file (or the built-in default) on every SIGHUP, for the process's life.
pub fn spawn_sighup_reload(
    switch: Option<Arc<PolicySwitch>>,
    policy_path: Option<PathBuf>,
) -> std::io::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let Some(switch) = switch.clone() else {
                tracing::warn!("SIGHUP received, but step tracing is disabled: nothing to reload");
                continue;
            };
            let path = policy_path.clone();
            tracing::info!(
                policy = %path.as_ref().map_or("builtin:default".into(), |p| p.display().to_string()),
                "SIGHUP received: reloading the step-tracing policy"
            );
            let reloaded = tokio::task::spawn_blocking(move || -> Result<(), String> {
                let (name, bytes) = match &path {
                    Some(path) => (
                        path.display().to_string(),
                        std::fs::read(path)
                            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
                    ),
                    None => ("builtin:default".to_string(), DEFAULT_POLICY_WASM.to_vec()),
                };
                switch
                    .swap(&name, &bytes, PolicyOrigin::Reload, None)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .await;
            match reloaded {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::error!(%error, "policy reload failed; the active policy is unchanged")
                }
                Err(error) => tracing::error!(%error, "policy reload task failed"),
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_queries_parse_names_and_repeated_arguments() {
        assert_eq!(parse_upload_query(None).unwrap(), UploadQuery::default());
        let query = parse_upload_query(Some(
            "name=pressure&arg=rich_top_k%3D2&arg=waiting_threshold=8",
        ))
        .unwrap();
        assert_eq!(query.name.as_deref(), Some("pressure"));
        assert_eq!(
            query.args.unwrap(),
            [
                ("rich_top_k".to_string(), "2".to_string()),
                ("waiting_threshold".to_string(), "8".to_string())
            ]
        );
        // A bare `arg=` means "no arguments", which differs from not giving `arg` at all.
        assert_eq!(
            parse_upload_query(Some("arg=")).unwrap().args,
            Some(Vec::new())
        );
        for bad in ["arg=novalue", "name=", "nmae=x"] {
            assert!(parse_upload_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
