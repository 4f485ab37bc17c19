//! API keys (`--api-key`, or the `VLLM_API_KEY` environment variable), as `vllm serve` checks
//! them: every request to a `/v1` path must carry `Authorization: Bearer <key>`, or it gets a 401
//! in OpenAI's error shape (`invalid_api_key`) with `WWW-Authenticate: Bearer`. Other paths
//! (`/health`, `/metrics`, `/tokenize`, `/openapi.json`, …) stay open, as in vLLM, so probes and
//! scrapers need no key. Keys are compared in constant time over their SHA-256 digests, so the
//! time a wrong key takes says nothing about the right one.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::errors::ApiError;

/// The accepted keys, as digests.
#[derive(Clone)]
pub struct ApiKeys {
    digests: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.digests.len())
            .finish()
    }
}

impl ApiKeys {
    /// The keys requests must present; `None` when `keys` is empty (no authentication).
    pub fn new(keys: &[String]) -> Option<Self> {
        let digests: Vec<[u8; 32]> = keys
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| Sha256::digest(k.as_bytes()).into())
            .collect();
        (!digests.is_empty()).then(|| Self {
            digests: Arc::new(digests),
        })
    }

    /// Whether `presented` is one of the keys (constant time in the key).
    pub fn accepts(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.digests.iter().fold(false, |found, key| {
            let differing = key
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found | (differing == 0)
        })
    }
}

/// The middleware: checks `/v1` requests, passes everything else.
pub async fn require_key(State(keys): State<ApiKeys>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if !(path == "/v1" || path.starts_with("/v1/")) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(key) if keys.accepts(key) => next.run(request).await,
        _ => {
            let mut response = ApiError::unauthorized(presented.is_some()).into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        assert!(ApiKeys::new(&[]).is_none());
        assert!(ApiKeys::new(&[String::new()]).is_none());
        let keys = ApiKeys::new(&["secret".into(), "other".into()]).unwrap();
        assert!(keys.accepts("secret") && keys.accepts("other"));
        for wrong in ["", "secre", "secret ", "Secret", "secretsecret"] {
            assert!(!keys.accepts(wrong), "{wrong:?}");
        }
        assert!(!format!("{keys:?}").contains("secret"));
    }
}
