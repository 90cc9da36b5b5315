//! Cirrus identity tokens, shared by the identity service (which signs) and
//! every verifier (the identity service itself, the sidecars, benchmarks).
//!
//! A token is a PASETO `v4.public` token: the JSON [`Claims`] signed with
//! Ed25519, with a footer `{"kid":"..."}` naming the key that signed it. A
//! [`Verifier`] holds the public keys and the revocation rules (learned from
//! identity's `Watch`) and checks a token without any round trip.

use std::collections::HashMap;

use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// Why a token was refused. Every variant maps to `UNAUTHENTICATED` on the wire;
/// the distinction is for logs and metrics.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum TokenError {
    /// the token is not a well-formed Cirrus token
    #[error("malformed token")]
    Malformed,
    /// the token names a signing key this verifier does not know
    #[error("token signed by an unknown key")]
    UnknownKey,
    /// the signature does not match the token's contents
    #[error("token signature is invalid")]
    BadSignature,
    /// the token's expiry time has passed
    #[error("token has expired")]
    Expired,
    /// a revocation rule matches the token
    #[error("token has been revoked")]
    Revoked,
}

/// What a token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    pub user_name: String,
    pub user_domain_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// Role names, already expanded through implied roles.
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub iat: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub exp: OffsetDateTime,
    /// `audit_ids[0]` identifies this token; `audit_ids[1]`, if present, the
    /// token it was re-scoped from (the chain's first token).
    pub audit_ids: Vec<String>,
    /// Authentication methods used: `password`, `token`.
    pub methods: Vec<String>,
    /// Scoped to the cloud's admin project (Keystone's `is_admin_project`).
    #[serde(default)]
    pub is_admin_project: bool,
}

/// What a token is scoped to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Scope {
    Project {
        id: String,
        name: String,
        domain_id: String,
    },
    Domain {
        id: String,
        name: String,
    },
    System,
}

impl Claims {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// A cloud administrator: `admin` on the system scope or on the admin project.
    pub fn is_cloud_admin(&self) -> bool {
        self.has_role("admin")
            && (self.is_admin_project || matches!(self.scope, Some(Scope::System)))
    }

    pub fn audit_id(&self) -> &str {
        self.audit_ids.first().map(String::as_str).unwrap_or("")
    }

    pub fn project_id(&self) -> Option<&str> {
        match &self.scope {
            Some(Scope::Project { id, .. }) => Some(id),
            _ => None,
        }
    }

    fn domain_ids(&self) -> impl Iterator<Item = &str> {
        let scoped = match &self.scope {
            Some(Scope::Project { domain_id, .. }) => Some(domain_id.as_str()),
            Some(Scope::Domain { id, .. }) => Some(id.as_str()),
            _ => None,
        };
        std::iter::once(self.user_domain_id.as_str()).chain(scoped)
    }
}

/// A revocation rule in the manner of Keystone's OS-REVOKE events: a token
/// issued at or before `issued_before` is revoked when every field that is
/// set matches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRule {
    pub user_id: Option<String>,
    pub project_id: Option<String>,
    /// Matches the user's domain, the project's domain or the domain scope.
    pub domain_id: Option<String>,
    /// Matches any of the token's audit ids, so re-scoped children go too.
    pub audit_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_before: OffsetDateTime,
}

impl RevocationRule {
    pub fn matches(&self, c: &Claims) -> bool {
        c.iat <= self.issued_before
            && self.user_id.as_ref().is_none_or(|u| *u == c.sub)
            && self
                .project_id
                .as_deref()
                .is_none_or(|p| Some(p) == c.project_id())
            && self
                .domain_id
                .as_deref()
                .is_none_or(|d| c.domain_ids().any(|x| x == d))
            && self
                .audit_id
                .as_ref()
                .is_none_or(|a| c.audit_ids.contains(a))
    }
}

/// The id of a public key: the first 16 hex digits of its SHA-256.
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

/// The id of the key that signed `token`, read from its footer without verifying anything.
pub fn key_id_of(token: &str) -> Option<String> {
    let parts = Parts::split(token).ok()?;
    let footer: Footer = serde_json::from_slice(&parts.footer().ok()?).ok()?;
    Some(footer.kid)
}

#[derive(Serialize, Deserialize)]
struct Footer {
    kid: String,
}

/// The PASETO v4.public header every token starts with.
const HEADER: &str = "v4.public.";
/// An Ed25519 signature's length.
const SIG_LEN: usize = 64;

/// A token cut into its base64url parts, not yet verified.
struct Parts<'a> {
    body: &'a str,
    footer: &'a str,
}

impl<'a> Parts<'a> {
    fn split(token: &'a str) -> Result<Self, TokenError> {
        let rest = token.strip_prefix(HEADER).ok_or(TokenError::Malformed)?;
        let (body, footer) = rest.split_once('.').unwrap_or((rest, ""));
        if footer.contains('.') {
            return Err(TokenError::Malformed);
        }
        Ok(Self { body, footer })
    }

    fn footer(&self) -> Result<Vec<u8>, TokenError> {
        B64.decode(self.footer).map_err(|_| TokenError::Malformed)
    }
}

/// PASETO's pre-authentication encoding: the piece count, then each piece
/// prefixed by its length, all lengths little-endian 64-bit with the top bit clear.
fn pae(pieces: &[&[u8]]) -> Vec<u8> {
    let le64 = |n: usize| ((n as u64) & (u64::MAX >> 1)).to_le_bytes();
    let mut out = Vec::with_capacity(8 + pieces.iter().map(|p| 8 + p.len()).sum::<usize>());
    out.extend_from_slice(&le64(pieces.len()));
    for p in pieces {
        out.extend_from_slice(&le64(p.len()));
        out.extend_from_slice(p);
    }
    out
}

/// Tokens are PASETO v4.public. They are signed with ring's Ed25519 (the
/// workspace's crypto provider) and verified with `ed25519-dalek`, whose
/// AVX2 backend checks a signature in about two thirds of ring's time on
/// these machines (`cargo bench -p token` prints both). The tests check
/// interoperability with the `pasetors` reference implementation in both
/// directions.
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// An Ed25519 key pair that signs tokens.
pub struct SigningKey {
    kid: String,
    pair: Ed25519KeyPair,
    /// seed (32 bytes) then public key (32 bytes), as stored on disk.
    secret: Vec<u8>,
    public: Vec<u8>,
}

impl SigningKey {
    pub fn generate() -> Result<Self, TokenError> {
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| TokenError::Malformed)?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| TokenError::Malformed)?;
        let mut secret = seed.to_vec();
        secret.extend_from_slice(pair.public_key().as_ref());
        Self::from_secret_bytes(&secret)
    }

    /// From the 64 bytes (seed then public key) that [`SigningKey::secret_bytes`] returns.
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, TokenError> {
        if bytes.len() != 64 {
            return Err(TokenError::Malformed);
        }
        let pair = Ed25519KeyPair::from_seed_and_public_key(&bytes[..32], &bytes[32..])
            .map_err(|_| TokenError::Malformed)?;
        let public = pair.public_key().as_ref().to_vec();
        Ok(Self {
            kid: key_id(&public),
            pair,
            secret: bytes.to_vec(),
            public,
        })
    }

    pub fn secret_bytes(&self) -> &[u8] {
        &self.secret
    }

    pub fn public_key(&self) -> &[u8] {
        &self.public
    }

    pub fn key_id(&self) -> &str {
        &self.kid
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let message = serde_json::to_vec(claims).map_err(|_| TokenError::Malformed)?;
        let footer = footer_json(&self.kid);
        let sig = self
            .pair
            .sign(&pae(&[HEADER.as_bytes(), &message, &footer, b""]));
        let mut body = message;
        body.extend_from_slice(sig.as_ref());
        Ok(format!(
            "{HEADER}{}.{}",
            B64.encode(&body),
            B64.encode(&footer)
        ))
    }
}

/// A known key as its tokens name it: the footer exactly as the signer
/// writes it (base64url of `{"kid":"..."}`), its decoded bytes, and the key
/// (decompressed once, when the key set is learned).
#[derive(Clone)]
struct KnownFooter {
    decoded: Vec<u8>,
    key: VerifyingKey,
}

/// Verifies tokens offline against a set of public keys and revocation rules.
///
/// The cost of one verification is the Ed25519 check plus what is around
/// it. The check is dalek's cofactorless `verify`: the keys are the cloud's
/// own (never small-order) and a token's meaning is its claims, so the
/// stricter variant's malleability checks would guard nothing here (a
/// revocation names an audit id, not a signature). What is around it is
/// kept small: each key is decompressed once, when the key set is learned; the footer of a token signed here is
/// found by its text (no base64 or JSON decode; any other spelling of the
/// same footer takes the general path), the body is decoded straight into
/// the pre-authentication encoding (one allocation), and revocation rules
/// are looked up by the token's audit, user and project ids instead of
/// scanned (a rule that names none of them is still checked one by one).
#[derive(Default, Clone)]
pub struct Verifier {
    /// Names this key set (unique in the process; 0: none set yet), so that
    /// a [`VerifiedCache`] never answers for a key set that was replaced.
    generation: u64,
    keys: HashMap<String, VerifyingKey>,
    footers: HashMap<String, KnownFooter>,
    rules: Vec<RevocationRule>,
    index: RuleIndex,
}

/// Revocation rules by the field that narrows them most: the audit id, else
/// the user id, else the project id, else none (scanned). Positions into
/// `Verifier::rules`.
#[derive(Default, Clone)]
struct RuleIndex {
    by_audit: HashMap<String, Vec<usize>>,
    by_user: HashMap<String, Vec<usize>>,
    by_project: HashMap<String, Vec<usize>>,
    rest: Vec<usize>,
}

impl RuleIndex {
    fn add(&mut self, at: usize, r: &RevocationRule) {
        if let Some(a) = &r.audit_id {
            self.by_audit.entry(a.clone()).or_default().push(at);
        } else if let Some(u) = &r.user_id {
            self.by_user.entry(u.clone()).or_default().push(at);
        } else if let Some(p) = &r.project_id {
            self.by_project.entry(p.clone()).or_default().push(at);
        } else {
            self.rest.push(at);
        }
    }

    fn build(rules: &[RevocationRule]) -> Self {
        let mut ix = Self::default();
        for (at, r) in rules.iter().enumerate() {
            ix.add(at, r);
        }
        ix
    }

    /// Whether any rule matches `c`: every rule that could is tried.
    fn revoked(&self, rules: &[RevocationRule], c: &Claims) -> bool {
        let hit = |at: &usize| rules.get(*at).is_some_and(|r| r.matches(c));
        c.audit_ids
            .iter()
            .filter_map(|a| self.by_audit.get(a))
            .chain(self.by_user.get(&c.sub))
            .chain(c.project_id().and_then(|p| self.by_project.get(p)))
            .flatten()
            .chain(&self.rest)
            .any(hit)
    }
}

/// The footer a [`SigningKey`] with id `kid` writes.
fn footer_json(kid: &str) -> Vec<u8> {
    // A key id is hex: nothing in it needs escaping.
    format!("{{\"kid\":\"{kid}\"}}").into_bytes()
}

impl Verifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the whole key set (after a rotation every verifier gets the full set).
    pub fn set_keys<'a>(&mut self, public_keys: impl IntoIterator<Item = &'a [u8]>) {
        static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        self.generation = GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.keys = public_keys
            .into_iter()
            .filter_map(|pk| {
                let key = VerifyingKey::from_bytes(pk.try_into().ok()?).ok()?;
                Some((key_id(pk), key))
            })
            .collect();
        self.footers = self
            .keys
            .iter()
            .map(|(kid, key)| {
                let decoded = footer_json(kid);
                let known = KnownFooter { decoded, key: *key };
                (B64.encode(&known.decoded), known)
            })
            .collect();
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub fn add_rule(&mut self, rule: RevocationRule) {
        self.index.add(self.rules.len(), &rule);
        self.rules.push(rule);
    }

    pub fn set_rules(&mut self, rules: Vec<RevocationRule>) {
        self.index = RuleIndex::build(&rules);
        self.rules = rules;
    }

    /// Whether a revocation rule matches `claims` (the check [`Verifier::verify`] makes).
    pub fn is_revoked(&self, claims: &Claims) -> bool {
        self.index.revoked(&self.rules, claims)
    }

    pub fn rules(&self) -> &[RevocationRule] {
        &self.rules
    }

    /// Forgets rules that can no longer match a live token: every token they
    /// match was issued before `issued_before` and so expired `max_ttl` later.
    pub fn prune_rules(&mut self, now: OffsetDateTime, max_ttl: time::Duration) {
        self.rules.retain(|r| r.issued_before + max_ttl > now);
        self.index = RuleIndex::build(&self.rules);
    }

    /// Checks signature, expiry and revocations; returns the claims.
    pub fn verify(&self, token: &str, now: OffsetDateTime) -> Result<Claims, TokenError> {
        let claims = self.verify_signature(token)?;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        if self.is_revoked(&claims) {
            return Err(TokenError::Revoked);
        }
        Ok(claims)
    }

    /// Checks only that one of our keys signed the token; no expiry or revocation check.
    pub fn verify_signature(&self, token: &str) -> Result<Claims, TokenError> {
        let parts = Parts::split(token)?;
        let general;
        let (footer, key) = match self.footers.get(parts.footer) {
            Some(known) => (known.decoded.as_slice(), &known.key),
            None => {
                general = parts.footer()?;
                let kid: Footer =
                    serde_json::from_slice(&general).map_err(|_| TokenError::Malformed)?;
                let key = self.keys.get(&kid.kid).ok_or(TokenError::UnknownKey)?;
                (general.as_slice(), key)
            }
        };
        let (signed, message, sig) = signed_bytes(parts.body, footer)?;
        key.verify(&signed, &Signature::from_bytes(&sig))
            .map_err(|_| TokenError::BadSignature)?;
        serde_json::from_slice(&signed[message]).map_err(|_| TokenError::Malformed)
    }
}

/// Tokens whose signature was checked, by their text, so that a token
/// presented again costs a map lookup instead of an Ed25519 check. Expiry
/// and revocation rules are still checked on every use, so a revocation
/// takes effect at once; an entry checked under a key set that has since
/// been replaced is not used (a removed key stops verifying at once).
/// Bounded: emptied when full.
#[derive(Default)]
pub struct VerifiedCache {
    entries: std::sync::RwLock<HashMap<String, (u64, std::sync::Arc<Claims>)>>,
}

impl VerifiedCache {
    /// Entries kept at most.
    pub const LIMIT: usize = 10_000;

    /// [`Verifier::verify`], with the signature check cached.
    pub fn verify(
        &self,
        v: &Verifier,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<std::sync::Arc<Claims>, TokenError> {
        let hit = self
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .filter(|(generation, _)| *generation == v.generation)
            .map(|(_, c)| c.clone());
        let claims = match hit {
            Some(c) => c,
            None => {
                let c = std::sync::Arc::new(v.verify_signature(token)?);
                let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
                if entries.len() >= Self::LIMIT {
                    entries.clear();
                }
                entries.insert(token.to_string(), (v.generation, c.clone()));
                c
            }
        };
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        if v.is_revoked(&claims) {
            return Err(TokenError::Revoked);
        }
        Ok(claims)
    }

    /// Forgets every entry (they would not be used after a key change anyway).
    pub fn clear(&self) {
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The bytes the signature covers, PAE(header, message, footer, ""), with
/// the message decoded from `body` in place; where the message lies in them;
/// and the signature that ended `body`.
fn signed_bytes(body: &str, footer: &[u8]) -> Result<Signed, TokenError> {
    let le64 = |n: usize| ((n as u64) & (u64::MAX >> 1)).to_le_bytes();
    let prefix = 8 + 8 + HEADER.len() + 8;
    let decoded_max = body.len().div_ceil(4) * 3;
    let mut out = Vec::with_capacity(prefix + decoded_max + 8 + footer.len() + 8);
    out.extend_from_slice(&le64(4));
    out.extend_from_slice(&le64(HEADER.len()));
    out.extend_from_slice(HEADER.as_bytes());
    out.extend_from_slice(&le64(0)); // the message's length, written below
    out.resize(prefix + decoded_max, 0);
    let n = B64
        .decode_slice(body, &mut out[prefix..])
        .map_err(|_| TokenError::Malformed)?;
    let Some(len) = n.checked_sub(SIG_LEN) else {
        return Err(TokenError::Malformed);
    };
    let mut sig = [0u8; SIG_LEN];
    sig.copy_from_slice(&out[prefix + len..prefix + n]);
    out.truncate(prefix + len);
    out[prefix - 8..prefix].copy_from_slice(&le64(len));
    out.extend_from_slice(&le64(footer.len()));
    out.extend_from_slice(footer);
    out.extend_from_slice(&le64(0));
    Ok((out, prefix..prefix + len, sig))
}

/// What [`signed_bytes`] returns: the signed bytes, the message's place in
/// them, and the signature.
type Signed = (Vec<u8>, std::ops::Range<usize>, [u8; SIG_LEN]);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn claims(now: OffsetDateTime) -> Claims {
        Claims {
            sub: "u1".into(),
            user_name: "alice".into(),
            user_domain_id: "d1".into(),
            scope: Some(Scope::Project {
                id: "p1".into(),
                name: "demo".into(),
                domain_id: "d2".into(),
            }),
            roles: vec!["member".into(), "reader".into()],
            iat: now,
            exp: now + time::Duration::hours(1),
            audit_ids: vec!["a2".into(), "a1".into()],
            methods: vec!["password".into()],
            is_admin_project: false,
        }
    }

    fn verifier_for(key: &SigningKey) -> Verifier {
        let mut v = Verifier::new();
        v.set_keys([key.public_key()]);
        v
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let key = SigningKey::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let token = key.sign(&claims(now)).unwrap();
        assert!(token.starts_with("v4.public."));
        assert_eq!(verifier_for(&key).verify(&token, now).unwrap(), claims(now));
    }

    #[test]
    fn interoperates_with_the_pasetors_reference_implementation() {
        use pasetors::keys::{AsymmetricPublicKey, AsymmetricSecretKey};
        use pasetors::token::UntrustedToken;
        use pasetors::version4::{PublicToken, V4};
        let key = SigningKey::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        // Ours → reference.
        let token = key.sign(&claims(now)).unwrap();
        let public = AsymmetricPublicKey::<V4>::from(key.public_key()).unwrap();
        let untrusted = UntrustedToken::<pasetors::Public, V4>::try_from(token.as_str()).unwrap();
        let trusted = PublicToken::verify(&public, &untrusted, None, None).unwrap();
        let back: Claims = serde_json::from_str(trusted.payload()).unwrap();
        assert_eq!(back, claims(now));
        // Reference → ours.
        let secret = AsymmetricSecretKey::<V4>::from(key.secret_bytes()).unwrap();
        let message = serde_json::to_vec(&claims(now)).unwrap();
        let footer = format!("{{\"kid\":\"{}\"}}", key.key_id());
        let theirs = PublicToken::sign(&secret, &message, Some(footer.as_bytes()), None).unwrap();
        assert_eq!(theirs, token, "Ed25519 is deterministic: the same bytes");
        assert_eq!(
            verifier_for(&key).verify(&theirs, now).unwrap(),
            claims(now)
        );
        assert_eq!(key_id_of(&theirs).as_deref(), Some(key.key_id()));
    }

    #[test]
    fn the_verified_cache_still_checks_expiry_revocation_and_key_changes() {
        let key = SigningKey::generate().unwrap();
        let mut v = verifier_for(&key);
        let cache = VerifiedCache::default();
        let now = OffsetDateTime::now_utc();
        let token = key.sign(&claims(now)).unwrap();
        assert_eq!(*cache.verify(&v, &token, now).unwrap(), claims(now));
        assert_eq!(cache.len(), 1);
        // Cached, and still: expired later, revoked by a rule added later.
        assert_eq!(*cache.verify(&v, &token, now).unwrap(), claims(now));
        assert_eq!(
            cache.verify(&v, &token, now + time::Duration::hours(2)),
            Err(TokenError::Expired)
        );
        let mut revoked = v.clone();
        revoked.add_rule(RevocationRule {
            user_id: None,
            project_id: None,
            domain_id: None,
            audit_id: Some("a1".into()),
            issued_before: now + time::Duration::seconds(1),
        });
        assert_eq!(
            cache.verify(&revoked, &token, now),
            Err(TokenError::Revoked)
        );
        // The key is replaced: the cached entry no longer vouches for it.
        let other = SigningKey::generate().unwrap();
        v.set_keys([other.public_key()]);
        assert_eq!(cache.verify(&v, &token, now), Err(TokenError::UnknownKey));
        // A tampered token is checked, not found.
        let mut bytes = key.sign(&claims(now)).unwrap().into_bytes();
        bytes[20] = if bytes[20] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert_eq!(
            cache.verify(&verifier_for(&key), &tampered, now),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn key_survives_a_round_trip_through_bytes() {
        let key = SigningKey::generate().unwrap();
        let again = SigningKey::from_secret_bytes(key.secret_bytes()).unwrap();
        assert_eq!(key.key_id(), again.key_id());
        assert_eq!(key.public_key(), again.public_key());
    }

    #[test]
    fn refuses_expired_tampered_unknown_and_garbage() {
        let key = SigningKey::generate().unwrap();
        let v = verifier_for(&key);
        let now = OffsetDateTime::now_utc();
        let token = key.sign(&claims(now)).unwrap();
        assert_eq!(
            v.verify(&token, now + time::Duration::hours(2)),
            Err(TokenError::Expired)
        );

        // Flip one character of the signed body.
        let mut bytes = token.clone().into_bytes();
        bytes[20] = if bytes[20] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert_eq!(v.verify(&tampered, now), Err(TokenError::BadSignature));

        let other = SigningKey::generate().unwrap();
        assert_eq!(
            verifier_for(&other).verify(&token, now),
            Err(TokenError::UnknownKey)
        );
        assert_eq!(
            Verifier::new().verify(&token, now),
            Err(TokenError::UnknownKey)
        );
        assert_eq!(v.verify("not a token", now), Err(TokenError::Malformed));
    }

    #[test]
    fn revocation_rules_match_on_every_set_field() {
        let key = SigningKey::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let token = key.sign(&claims(now)).unwrap();
        let rule = |user: Option<&str>,
                    project: Option<&str>,
                    domain: Option<&str>,
                    audit: Option<&str>| {
            RevocationRule {
                user_id: user.map(Into::into),
                project_id: project.map(Into::into),
                domain_id: domain.map(Into::into),
                audit_id: audit.map(Into::into),
                issued_before: now,
            }
        };
        let revoked = |r: RevocationRule| {
            let mut v = verifier_for(&key);
            v.add_rule(r);
            v.verify(&token, now) == Err(TokenError::Revoked)
        };
        assert!(revoked(rule(Some("u1"), None, None, None)));
        assert!(revoked(rule(Some("u1"), Some("p1"), None, None)));
        assert!(!revoked(rule(Some("u1"), Some("p9"), None, None)));
        assert!(revoked(rule(None, None, Some("d1"), None)), "user domain");
        assert!(
            revoked(rule(None, None, Some("d2"), None)),
            "project domain"
        );
        assert!(
            revoked(rule(None, None, None, Some("a1"))),
            "parent audit id"
        );
        assert!(!revoked(rule(None, None, None, Some("zz"))));
        let mut later = rule(Some("u1"), None, None, None);
        later.issued_before = now - time::Duration::seconds(1);
        assert!(
            !revoked(later),
            "a token issued after the rule is not revoked"
        );
    }

    #[test]
    fn indexed_revocation_agrees_with_trying_every_rule() {
        let now = OffsetDateTime::now_utc();
        let ids = ["u1", "u2", "p1", "d1", "d2", "a1", "a2", "zz"];
        let mut rules = Vec::new();
        for (i, &x) in ids.iter().enumerate() {
            // Every combination of fields but none (a rule naming nothing
            // revokes everything); domain rules name "d1" only with the user.
            for mask in 1..16u8 {
                let pick = |bit: u8, v: &str| (mask & bit != 0).then(|| v.to_string());
                rules.push(RevocationRule {
                    user_id: pick(1, if i % 2 == 0 { "u1" } else { x }),
                    project_id: pick(2, if i % 3 == 0 { "p1" } else { x }),
                    domain_id: pick(4, if mask & 1 != 0 { x } else { "d-other" }),
                    audit_id: pick(8, x),
                    issued_before: now - time::Duration::seconds(i64::from(mask % 3)),
                });
            }
        }
        let mut tokens = Vec::new();
        for sub in ["u1", "u2", "u3"] {
            for audit in [vec!["a2", "a1"], vec!["a1"], vec!["zz"], vec!["q"]] {
                for iat in [now, now - time::Duration::seconds(5)] {
                    let mut c = claims(now);
                    c.sub = sub.into();
                    c.audit_ids = audit.iter().map(|a| a.to_string()).collect();
                    c.iat = iat;
                    tokens.push(c);
                }
            }
        }
        let check = |v: &Verifier| {
            let mut revoked = 0;
            for c in &tokens {
                let linear = v.rules().iter().any(|r| r.matches(c));
                assert_eq!(v.is_revoked(c), linear, "claims {c:?}");
                revoked += usize::from(linear);
            }
            revoked
        };
        let mut one_by_one = Verifier::new();
        for r in &rules {
            one_by_one.add_rule(r.clone());
        }
        let n = check(&one_by_one);
        assert!(n > 0 && n < tokens.len(), "{n} of {} revoked", tokens.len());
        let mut all_at_once = Verifier::new();
        all_at_once.set_rules(rules.clone());
        assert_eq!(check(&all_at_once), n);
        all_at_once.prune_rules(
            now + time::Duration::seconds(3599),
            time::Duration::hours(1),
        );
        assert!(all_at_once.rules().len() < rules.len());
        check(&all_at_once);
    }

    #[test]
    fn a_footer_spelled_differently_still_verifies() {
        // The same footer JSON with a space: not the signer's own spelling,
        // so the general path decodes it; the signature covers those bytes.
        use pasetors::keys::AsymmetricSecretKey;
        use pasetors::version4::{PublicToken, V4};
        let key = SigningKey::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let secret = AsymmetricSecretKey::<V4>::from(key.secret_bytes()).unwrap();
        let message = serde_json::to_vec(&claims(now)).unwrap();
        let footer = format!("{{\"kid\": \"{}\"}}", key.key_id());
        let theirs = PublicToken::sign(&secret, &message, Some(footer.as_bytes()), None).unwrap();
        assert_eq!(
            verifier_for(&key).verify(&theirs, now).unwrap(),
            claims(now)
        );
        // A footer naming the key but not signed: refused.
        let token = key.sign(&claims(now)).unwrap();
        let body = token.rsplit_once('.').unwrap().0;
        let forged = format!("{body}.{}", B64.encode(footer.as_bytes()));
        assert_eq!(
            verifier_for(&key).verify(&forged, now),
            Err(TokenError::BadSignature)
        );
        // A body too short to hold a signature.
        let short = format!(
            "{HEADER}{}.{}",
            B64.encode([1u8; 10]),
            token.rsplit_once('.').unwrap().1
        );
        assert_eq!(
            verifier_for(&key).verify(&short, now),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn prune_drops_only_rules_older_than_the_longest_ttl() {
        let now = OffsetDateTime::now_utc();
        let mut v = Verifier::new();
        for age in [0, 30, 90] {
            v.add_rule(RevocationRule {
                user_id: Some("u".into()),
                project_id: None,
                domain_id: None,
                audit_id: None,
                issued_before: now - time::Duration::minutes(age),
            });
        }
        v.prune_rules(now, time::Duration::hours(1));
        assert_eq!(v.rules().len(), 2);
    }

    #[test]
    fn cloud_admin_needs_admin_role_on_system_or_admin_project() {
        let now = OffsetDateTime::now_utc();
        let mut c = claims(now);
        c.roles.push("admin".into());
        assert!(!c.is_cloud_admin());
        c.is_admin_project = true;
        assert!(c.is_cloud_admin());
        c.is_admin_project = false;
        c.scope = Some(Scope::System);
        assert!(c.is_cloud_admin());
    }
}
