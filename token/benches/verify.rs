//! Offline token verification per core: Cirrus's verifier (ring Ed25519)
//! beside the `pasetors` reference implementation (ed25519-compact), the
//! same tokens in the same run. `cargo bench -p token`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use time::OffsetDateTime;
use token::{Claims, Scope, SigningKey, Verifier};

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

/// Runs `f` for about `secs` seconds and returns calls per second.
fn rate(secs: f64, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        for _ in 0..100 {
            f();
        }
        n += 100;
    }
    n as f64 / start.elapsed().as_secs_f64()
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

    let secs = 3.0;
    let ours_v = rate(secs, ours_verify);
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
        "| operation (1 thread) | Cirrus (ring) | pasetors (ed25519-compact), same run | ratio | target |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| verify (signature, expiry, revocation, claims) | {ours_v:.0}/s | {ref_v:.0}/s | {:.2}× | ≥ 20,000/s per core: {} |",
        ours_v / ref_v,
        if ours_v >= 20_000.0 { "met" } else { "not met" }
    );
    println!(
        "| sign | {ours_s:.0}/s | {ref_s:.0}/s | {:.2}× | — |",
        ours_s / ref_s
    );
}
