//! Offline token verification per core: Cirrus's verifier (ed25519-dalek)
//! beside the `pasetors` reference implementation (ed25519-compact), the
//! same tokens in the same run, and the floors: dalek's and ring's Ed25519
//! verification alone, of the same bytes (what a token check cannot go
//! below without a faster signature scheme). `cargo bench -p token`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use time::OffsetDateTime;
use token::{Claims, RevocationRule, Scope, SigningKey, Verifier};

fn claims(now: OffsetDateTime) -> Claims {
    Claims {
        sub: "0a0a0a0a0a0a4a0a8a0a0a0a0a0a0a0a".into(),
        user_name: "alice".into(),
        user_domain_id: "default".into(),
        scope: Some(Scope::Project {
            id: "0b0b0b0b0b0b4b0b8b0b0b0b0b0b0b0b".into(),
            name: "demo".into(),
            domain_id: "default".into(),
        }),
        roles: vec!["member".into(), "reader".into()],
        iat: now,
        exp: now + time::Duration::hours(1),
        audit_ids: vec!["aud1".into()],
        methods: vec!["password".into()],
        is_admin_project: false,
    }
}

/// This thread's CPU time so far (`/proc/thread-self/schedstat`, in ns):
/// the rates below are per CPU second, so a busy machine (other processes
/// on the same cores) slows the run but not the figure.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// Runs `f` for about `secs` seconds of this thread's CPU time and returns
/// calls per CPU second.
fn rate(secs: f64, mut f: impl FnMut()) -> f64 {
    let start = thread_cpu();
    let mut n = 0u64;
    while thread_cpu() - start < Duration::from_secs_f64(secs) {
        for _ in 0..100 {
            f();
        }
        n += 100;
    }
    n as f64 / (thread_cpu() - start).as_secs_f64()
}

fn main() {
    let key = SigningKey::generate().unwrap();
    let now = OffsetDateTime::now_utc();
    let token = key.sign(&claims(now)).unwrap();
    let mut v = Verifier::new();
    v.set_keys([key.public_key()]);

    let public =
        pasetors::keys::AsymmetricPublicKey::<pasetors::version4::V4>::from(key.public_key())
            .unwrap();
    let secret =
        pasetors::keys::AsymmetricSecretKey::<pasetors::version4::V4>::from(key.secret_bytes())
            .unwrap();
    let reference_verify = || {
        let u =
            pasetors::token::UntrustedToken::<pasetors::Public, pasetors::version4::V4>::try_from(
                token.as_str(),
            )
            .unwrap();
        let t = pasetors::version4::PublicToken::verify(&public, &u, None, None).unwrap();
        let c: Claims = serde_json::from_str(t.payload()).unwrap();
        std::hint::black_box(c);
    };
    let ours_verify = || {
        std::hint::black_box(v.verify(&token, now).unwrap());
    };
    let message = serde_json::to_vec(&claims(now)).unwrap();
    let footer = format!("{{\"kid\":\"{}\"}}", key.key_id());

    // The floor: ring verifying a signature over bytes as long as the
    // token's pre-authentication encoding.
    let pair = Ed25519KeyPair::from_seed_and_public_key(
        &key.secret_bytes()[..32],
        &key.secret_bytes()[32..],
    )
    .unwrap();
    let signed = vec![7u8; 8 * 5 + "v4.public.".len() + message.len() + footer.len()];
    let sig = pair.sign(&signed);
    let floor_verify = || {
        UnparsedPublicKey::new(&ED25519, key.public_key())
            .verify(std::hint::black_box(&signed), sig.as_ref())
            .unwrap();
    };
    let dalek_key =
        ed25519_dalek::VerifyingKey::from_bytes(key.public_key().try_into().unwrap()).unwrap();
    let dalek_sig = ed25519_dalek::Signature::from_slice(sig.as_ref()).unwrap();
    let dalek_verify = || {
        use ed25519_dalek::Verifier as _;
        dalek_key
            .verify(std::hint::black_box(&signed), &dalek_sig)
            .unwrap();
    };
    // 1,000 revocation rules, none of which matches the token.
    let mut revoked = v.clone();
    for i in 0..1000 {
        let other = |p: &str| Some(format!("{p}{i}"));
        revoked.add_rule(RevocationRule {
            user_id: if i % 3 == 0 { other("user") } else { None },
            project_id: if i % 3 == 1 { other("project") } else { None },
            domain_id: None,
            audit_id: if i % 3 == 2 { other("audit") } else { None },
            issued_before: now,
        });
    }
    let rules_verify = || {
        std::hint::black_box(revoked.verify(&token, now).unwrap());
    };

    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let floor_v = rate(secs, floor_verify);
    let dalek_v = rate(secs, dalek_verify);
    let ours_v = rate(secs, ours_verify);
    let rules_v = rate(secs, rules_verify);
    let ref_v = rate(secs, reference_verify);
    let ours_s = rate(secs, || {
        std::hint::black_box(key.sign(&claims(now)).unwrap());
    });
    let ref_s = rate(secs, || {
        std::hint::black_box(
            pasetors::version4::PublicToken::sign(&secret, &message, Some(footer.as_bytes()), None)
                .unwrap(),
        );
    });
    println!(
        "| operation (1 thread, per CPU second) | Cirrus (dalek) | pasetors (ed25519-compact), same run | ratio | target |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| verify (signature, expiry, revocation, claims) | {ours_v:.0}/s | {ref_v:.0}/s | {:.2}× | ≥ 20,000/s per core: {} |",
        ours_v / ref_v,
        if ours_v >= 20_000.0 { "met" } else { "not met" }
    );
    println!(
        "| verify, 1,000 revocation rules (none matching) | {rules_v:.0}/s | | | ≥ 20,000/s per core: {} |",
        if rules_v >= 20_000.0 {
            "met"
        } else {
            "not met"
        }
    );
    println!(
        "| floor: dalek Ed25519 verify alone, same length ({} bytes) | {dalek_v:.0}/s | | Cirrus verify = {:.0} % of it | |",
        signed.len(),
        100.0 * ours_v / dalek_v
    );
    println!(
        "| ring Ed25519 verify alone, same bytes (the earlier path) | {floor_v:.0}/s | | dalek = {:.2}× ring | |",
        dalek_v / floor_v
    );
    println!(
        "| sign | {ours_s:.0}/s | {ref_s:.0}/s | {:.2}× | — |",
        ours_s / ref_s
    );
}
