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

/// Standard base64 (the `base64` crate the workspace already links through
/// tonic), padded or not.
pub fn base64(data: &[u8], pad: bool) -> String {
    use ::base64::Engine;
    if pad {
        ::base64::engine::general_purpose::STANDARD.encode(data)
    } else {
        ::base64::engine::general_purpose::STANDARD_NO_PAD.encode(data)
    }
}

fn unbase64(s: &str) -> Option<Vec<u8>> {
    use ::base64::Engine;
    ::base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
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

/// ring's PKCS#8 v2 document for an Ed25519 key (RFC 8410 with the public
/// key, ring's `ed25519_pkcs8_v2_template.der`): this prefix, the 32-byte
/// seed, then `[1]` and the public key.
const PKCS8_SEED_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A new Ed25519 pair (ring, as the rest of the workspace signs): the public
/// key and the private key in OpenSSH format.
pub fn generate(comment: &str) -> Result<(PublicKey, String)> {
    use ring::rand::SecureRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let failed = |what: &str| Error::internal(format!("key pair generation: {what}"));
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| failed("no randomness"))?;
    let pkcs8 = pkcs8.as_ref();
    let seed = match (pkcs8.get(..16), pkcs8.get(16..48)) {
        (Some(prefix), Some(seed)) if prefix == PKCS8_SEED_PREFIX => seed,
        _ => return Err(failed("unexpected PKCS#8 layout")),
    };
    let kp = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| failed("bad PKCS#8"))?;
    let pk: &[u8] = kp.public_key().as_ref();
    // The seed read out of the document belongs to this public key.
    Ed25519KeyPair::from_seed_and_public_key(seed, pk).map_err(|_| failed("seed mismatch"))?;
    // OpenSSH's private half: the seed followed by the public key.
    let sk: Vec<u8> = seed.iter().chain(pk).copied().collect();
    let mut blob = Vec::new();
    put_string(&mut blob, b"ssh-ed25519");
    put_string(&mut blob, pk);
    let line = format!("ssh-ed25519 {} {comment}", base64(&blob, true));
    let public = PublicKey {
        kind: "ssh-ed25519".into(),
        fingerprint: fingerprint(&blob),
        line,
    };

    // The check integer (twice) that tells a wrong passphrase: random.
    let mut check = [0u8; 4];
    rng.fill(&mut check).map_err(|_| failed("no randomness"))?;
    let mut private = Vec::new();
    private.extend_from_slice(&check);
    private.extend_from_slice(&check);
    put_string(&mut private, b"ssh-ed25519");
    put_string(&mut private, pk);
    put_string(&mut private, &sk);
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
        // The private half: seed and public key, and the seed signs for it.
        let body: String = private
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let body = unbase64(&body).unwrap();
        let blob = unbase64(public.line.split(' ').nth(1).unwrap()).unwrap();
        let (_, rest) = read_string(&blob).unwrap();
        let (pub_raw, _) = read_string(rest).unwrap();
        // OpenSSH's private key string: length 64, then seed || public key.
        let at = body
            .windows(68)
            .position(|w| w[..4] == [0, 0, 0, 64] && w[36..] == *pub_raw)
            .expect("string(seed || public key) in the private half");
        let seed = &body[at + 4..at + 36];
        let kp = ring::signature::Ed25519KeyPair::from_seed_and_public_key(seed, pub_raw).unwrap();
        let sig = kp.sign(b"m");
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pub_raw)
            .verify(b"m", sig.as_ref())
            .unwrap();
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
