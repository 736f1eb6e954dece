//! TLS for walshipper's connections to PostgreSQL over TCP (`[pg] sslmode`,
//! `sslrootcert`), with libpq's modes and meanings: `disable`, `prefer`
//! (the default: TLS if the server offers it, the certificate not checked),
//! `require` (TLS or no connection, not checked unless `sslrootcert` is
//! given, then as `verify-ca`), `verify-ca` (the chain
//! must lead to `sslrootcert`), `verify-full` (that, and the host name or
//! address must be the certificate's). A Unix socket never uses TLS, as
//! with libpq. rustls does the work: the `postgres` crate's connections go
//! through `tokio-postgres-rustls`, the replication client (which speaks
//! the protocol itself) through a rustls stream after its SSLRequest.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Deserialize;

use crate::config::PgConfig;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return Err(()),
        })
    }
}

impl SslMode {
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Whether a password login must be SCRAM bound to the TLS channel
/// (`[pg] channel_binding`, libpq's setting): `require` refuses every
/// other way the server may ask to log in (clear-text or MD5 password,
/// SCRAM without -PLUS, no authentication at all), so that an impostor
/// under `prefer` or `require` gets nothing it can use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelBinding {
    Disable,
    #[default]
    Prefer,
    Require,
}

impl std::str::FromStr for ChannelBinding {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        Ok(match s {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            _ => return Err(()),
        })
    }
}

/// The error for a login `[pg] channel_binding = require` refuses.
pub fn binding_refused(target: &str, asked: &str) -> Error {
    Error::Config(format!(
        "{target}: the server asked for {asked}, and [pg] channel_binding = require accepts only SCRAM-SHA-256-PLUS over TLS. To fix: use scram-sha-256 in pg_hba.conf with ssl on (and [pg] sslmode = verify-full), or set channel_binding = prefer"
    ))
}

/// What a connection to `host` does about TLS.
pub enum Plan {
    /// A Unix socket, or `sslmode = disable`.
    Plain,
    /// Ask for TLS; without it, go on in clear only if `required` is false.
    Tls {
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
        required: bool,
    },
}

/// The TLS plan for a connection to `host` (a socket directory or a host
/// name or address) with `pg`'s settings.
pub fn plan(pg: &PgConfig, host: &str) -> Result<Plan> {
    if host.starts_with('/') || pg.sslmode == SslMode::Disable {
        return Ok(Plan::Plain);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // As libpq: `require` with a root certificate given verifies the chain.
    let mode = match pg.sslmode {
        SslMode::Require if !pg.sslrootcert.as_os_str().is_empty() => SslMode::VerifyCa,
        m => m,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Prefer | SslMode::Require => Arc::new(Unchecked(provider.clone())),
        mode => {
            let roots = Arc::new(roots(pg, mode)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| {
                    Error::Config(format!("pg.sslrootcert: no usable CA certificate: {e}"))
                })?;
            if mode == SslMode::VerifyCa {
                Arc::new(AnyName(webpki))
            } else {
                webpki
            }
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let server_name = ServerName::try_from(host.to_string()).map_err(|_| {
        Error::Config(format!(
            "pg.host: '{host}' is neither a host name nor an address TLS can check"
        ))
    })?;
    Ok(Plan::Tls {
        config: Arc::new(config),
        server_name,
        required: pg.sslmode >= SslMode::Require,
    })
}

/// The CA certificates of `sslrootcert`: a PEM file, or `system` for the
/// operating system's store (as libpq 16).
fn roots(pg: &PgConfig, mode: SslMode) -> Result<RootCertStore> {
    let path = &pg.sslrootcert;
    let mut store = RootCertStore::empty();
    if path.as_os_str().is_empty() {
        return Err(Error::Config(format!(
            "pg.sslmode = {} needs pg.sslrootcert: the CA certificate (PEM) that signed the server's certificate, or \"system\" for this host's CA store",
            mode.name()
        )));
    }
    if path == Path::new("system") {
        // Any public CA signs certificates for anyone's names: only the
        // name check makes such a chain mean "this server" (libpq 16 also
        // allows `system` with verify-full only).
        if mode != SslMode::VerifyFull {
            return Err(Error::Config(format!(
                "pg.sslrootcert = \"system\" needs pg.sslmode = verify-full (it is {}): a public CA vouches for a certificate's names, so without the name check any certificate it signed for anyone would pass",
                pg.sslmode.name()
            )));
        }
        let found = rustls_native_certs::load_native_certs();
        for c in found.certs {
            let _ = store.add(c);
        }
        if store.is_empty() {
            let why: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
            return Err(Error::Config(format!(
                "pg.sslrootcert = \"system\": no CA certificate found in this host's store ({}); install ca-certificates or give a PEM file",
                why.join("; ")
            )));
        }
    } else {
        use rustls::pki_types::pem::PemObject;
        let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
            Error::Config(format!(
                "pg.sslrootcert: cannot read {}: {e}",
                path.display()
            ))
        })?;
        for c in certs {
            let c = c.map_err(|e| {
                Error::Config(format!(
                    "pg.sslrootcert: {} is not PEM certificates: {e}",
                    path.display()
                ))
            })?;
            store.add(c).map_err(|e| {
                Error::Config(format!(
                    "pg.sslrootcert: a certificate in {} is not usable as a CA: {e}",
                    path.display()
                ))
            })?;
        }
    }
    if store.is_empty() {
        return Err(Error::Config(format!(
            "pg.sslrootcert: no CA certificate found in {}",
            path.display()
        )));
    }
    Ok(store)
}

/// `prefer` and `require`: any certificate, as libpq does in these modes
/// (they protect against a passive listener, not an impostor). The
/// handshake's signatures are still checked, so the session keys belong to
/// whoever holds the certificate's key.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted CA and be valid now; the
/// name in the certificate is not compared with the host's.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // webpki checks the name last, after the chain and the dates.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Opens a `postgres` crate connection with `c` to `host`, with TLS as
/// `pg` says.
pub fn connect(
    mut c: postgres::Config,
    pg: &PgConfig,
    host: &str,
) -> Result<std::result::Result<postgres::Client, postgres::Error>> {
    use postgres::config::ChannelBinding as Cb;
    use postgres::config::SslMode as Pm;
    c.channel_binding(match pg.channel_binding {
        ChannelBinding::Disable => Cb::Disable,
        ChannelBinding::Prefer => Cb::Prefer,
        ChannelBinding::Require => Cb::Require,
    });
    Ok(match plan(pg, host)? {
        Plan::Plain => c.ssl_mode(Pm::Disable).connect(postgres::NoTls),
        Plan::Tls {
            config, required, ..
        } => {
            c.ssl_mode(if required { Pm::Require } else { Pm::Prefer });
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*config).clone());
            c.connect(tls)
        }
    })
}

/// The tls-server-end-point channel binding of a server certificate (RFC
/// 5929 4.1): its hash with the hash of its signature algorithm, SHA-256
/// for MD5 and SHA-1. None for an algorithm without a single hash (Ed25519,
/// RSA-PSS) or a certificate that does not parse: SCRAM is then unbound.
pub fn end_point_binding(cert_der: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(cert_der).ok()?;
    Some(match cert.signature_algorithm.oid.to_string().as_str() {
        // md5WithRSA, sha1WithRSA, sha256WithRSA, ecdsa-with-SHA1/SHA256
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2" => sha2::Sha256::digest(cert_der).to_vec(),
        // sha384WithRSA, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => sha2::Sha384::digest(cert_der).to_vec(),
        // sha512WithRSA, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => sha2::Sha512::digest(cert_der).to_vec(),
        _ => return None,
    })
}

/// Why a TLS handshake failed, with what to do about it.
pub fn handshake_hint(pg: &PgConfig) -> String {
    match pg.sslmode {
        SslMode::VerifyFull => format!(
            "the server's certificate must be signed by a CA in pg.sslrootcert ({}) and name the host pg.host = {} (connect by the name in the certificate, or use sslmode = verify-ca)",
            pg.sslrootcert.display(),
            pg.host
        ),
        SslMode::VerifyCa | SslMode::Require if !pg.sslrootcert.as_os_str().is_empty() => format!(
            "the server's certificate must be signed by a CA in pg.sslrootcert ({})",
            pg.sslrootcert.display()
        ),
        _ => "check the server's ssl settings in postgresql.conf".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(host: &str, mode: &str, rootcert: &str) -> PgConfig {
        PgConfig {
            host: host.into(),
            sslmode: mode.parse().unwrap(),
            sslrootcert: rootcert.into(),
            ..PgConfig::default()
        }
    }

    #[test]
    fn plans_follow_libpq_modes() {
        assert!("verify_full".parse::<SslMode>().is_err());
        for m in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            assert_eq!(m.parse::<SslMode>().unwrap().name(), m);
        }
        // A socket never uses TLS, whatever the mode (as libpq).
        let p = pg("/var/run/postgresql", "verify-full", "");
        assert!(matches!(plan(&p, &p.host), Ok(Plan::Plain)));
        let p = pg("db.example", "disable", "");
        assert!(matches!(plan(&p, &p.host), Ok(Plan::Plain)));
        let p = pg("db.example", "prefer", "");
        assert!(matches!(
            plan(&p, &p.host),
            Ok(Plan::Tls {
                required: false,
                ..
            })
        ));
        let p = pg("10.0.0.5", "require", "");
        assert!(matches!(
            plan(&p, &p.host),
            Ok(Plan::Tls { required: true, .. })
        ));
        // require with a root certificate verifies it (as libpq).
        let p = pg("10.0.0.5", "require", "/nonexistent/ca.pem");
        let e = plan(&p, &p.host).err().unwrap().to_string();
        assert!(e.contains("cannot read"), "{e}");
        // Verification needs something to verify against, and a readable one.
        let p = pg("db.example", "verify-ca", "");
        let e = plan(&p, &p.host).err().unwrap().to_string();
        assert!(e.contains("needs pg.sslrootcert"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let junk = d.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let p = pg("db.example", "verify-full", junk.to_str().unwrap());
        let e = plan(&p, &p.host).err().unwrap().to_string();
        assert!(e.contains("no CA certificate found"), "{e}");
        // The OS store only with the name check.
        for m in ["require", "verify-ca"] {
            let p = pg("db.example", m, "system");
            let e = plan(&p, &p.host).err().unwrap().to_string();
            assert!(e.contains("needs pg.sslmode = verify-full"), "{e}");
        }
        let p = pg("db.example", "verify-full", "/nonexistent/ca.pem");
        let e = plan(&p, &p.host).err().unwrap().to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
