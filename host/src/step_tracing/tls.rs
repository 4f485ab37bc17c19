//! TLS for OTLP export to `https://` endpoints.
//!
//! Both transports use rustls with the ring provider. The trusted roots are Mozilla's (the
//! `webpki-roots` bundle compiled into the binary, so no system certificate store is needed)
//! unless `OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE` names a PEM file of CA certificates, which
//! then replaces them (as the Go and Java SDKs do). `…_CLIENT_CERTIFICATE` and `…_CLIENT_KEY`
//! (both or neither) add a client identity for mutual TLS. The files are read and parsed at
//! start-up, so a missing file, a PEM without a certificate, or a key that does not parse refuses
//! the start with the variable's name in the message. [`tonic_config`] serves gRPC (tonic's
//! `ClientTlsConfig`); [`https_client`] the HTTP/protobuf exporter (hyper with a rustls
//! connector, see [`super::http_client`]).

use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig, Identity};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::config::StepTracingError;

/// A PEM file's contents, with where it came from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemFile {
    /// `VARIABLE=path`, as the user wrote it.
    pub source: String,
    pub pem: Vec<u8>,
}

/// TLS settings for an `https://` OTLP endpoint (unused for `http://`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtlpTls {
    /// CA certificates to trust instead of the built-in Mozilla roots.
    pub ca: Option<PemFile>,
    /// Client certificate chain and private key, for mutual TLS.
    pub client_identity: Option<(PemFile, PemFile)>,
}

impl OtlpTls {
    /// Reads the files named by `(variable, path)` pairs. The two client halves come together or
    /// not at all.
    pub fn read(
        ca: Option<(&str, String)>,
        client_certificate: Option<(&str, String)>,
        client_key: Option<(&str, String)>,
    ) -> Result<Self, StepTracingError> {
        let client_identity = match (client_certificate, client_key) {
            (Some(cert), Some(key)) => Some((read_pem(cert)?, read_pem(key)?)),
            (None, None) => None,
            (Some((name, _)), None) | (None, Some((name, _))) => {
                return Err(StepTracingError::Config(format!(
                    "{name} is set but not its pair: mutual TLS needs both \
                     OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY \
                     (or both their _TRACES_ forms)"
                )));
            }
        };
        let tls = Self {
            ca: ca.map(read_pem).transpose()?,
            client_identity,
        };
        // Parse now: a bad file refuses the start, whichever transport is used.
        tls.ca_certificates()?;
        tls.client_chain_and_key()?;
        Ok(tls)
    }

    /// Whether anything differs from the defaults.
    pub fn is_customized(&self) -> bool {
        self.ca.is_some() || self.client_identity.is_some()
    }

    fn ca_certificates(&self) -> Result<Option<Vec<CertificateDer<'static>>>, StepTracingError> {
        self.ca.as_ref().map(certificates).transpose()
    }

    fn client_chain_and_key(
        &self,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, StepTracingError>
    {
        let Some((cert, key)) = &self.client_identity else {
            return Ok(None);
        };
        let chain = certificates(cert)?;
        let key = PrivateKeyDer::from_pem_slice(&key.pem).map_err(|e| {
            StepTracingError::Config(format!(
                "{}: no PEM private key (PKCS#8, PKCS#1 or SEC1) found: {e}",
                key.source
            ))
        })?;
        Ok(Some((chain, key)))
    }
}

fn read_pem((name, path): (&str, String)) -> Result<PemFile, StepTracingError> {
    let path = path.trim().to_string();
    let pem = std::fs::read(&path)
        .map_err(|e| StepTracingError::Config(format!("{name}={path}: cannot read it: {e}")))?;
    Ok(PemFile {
        source: format!("{name}={path}"),
        pem,
    })
}

fn certificates(file: &PemFile) -> Result<Vec<CertificateDer<'static>>, StepTracingError> {
    let certs = CertificateDer::pem_slice_iter(&file.pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            StepTracingError::Config(format!("{}: not a PEM certificate file: {e}", file.source))
        })?;
    if certs.is_empty() {
        return Err(StepTracingError::Config(format!(
            "{}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            file.source
        )));
    }
    Ok(certs)
}

/// tonic's TLS settings for a gRPC `https://` endpoint.
pub fn tonic_config(tls: &OtlpTls) -> Result<ClientTlsConfig, StepTracingError> {
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca {
        Some(ca) => config.ca_certificate(Certificate::from_pem(&ca.pem)),
        None => config.trust_anchors(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    };
    if let Some((cert, key)) = &tls.client_identity {
        config = config.identity(Identity::from_pem(&cert.pem, &key.pem));
    }
    Ok(config)
}

/// The rustls client configuration for the HTTP/protobuf exporter.
fn rustls_config(tls: &OtlpTls) -> Result<rustls::ClientConfig, StepTracingError> {
    let tls_error = |e: rustls::Error| StepTracingError::Otlp(format!("TLS configuration: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    match tls.ca_certificates()? {
        Some(certs) => {
            let source = tls.ca.as_ref().map_or("", |ca| ca.source.as_str());
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    StepTracingError::Config(format!("{source}: unusable CA certificate: {e}"))
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(tls_error)?
    .with_root_certificates(roots);
    match tls.client_chain_and_key()? {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
            StepTracingError::Config(format!(
                "the OTLP client certificate and key do not go together: {e}"
            ))
        }),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A hyper client for the HTTP/protobuf exporter that speaks only HTTPS.
pub fn https_client(
    tls: &OtlpTls,
    timeout: Duration,
) -> Result<HyperClient<HttpsConnector<HttpConnector>>, StepTracingError> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(rustls_config(tls)?)
        .https_only()
        .enable_http1()
        .build();
    Ok(HyperClient::new(connector, timeout, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    #[test]
    fn bad_files_are_refused_with_the_variable_name() {
        let dir = std::env::temp_dir().join(format!("stepscope-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem").display().to_string();
        let err = OtlpTls::read(
            Some(("OTEL_EXPORTER_OTLP_CERTIFICATE", missing)),
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("OTEL_EXPORTER_OTLP_CERTIFICATE=") && err.contains("cannot read"),
            "{err}"
        );

        let not_pem = write(&dir, "not.pem", "hello\n");
        let err = OtlpTls::read(
            Some(("OTEL_EXPORTER_OTLP_CERTIFICATE", not_pem)),
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");

        let err = OtlpTls::read(
            None,
            Some(("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "x".into())),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not its pair"), "{err}");

        // The defaults need no file, and build for both transports.
        let tls = OtlpTls::read(None, None, None).unwrap();
        assert!(!tls.is_customized());
        tonic_config(&tls).unwrap();
        https_client(&tls, Duration::from_secs(1)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
