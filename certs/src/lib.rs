//! The Cirrus PKI. A cluster CA (`ca.crt`, `ca.key`) signs short-lived leaf
//! certificates whose URI SAN is the workload's SPIFFE id
//! (`spiffe://cirrus.local/svc/<service>[/host/<name>]`, or
//! `spiffe://cirrus.local/user/<name>` for an operator) and whose DNS SANs are
//! the names it is reached by. Private keys are written mode 0600. The trust
//! bundle (`bundle.pem`) may hold the old and the new CA during a rotation.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// The SPIFFE trust domain of every Cirrus cluster.
pub const TRUST_DOMAIN: &str = "cirrus.local";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("invalid name {0:?}: use letters, digits, '-' and '_'")]
    Name(String),
    #[error("cannot parse certificate {0}")]
    Parse(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn check_name(s: &str) -> Result<&str> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(s)
    } else {
        Err(Error::Name(s.to_string()))
    }
}

/// `spiffe://cirrus.local/svc/<service>[/host/<host>]`.
pub fn service_id(service: &str, host: Option<&str>) -> Result<String> {
    let mut id = format!("spiffe://{TRUST_DOMAIN}/svc/{}", check_name(service)?);
    if let Some(h) = host {
        id.push_str(&format!("/host/{}", check_name(h)?));
    }
    Ok(id)
}

/// `spiffe://cirrus.local/user/<name>`, an operator's client certificate.
pub fn user_id(name: &str) -> Result<String> {
    Ok(format!(
        "spiffe://{TRUST_DOMAIN}/user/{}",
        check_name(name)?
    ))
}

/// A certificate and its private key, PEM-encoded.
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster certificate authority.
pub struct Authority {
    pub cert_pem: String,
    key: KeyPair,
}

impl Authority {
    /// A new CA valid for `validity`.
    pub fn create(common_name: &str, validity: Duration) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Cirrus");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::minutes(5);
        p.not_after = now + validity;
        let cert = p.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Reads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cert_pem = read(&dir.join("ca.crt"))?;
        let key = KeyPair::from_pem(&read(&dir.join("ca.key"))?)?;
        Ok(Self { cert_pem, key })
    }

    /// Writes `ca.crt`, `ca.key` (0600) and adds the CA to `bundle.pem`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        write(&dir.join("ca.crt"), &self.cert_pem, 0o644)?;
        write(&dir.join("ca.key"), &self.key.serialize_pem(), 0o600)?;
        add_to_bundle(dir, &self.cert_pem)
    }

    /// A leaf certificate for `spiffe_id`, usable as TLS server and client.
    pub fn issue(&self, spiffe_id: &str, dns_names: &[String], validity: Duration) -> Result<Pair> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(dns_names.to_vec())?;
        p.subject_alt_names.push(SanType::URI(
            spiffe_id
                .try_into()
                .map_err(|_| Error::Name(spiffe_id.into()))?,
        ));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spiffe_id);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::minutes(5);
        p.not_after = now + validity;
        let cert = p.signed_by(&key, &issuer)?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `<dir>/<name>.crt` and `<dir>/<name>.key` (0600), each atomically.
pub fn write_pair(dir: &Path, name: &str, pair: &Pair) -> Result<(PathBuf, PathBuf)> {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    // Key first: a reader that sees the new certificate must find its key.
    write(&key, &pair.key_pem, 0o600)?;
    write(&crt, &pair.cert_pem, 0o644)?;
    Ok((crt, key))
}

/// Appends a CA certificate to `<dir>/bundle.pem` unless it is already there.
pub fn add_to_bundle(dir: &Path, ca_pem: &str) -> Result<()> {
    let path = dir.join("bundle.pem");
    let current = fs::read_to_string(&path).unwrap_or_default();
    if current.contains(ca_pem.trim()) {
        return Ok(());
    }
    write(&path, &format!("{current}{}\n", ca_pem.trim()), 0o644)
}

/// The end of a PEM certificate's validity.
pub fn not_after(cert_pem: &str) -> Result<OffsetDateTime> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| Error::Parse(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| Error::Parse(e.to_string()))?;
    Ok(cert.validity().not_after.to_datetime())
}

/// The end of a DER certificate's validity.
pub fn not_after_der(der: &[u8]) -> Option<OffsetDateTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.to_datetime())
}

/// The SPIFFE id (the `spiffe://` URI SAN) of a DER certificate.
pub fn spiffe_id_of_der(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
            Some((*u).to_string())
        }
        _ => None,
    })
}

/// Whether a leaf should be renewed: less than a third of `validity` left.
pub fn needs_renewal(cert_path: &Path, validity: Duration) -> bool {
    match read(cert_path).and_then(|pem| not_after(&pem)) {
        Ok(end) => end - OffsetDateTime::now_utc() < validity / 3,
        Err(_) => true,
    }
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| Error::Io(path.to_path_buf(), e))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    let io = |e| Error::Io(path.to_path_buf(), e);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ids_are_checked() {
        assert_eq!(
            service_id("identity", None).unwrap(),
            "spiffe://cirrus.local/svc/identity"
        );
        assert_eq!(
            service_id("compute-agent", Some("host1")).unwrap(),
            "spiffe://cirrus.local/svc/compute-agent/host/host1"
        );
        assert!(service_id("a/b", None).is_err());
        assert!(user_id("").is_err());
    }

    #[test]
    fn issue_save_load_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::create("Cirrus test CA", Duration::days(365)).unwrap();
        ca.save(dir.path()).unwrap();
        let ca = Authority::load(dir.path()).unwrap();
        let id = service_id("identity", None).unwrap();
        let pair = ca
            .issue(
                &id,
                &["identity".into(), "localhost".into()],
                Duration::hours(24),
            )
            .unwrap();
        let (crt, key) = write_pair(dir.path(), "identity", &pair).unwrap();
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(dir.path().join("ca.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );

        let (_, pem) = x509_parser::pem::parse_x509_pem(pair.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            spiffe_id_of_der(&pem.contents).as_deref(),
            Some(id.as_str())
        );
        let left = not_after(&pair.cert_pem).unwrap() - OffsetDateTime::now_utc();
        assert!(left > Duration::hours(23) && left <= Duration::hours(24));
        assert!(!needs_renewal(&crt, Duration::hours(24)));
        assert!(
            needs_renewal(&crt, Duration::days(30)),
            "less than a third of 30 days left"
        );
        assert!(needs_renewal(
            &dir.path().join("missing.crt"),
            Duration::hours(24)
        ));

        // A second CA joins the bundle beside the first (rotation).
        let ca2 = Authority::create("Cirrus test CA 2", Duration::days(365)).unwrap();
        add_to_bundle(dir.path(), &ca2.cert_pem).unwrap();
        add_to_bundle(dir.path(), &ca2.cert_pem).unwrap();
        let bundle = fs::read_to_string(dir.path().join("bundle.pem")).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
    }
}
