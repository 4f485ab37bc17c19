//! The HTTP/protobuf exporter's client: hyper, in plain text for `http://` endpoints and with a
//! rustls connector for `https://` ones ([`super::tls`]), wrapped in a [`CauseRecordingClient`].
//!
//! The OTLP exporter reduces every transport failure to "HTTP export failed: network error". The
//! wrapper keeps the failure's whole cause chain (`client error (Connect): invalid peer
//! certificate: UnknownIssuer`, `… Connection refused`) in a [`LastTransportError`] that the sink
//! adds to its warning, so an operator sees why exports fail.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{Request, Response};
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{Bytes, HttpClient, HttpError};

use super::config::{OtlpConfig, StepTracingError};

/// The cause chain of the latest failed request, taken by whoever reports the failure.
#[derive(Debug, Clone, Default)]
pub struct LastTransportError(Arc<Mutex<Option<String>>>);

impl LastTransportError {
    fn set(&self, cause: String) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(cause);
    }

    /// The recorded cause, if any, clearing it.
    pub fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// An [`HttpClient`] that records the cause chain of each failure before passing it on.
#[derive(Debug)]
pub struct CauseRecordingClient<C> {
    inner: C,
    last_error: LastTransportError,
}

#[async_trait::async_trait]
impl<C: HttpClient> HttpClient for CauseRecordingClient<C> {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let result = self.inner.send_bytes(request).await;
        if let Err(error) = &result {
            self.last_error.set(cause_chain(error.as_ref()));
        }
        result
    }
}

/// `error: source: source…`, skipping a source whose text its parent already ends with.
fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// The client for `otlp` (plain or TLS by the endpoint's scheme) and where its failures' causes
/// are recorded.
pub fn build(
    otlp: &OtlpConfig,
    timeout: Duration,
) -> Result<(Arc<dyn HttpClient>, LastTransportError), StepTracingError> {
    let last_error = LastTransportError::default();
    let client: Arc<dyn HttpClient> = if otlp.endpoint.starts_with("https://") {
        Arc::new(CauseRecordingClient {
            inner: super::tls::https_client(&otlp.tls, timeout)?,
            last_error: last_error.clone(),
        })
    } else {
        Arc::new(CauseRecordingClient {
            inner: HyperClient::with_default_connector(timeout, None),
            last_error: last_error.clone(),
        })
    };
    Ok((client, last_error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn the_cause_chain_is_kept() {
        let error = Outer(std::io::Error::other(
            "invalid peer certificate: UnknownIssuer",
        ));
        assert_eq!(
            cause_chain(&error),
            "client error (Connect): invalid peer certificate: UnknownIssuer"
        );
    }
}
