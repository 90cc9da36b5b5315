//! Two identity processes on one database behave as one: what either
//! commits (a revocation, a key rotation, a catalog change) reaches the
//! other's Watch streams and checks within a second, through Postgres
//! LISTEN/NOTIFY, and a replica that lost its listening connection resyncs
//! from the tables without losing an event.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use pb::watch_event::Event;
use proto::identity::v1 as pb;
use tonic::Code;
use tonic::codec::Streaming;

/// What the issue asks: a change made through one replica is seen through
/// the other within 1 s.
const WITHIN: Duration = Duration::from_secs(1);

async fn watch(
    tokens: &mut pb::tokens_client::TokensClient<tonic::transport::Channel>,
    token: &str,
) -> (pb::Snapshot, Streaming<pb::WatchEvent>) {
    let mut stream = tokens
        .watch(auth(pb::WatchRequest {}, token))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let Some(Event::Snapshot(snap)) = first.event else {
        panic!("first event must be a snapshot: {first:?}")
    };
    (snap, stream)
}

/// The next event within `bound`, or a panic naming `what` and what came before.
async fn next_event(
    stream: &mut Streaming<pb::WatchEvent>,
    bound: Duration,
    what: &str,
    seen: &[Event],
) -> Event {
    match tokio::time::timeout(bound, stream.message()).await {
        Ok(Ok(Some(pb::WatchEvent { event: Some(e) }))) => e,
        other => panic!("no {what} within {bound:?}: got {other:?}; seen before: {seen:?}"),
    }
}

async fn revoke(s: &Server, admin: &str, token: String) {
    s.tokens()
        .revoke_token(auth(
            pb::RevokeTokenRequest {
                target: Some(pb::revoke_token_request::Target::Token(token)),
            },
            admin,
        ))
        .await
        .unwrap();
}

fn primary(keys: &[pb::SigningKey]) -> String {
    keys.iter()
        .find(|k| k.state == pb::KeyState::Primary as i32)
        .unwrap()
        .key_id
        .clone()
}

#[tokio::test]
async fn a_revocation_through_a_reaches_a_watcher_of_b_within_a_second() {
    let a = Server::start().await;
    let b = a.replica().await;
    let admin = a.admin_token().await;
    // B verifies what A signed: the key set is shared.
    let (snap, mut stream) = watch(&mut b.tokens(), &admin).await;
    assert_eq!(snap.keys.len(), 2, "staged and primary");

    a.user_with_role(&admin, "alice", "pw-alice", "p1", "member")
        .await;
    let victim = a.project_token("alice", "pw-alice", "p1").await;
    let audit = b
        .tokens()
        .validate_token(auth(
            pb::ValidateTokenRequest {
                token: victim.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .claims
        .unwrap()
        .audit_ids[0]
        .clone();

    revoke(&a, &admin, victim.clone()).await;
    match next_event(&mut stream, WITHIN, "revocation on B's watch", &[]).await {
        Event::Revocation(r) => assert_eq!(r.audit_id, audit),
        other => panic!("expected a revocation, got {other:?}"),
    }
    // B refuses the token itself, for validation and for re-scoping.
    assert_status(
        b.tokens()
            .validate_token(auth(
                pb::ValidateTokenRequest {
                    token: victim.clone(),
                },
                &admin,
            ))
            .await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    assert_status(
        b.tokens()
            .authenticate(token_request(&victim, Some(project_scope("p1"))))
            .await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn a_rotation_through_a_makes_b_sign_with_the_new_primary_and_everyone_verify_it() {
    let a = Server::start().await;
    let b = a.replica().await;
    let admin = a.admin_token().await;
    let (snap, mut stream) = watch(&mut b.tokens(), &admin).await;
    let old_primary = primary(&snap.keys);

    let rotated = a
        .tokens()
        .rotate_keys(auth(pb::RotateKeysRequest {}, &admin))
        .await
        .unwrap()
        .into_inner()
        .keys;
    let new_primary = primary(&rotated);
    assert_ne!(new_primary, old_primary);
    let keys = match next_event(&mut stream, WITHIN, "key set on B's watch", &[]).await {
        Event::Keys(k) => k.keys,
        other => panic!("expected the new key set, got {other:?}"),
    };
    assert_eq!(keys, rotated, "B announces exactly the set A rotated to");

    // B now signs with the new primary...
    let issued = b
        .tokens()
        .authenticate(password_request(
            "admin",
            ADMIN_PASSWORD,
            Some(project_scope("admin")),
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(token::key_id_of(&issued).unwrap(), new_primary);
    // ...which A, an offline verifier holding the watched keys, and B accept,
    assert!(a.validate(&issued, &issued).await.is_ok());
    let mut offline = token::Verifier::new();
    offline.set_keys(keys.iter().map(|k| k.public_key.as_slice()));
    offline
        .verify(&issued, time::OffsetDateTime::now_utc())
        .unwrap();
    // and the token A signed before the rotation still verifies on B.
    assert_eq!(token::key_id_of(&admin).unwrap(), old_primary);
    assert!(
        b.tokens()
            .validate_token(auth(
                pb::ValidateTokenRequest {
                    token: admin.clone()
                },
                &issued
            ))
            .await
            .is_ok()
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn a_catalog_change_through_a_is_in_bs_answers_within_a_second() {
    let a = Server::start().await;
    let b = a.replica().await;
    let admin = a.admin_token().await;
    let catalog_on_b = || async {
        b.tokens()
            .validate_token(auth(
                pb::ValidateTokenRequest {
                    token: admin.clone(),
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .catalog
            .into_iter()
            .map(|s| s.name)
            .collect::<Vec<_>>()
    };
    // B has read (and cached) the catalog before the change.
    assert!(!catalog_on_b().await.contains(&"compute".to_string()));

    a.catalog()
        .create_service(auth(
            pb::CreateServiceRequest {
                name: "compute".into(),
                r#type: "compute".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    // Within 1 s, well inside the cache's 5 s lifetime: B heard the notice.
    wait_for("the new service in B's catalog", WITHIN, || async {
        let names = catalog_on_b().await;
        if names.contains(&"compute".to_string()) {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await;
    let issued = b
        .tokens()
        .authenticate(token_request(&admin, Some(project_scope("admin"))))
        .await
        .unwrap()
        .into_inner();
    assert!(issued.catalog.iter().any(|s| s.name == "compute"));
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn a_replica_whose_listener_is_killed_resyncs_and_loses_no_event() {
    let a = Server::start().await;
    let b = a.replica().await;
    let admin = a.admin_token().await;
    let (_, mut stream) = watch(&mut b.tokens(), &admin).await;
    let (db, conn) = tokio_postgres::connect(&a.db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let name = identity::sync::listener_name(&b.identity.replica_id().to_string());
    let listeners = || async {
        db.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    wait_for(
        "B's listener connected",
        Duration::from_secs(10),
        || async {
            match listeners().await {
                1 => Ok(()),
                n => Err(format!("{n} listening connections")),
            }
        },
    )
    .await;
    let resyncs = b.identity.resyncs();

    // Keep B deaf: no new connection to the database is admitted (existing
    // ones, A's pool among them, keep working), then kill B's listening
    // connection, so that every change below is made while B cannot hear.
    let dbname: String = db
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    // (Only from another database: Postgres refuses it for the current one.)
    let (other, other_conn) = tokio_postgres::connect(
        runtime::db::TestDatabase::DEFAULT_ADMIN_URL,
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let other_conn = tokio::spawn(other_conn);
    other
        .batch_execute(&format!(
            "ALTER DATABASE \"{dbname}\" WITH ALLOW_CONNECTIONS false"
        ))
        .await
        .unwrap();
    let killed: bool = db
        .query_one(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    wait_for("B's listener gone", Duration::from_secs(10), || async {
        match listeners().await {
            0 => Ok(()),
            n => Err(format!("{n} listening connections")),
        }
    })
    .await;
    let mut audits = Vec::new();
    for _ in 0..3 {
        let t = a.login("admin", ADMIN_PASSWORD, None).await.unwrap();
        audits.push(t.claims.unwrap().audit_ids[0].clone());
        revoke(&a, &admin, t.token).await;
    }
    let rotated = a
        .tokens()
        .rotate_keys(auth(pb::RotateKeysRequest {}, &admin))
        .await
        .unwrap()
        .into_inner()
        .keys;

    assert_eq!(b.identity.resyncs(), resyncs, "B stayed deaf");
    other
        .batch_execute(&format!(
            "ALTER DATABASE \"{dbname}\" WITH ALLOW_CONNECTIONS true"
        ))
        .await
        .unwrap();
    drop(other);
    other_conn.abort();

    // Every one of them reaches B's watcher, once, in a bounded time.
    let mut seen = Vec::new();
    let mut revoked = Vec::new();
    let mut keys = None;
    while revoked.len() < audits.len() || keys.is_none() {
        let e = next_event(
            &mut stream,
            Duration::from_secs(10),
            "the changes made while B was deaf",
            &seen,
        )
        .await;
        match &e {
            Event::Revocation(r) => revoked.push(r.audit_id.clone()),
            Event::Keys(k) => keys = Some(k.keys.clone()),
            Event::Snapshot(_) => panic!("no second snapshot on one stream"),
        }
        seen.push(e);
    }
    revoked.sort();
    audits.sort();
    assert_eq!(
        revoked, audits,
        "each revocation exactly once; seen {seen:?}"
    );
    assert_eq!(keys.unwrap(), rotated);
    assert!(
        b.identity.resyncs() > resyncs,
        "B resynced after reconnecting"
    );
    wait_for("B's listener back", Duration::from_secs(10), || async {
        match listeners().await {
            1 => Ok(()),
            n => Err(format!("{n} listening connections")),
        }
    })
    .await;
    // And it hears the next change through the new connection, promptly.
    let t = a.login("admin", ADMIN_PASSWORD, None).await.unwrap();
    let audit = t.claims.unwrap().audit_ids[0].clone();
    revoke(&a, &admin, t.token).await;
    match next_event(
        &mut stream,
        WITHIN,
        "a revocation after the reconnect",
        &seen,
    )
    .await
    {
        Event::Revocation(r) => assert_eq!(r.audit_id, audit),
        other => panic!("expected a revocation, got {other:?}"),
    }
    // B's state equals A's: a fresh watch of each shows the same rules and keys.
    let (snap_a, _) = watch(&mut a.tokens(), &admin).await;
    let new_admin = b
        .tokens()
        .authenticate(password_request(
            "admin",
            ADMIN_PASSWORD,
            Some(project_scope("admin")),
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let (snap_b, _) = watch(&mut b.tokens(), &new_admin).await;
    assert_eq!(snap_a.revocations.len(), snap_b.revocations.len());
    assert_eq!(snap_a.keys, snap_b.keys);
    drop(db);
    conn.abort();
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn a_replica_with_another_key_encryption_key_refuses_to_start_and_says_why() {
    let a = Server::start().await;
    let keys = tempfile::tempdir().unwrap();
    let config = test_config(&a.db, &keys);
    let e = identity::Identity::start(config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("does not open with the key-encryption key")
            && e.contains("copy it from a running replica"),
        "{e}"
    );
    a.stop().await;
}
