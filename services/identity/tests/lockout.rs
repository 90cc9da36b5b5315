//! Failed logins and lockout (issue 12 items 6 and 7): a locked account, an
//! unknown name and a wrong password are one answer to the caller; the lock
//! is visible to admins; accounts with `ignore_lockout_failure_attempts`
//! (the bootstrap admin by default) are never locked, and their failures are
//! counted.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use proto::identity::v1 as pb;
use tonic::Code;

/// (code, message) of a refused login.
async fn refusal(s: &Server, user: &str, password: &str) -> (Code, String) {
    match s.login(user, password, None).await {
        Ok(r) => panic!("login as {user} succeeded: {:?}", r.claims),
        Err(e) => (e.code(), e.message().to_string()),
    }
}

#[tokio::test]
async fn locked_unknown_and_wrong_password_are_one_answer() {
    let s = Server::start_with(|c| c.lockout_failure_attempts = 3).await;
    let admin = s.admin_token().await;
    s.user_with_role(&admin, "dave", "pw-dave", "proj-d", "member")
        .await;
    s.user_with_role(&admin, "olga", "pw-olga", "proj-d", "member")
        .await;

    let unknown = refusal(&s, "nobody", "pw-dave").await;
    let wrong = refusal(&s, "olga", "bad").await;
    for _ in 0..3 {
        refusal(&s, "dave", "bad").await;
    }
    // The right password of a locked account, and a wrong one.
    let locked = refusal(&s, "dave", "pw-dave").await;
    let locked_wrong = refusal(&s, "dave", "bad").await;
    let one = (Code::Unauthenticated, AUTH_FAILED.to_string());
    assert_eq!(unknown, one);
    assert_eq!(wrong, one);
    assert_eq!(locked, one);
    assert_eq!(locked_wrong, one);

    // A mesh peer (the dashboard, through its sidecar) reads no more.
    for (user, password) in [("nobody", "x"), ("dave", "pw-dave"), ("olga", "bad")] {
        assert_status(
            s.tokens()
                .authenticate(mesh(tonic::Request::new(password_request(
                    user, password, None,
                ))))
                .await,
            Code::Unauthenticated,
            AUTH_FAILED,
        );
    }

    // The lock is the admin's to see, not the caller's.
    let dave = s.user(&admin, "dave").await;
    assert!(dave.locked_until.is_some(), "{dave:?}");
    assert!(s.user(&admin, "olga").await.locked_until.is_none());
    // Another user is not affected.
    s.login("olga", "pw-olga", None).await.unwrap();
}

#[tokio::test]
async fn a_lock_expires_and_an_admin_reset_clears_it() {
    let s = Server::start_with(|c| {
        c.lockout_failure_attempts = 2;
        c.lockout_duration_secs = 1;
    })
    .await;
    let admin = s.admin_token().await;
    s.user_with_role(&admin, "dave", "pw-dave", "proj-d", "member")
        .await;
    let (_, pia) = s
        .user_with_role(&admin, "pia", "pw-pia", "proj-d", "member")
        .await;
    for user in ["dave", "pia"] {
        for _ in 0..2 {
            refusal(&s, user, "bad").await;
        }
        assert_status(
            s.login(user, &format!("pw-{user}"), None).await,
            Code::Unauthenticated,
            AUTH_FAILED,
        );
    }
    // The lock ends by itself (bounded wait, no fixed sleep) ...
    wait_for("dave's lock to expire", Duration::from_secs(10), || async {
        s.login("dave", "pw-dave", None)
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    })
    .await;
    // ... or at once when an admin sets a new password.
    s.users()
        .update_user(auth(
            pb::UpdateUserRequest {
                id: pia,
                password: Some("pw-pia-2".into()),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    s.login("pia", "pw-pia-2", None).await.unwrap();
}

#[tokio::test]
async fn the_bootstrap_admin_is_exempt_from_lockout_and_its_failures_are_counted() {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let s = Server::start_with(|c| c.lockout_failure_attempts = 3).await;
    let admin = s.admin_token().await;
    assert!(
        s.user(&admin, "admin")
            .await
            .ignore_lockout_failure_attempts
    );

    // Strangers guessing at the admin's password do not lock it out.
    for _ in 0..5 {
        assert_eq!(
            refusal(&s, "admin", "guess").await,
            (Code::Unauthenticated, AUTH_FAILED.to_string())
        );
    }
    s.login("admin", ADMIN_PASSWORD, None).await.unwrap();
    assert!(s.user(&admin, "admin").await.locked_until.is_none());
    let text = metrics.render();
    assert!(
        text.lines()
            .any(|l| l == "identity_lockout_exempt_failures_total 5"),
        "{text}"
    );

    // The option is per user: set at creation, cleared by an update.
    let svc = s
        .users()
        .create_user(auth(
            pb::CreateUserRequest {
                name: "svc".into(),
                password: "pw-svc".into(),
                ignore_lockout_failure_attempts: Some(true),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(svc.ignore_lockout_failure_attempts);
    for _ in 0..4 {
        refusal(&s, "svc", "bad").await;
    }
    s.login("svc", "pw-svc", None).await.unwrap();
    let svc = s
        .users()
        .update_user(auth(
            pb::UpdateUserRequest {
                id: svc.id,
                ignore_lockout_failure_attempts: Some(false),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!svc.ignore_lockout_failure_attempts);
    for _ in 0..3 {
        refusal(&s, "svc", "bad").await;
    }
    assert_status(
        s.login("svc", "pw-svc", None).await,
        Code::Unauthenticated,
        AUTH_FAILED,
    );
    assert!(s.user(&admin, "svc").await.locked_until.is_some());
}
