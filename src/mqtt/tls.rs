//! TLS for `mqtts://` brokers: rustls with the ring provider, the broker's CA (or the system's
//! roots) and an optional client certificate, every file checked with an error naming its key.

use super::MqttError;
use crate::config::MqttConfig;
use std::path::Path;
use std::sync::Arc;

/// The rustls client configuration for `mqtts://`: CA from `mqtt.ca_file` (or the system's
/// roots), optional client certificate, the ring crypto provider.
pub fn tls_config(m: &MqttConfig) -> Result<rustls::ClientConfig, MqttError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let fail = |key: &'static str, path: &Path, problem: String| MqttError::Tls {
        key,
        path: path.to_path_buf(),
        problem,
    };
    let read_certs =
        |key: &'static str, path: &Path| -> Result<Vec<CertificateDer<'static>>, MqttError> {
            if !path.is_file() {
                return Err(fail(key, path, "no such file".into()));
            }
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| fail(key, path, format!("not a PEM certificate file ({e})")))?;
            if certs.is_empty() {
                return Err(fail(key, path, "holds no PEM CERTIFICATE block".into()));
            }
            Ok(certs)
        };

    let mut roots = rustls::RootCertStore::empty();
    if m.ca_file.as_os_str().is_empty() {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(fail(
                "mqtt.ca_file",
                &m.ca_file,
                "is empty and no system CA certificates were found; name the CA file that signed the broker's certificate".into(),
            ));
        }
        log::debug!("TLS: {added} system CA certificates");
    } else {
        for cert in read_certs("mqtt.ca_file", &m.ca_file)? {
            roots.add(cert).map_err(|e| {
                fail(
                    "mqtt.ca_file",
                    &m.ca_file,
                    format!("unusable CA certificate ({e})"),
                )
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail("mqtt.url", Path::new(&m.url), e.to_string()))?
        .with_root_certificates(roots);
    if m.client_cert.as_os_str().is_empty() {
        return Ok(builder.with_no_client_auth());
    }
    let chain = read_certs("mqtt.client_cert", &m.client_cert)?;
    if !m.client_key.is_file() {
        return Err(fail(
            "mqtt.client_key",
            &m.client_key,
            "no such file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&m.client_key).map_err(|e| {
        fail(
            "mqtt.client_key",
            &m.client_key,
            format!("not a PEM private key ({e})"),
        )
    })?;
    builder.with_client_auth_cert(chain, key).map_err(|e| {
        fail(
            "mqtt.client_key",
            &m.client_key,
            format!("does not go with mqtt.client_cert ({e})"),
        )
    })
}
