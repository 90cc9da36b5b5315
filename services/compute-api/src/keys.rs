//! OpenSSH key pairs: parsing an imported public key line (type, blob,
//! fingerprint as `ssh-keygen -l` prints it), and generating an Ed25519 pair
//! whose private half is written in the OpenSSH private key format.

use runtime::error::{Error, Result};
use sha2::{Digest, Sha256};

/// Key types a server's `authorized_keys` accepts from us.
const TYPES: [&str; 5] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
];

/// A public key as stored: its type, its canonical line and fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub kind: String,
    pub line: String,
    pub fingerprint: String,
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64(data: &[u8], pad: bool) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn read_string(blob: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    let body = blob.get(4..4 + len)?;
    Some((body, &blob[4 + len..]))
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

pub fn fingerprint(blob: &[u8]) -> String {
    format!("SHA256:{}", base64(&Sha256::digest(blob), false))
}

/// Parses one OpenSSH public key line (`<type> <base64> [comment]`).
pub fn parse_public(line: &str) -> Result<PublicKey> {
    let bad = |why: &str| Error::invalid("public_key", why.to_string());
    if line.len() > 16 * 1024 {
        return Err(bad("is longer than 16384 bytes"));
    }
    let mut parts = line.split_whitespace();
    let (Some(kind), Some(data)) = (parts.next(), parts.next()) else {
        return Err(bad(
            "is not an OpenSSH public key (<type> <base64> [comment])",
        ));
    };
    if !TYPES.contains(&kind) {
        return Err(bad(&format!(
            "key type {:?} is not supported",
            runtime::types::short(kind)
        )));
    }
    let blob = unbase64(data).ok_or_else(|| bad("is not valid base64"))?;
    let (inner, rest) = read_string(&blob).ok_or_else(|| bad("is truncated"))?;
    if inner != kind.as_bytes() {
        return Err(bad("names a different key type inside than outside"));
    }
    if kind == "ssh-ed25519" {
        match read_string(rest) {
            Some((key, tail)) if key.len() == 32 && tail.is_empty() => {}
            _ => return Err(bad("is not a valid Ed25519 key")),
        }
    } else if rest.is_empty() {
        return Err(bad("is truncated"));
    }
    let comment: Vec<&str> = parts.collect();
    let mut canonical = format!("{kind} {data}");
    if !comment.is_empty() {
        canonical.push(' ');
        canonical.push_str(&comment.join(" "));
    }
    Ok(PublicKey {
        kind: kind.to_string(),
        line: canonical,
        fingerprint: fingerprint(&blob),
    })
}

/// A new Ed25519 pair: the public key and the private key in OpenSSH format.
pub fn generate(comment: &str) -> Result<(PublicKey, String)> {
    let kp = ed25519_compact::KeyPair::generate();
    let pk: &[u8] = kp.pk.as_ref();
    let sk: &[u8] = kp.sk.as_ref();
    let mut blob = Vec::new();
    put_string(&mut blob, b"ssh-ed25519");
    put_string(&mut blob, pk);
    let line = format!("ssh-ed25519 {} {comment}", base64(&blob, true));
    let public = PublicKey {
        kind: "ssh-ed25519".into(),
        fingerprint: fingerprint(&blob),
        line,
    };

    let check = u32::from_be_bytes([sk[0], sk[1], sk[2], sk[3]]);
    let mut private = Vec::new();
    private.extend_from_slice(&check.to_be_bytes());
    private.extend_from_slice(&check.to_be_bytes());
    put_string(&mut private, b"ssh-ed25519");
    put_string(&mut private, pk);
    put_string(&mut private, sk);
    put_string(&mut private, comment.as_bytes());
    let mut pad = 1u8;
    while private.len() % 8 != 0 {
        private.push(pad);
        pad += 1;
    }
    let mut body = b"openssh-key-v1\0".to_vec();
    put_string(&mut body, b"none");
    put_string(&mut body, b"none");
    put_string(&mut body, b"");
    body.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut body, &blob);
    put_string(&mut body, &private);
    let encoded = base64(&body, true);
    let mut pem = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
    for line in encoded.as_bytes().chunks(70) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END OPENSSH PRIVATE KEY-----\n");
    Ok((public, pem))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for n in 0..20 {
            let data: Vec<u8> = (0..n).map(|i| (i * 37) as u8).collect();
            assert_eq!(unbase64(&base64(&data, true)).unwrap(), data);
        }
        assert_eq!(base64(b"foobar", true), "Zm9vYmFy");
        assert_eq!(base64(b"fo", true), "Zm8=");
    }

    #[test]
    fn generated_keys_parse_and_fingerprints_match() {
        let (public, private) = generate("test").unwrap();
        let parsed = parse_public(&public.line).unwrap();
        assert_eq!(parsed.fingerprint, public.fingerprint);
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        for (line, why) in [
            (
                "",
                "public_key: is not an OpenSSH public key (<type> <base64> [comment])",
            ),
            (
                "ssh-dss AAAA",
                "public_key: key type \"ssh-dss\" is not supported",
            ),
            ("ssh-ed25519 !!!", "public_key: is not valid base64"),
            (
                "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQAB",
                "public_key: names a different key type inside than outside",
            ),
        ] {
            assert_eq!(parse_public(line).unwrap_err().to_string(), why, "{line}");
        }
    }
}
