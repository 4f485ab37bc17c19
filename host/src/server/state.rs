//! What every handler shares: the engine handle, the model's text side, the names it is
//! served under, the metrics registry, and the bound `/health` holds the engine's steps to.
//!
//! [`AppState`] is cheap to clone (handles and `Arc`s). [`AppState::resolve_model`] implements
//! the `model` field's rule: any of the served names (`--served-model-name`, default the model's
//! own name) or the spec the server was started with; a missing `model` means the first served
//! name; anything else is a 404 `model_not_found`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::engine::EngineHandle;
use crate::model::ModelInfo;
use crate::step_tracing::JourneySink;

use super::errors::ApiError;
use super::http::DEFAULT_HEALTH_STALL_TIMEOUT;
use super::metrics::ServerMetrics;

/// Shared server state.
#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    pub model: Arc<ModelInfo>,
    /// Names the API answers to; the first one is reported by default.
    pub served_names: Arc<Vec<String>>,
    /// The model spec the server was started with (also accepted as a name).
    pub model_spec: Arc<str>,
    pub metrics: Arc<ServerMetrics>,
    /// Unix time the server started (`created` of `/v1/models`).
    pub started: u64,
    /// `/health` is a 503 when requests are pending and no step completed for this long
    /// (`--health-stall-timeout`).
    pub health_stall_timeout: Duration,
    /// Where traced requests' `llm_request` spans go (`None` unless `--enable-journey-tracing`).
    pub journeys: Option<JourneySink>,
    /// `--api-key` / `VLLM_API_KEY`: the keys `/v1` requests must present (`None`: open).
    pub api_keys: Option<super::auth::ApiKeys>,
}

impl AppState {
    pub fn new(
        engine: EngineHandle,
        model: Arc<ModelInfo>,
        served_names: Vec<String>,
        model_spec: &str,
        metrics: Arc<ServerMetrics>,
    ) -> Self {
        let served_names = if served_names.is_empty() {
            vec![model.name.clone()]
        } else {
            served_names
        };
        Self {
            engine,
            model,
            served_names: Arc::new(served_names),
            model_spec: Arc::from(model_spec),
            metrics,
            started: unix_seconds(),
            health_stall_timeout: DEFAULT_HEALTH_STALL_TIMEOUT,
            journeys: None,
            api_keys: None,
        }
    }

    /// The name to answer with, or a 404 for a model this server does not serve.
    pub fn resolve_model(&self, requested: Option<&str>) -> Result<String, ApiError> {
        match requested {
            None | Some("") => Ok(self.served_names[0].clone()),
            Some(name) if self.served_names.iter().any(|n| n == name) => Ok(name.to_string()),
            Some(name) if name == &*self.model_spec => Ok(self.served_names[0].clone()),
            Some(name) => Err(ApiError::model_not_found(name, &self.served_names)),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh OpenAI-style id: `prefix` followed by 32 hex digits (time, counter and process id
/// mixed, so ids are unique within and across runs).
pub fn new_id(prefix: &str) -> String {
    use crate::splitmix::{GOLDEN_GAMMA, mix64};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let high = mix64(nanos ^ u64::from(std::process::id()).rotate_left(32));
    let low = mix64(high ^ count.wrapping_mul(GOLDEN_GAMMA));
    format!("{prefix}{high:016x}{low:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_and_unique() {
        let a = new_id("cmpl-");
        let b = new_id("cmpl-");
        assert!(a.starts_with("cmpl-") && a.len() == 5 + 32);
        assert_ne!(a, b);
    }
}
