//! Endpoints for reaching a Tessera service, the one place that decides
//! which certificates an `https://` URL is checked against: the CA file the
//! operator named, or else the system's CA bundle. Plain `http://` URLs are
//! left alone (loopback, or TLS terminated in front of the service).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Where the system CA bundle usually is (Debian/Ubuntu/Alpine, Fedora/RHEL,
/// macOS/BSD, openSUSE); `SSL_CERT_FILE` comes first when set.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// Why an endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot read CA certificate {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NotPem { path: PathBuf },
    #[error(
        "{url} is https but no CA certificate was given and no system CA bundle was found (set SSL_CERT_FILE or pass the CA file)"
    )]
    NoRoots { url: String },
    #[error("TLS set-up for {url}: {reason}")]
    Tls { url: String, reason: String },
}

/// An endpoint for `url`. For `https://`, the server certificate must chain
/// to `ca` when given, else to the system CA bundle.
pub fn endpoint(url: &str, ca: Option<&Path>) -> Result<Endpoint, ConnectError> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| ConnectError::Url {
        url: url.to_owned(),
        reason: e.to_string(),
    })?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let roots = match ca {
        Some(path) => read_pem(path)?,
        None => system_bundle().ok_or_else(|| ConnectError::NoRoots {
            url: url.to_owned(),
        })??,
    };
    endpoint
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(roots)))
        .map_err(|e| ConnectError::Tls {
            url: url.to_owned(),
            reason: e.to_string(),
        })
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ConnectError> {
    let pem = std::fs::read(path).map_err(|source| ConnectError::CaFile {
        path: path.to_owned(),
        source,
    })?;
    // tonic skips what it cannot parse; an empty trust store would only
    // show up later as "unknown issuer", so refuse a file with nothing in it.
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(ConnectError::NotPem {
            path: path.to_owned(),
        });
    }
    Ok(pem)
}

fn system_bundle() -> Option<Result<Vec<u8>, ConnectError>> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    from_env
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .map(|p| read_pem(&p))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn plain_http_needs_no_roots() {
        endpoint("http://127.0.0.1:7402", None).unwrap();
    }

    #[test]
    fn bad_inputs_are_named() {
        let err = endpoint("not a url", None).unwrap_err();
        assert!(matches!(err, ConnectError::Url { .. }), "{err}");

        let missing = Path::new("/nonexistent/ca.pem");
        let err = endpoint("https://localhost:1", Some(missing)).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");

        let dir = std::env::temp_dir().join(format!("tessera-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, b"hello").unwrap();
        let err = endpoint("https://localhost:1", Some(&junk)).unwrap_err();
        assert!(matches!(err, ConnectError::NotPem { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
