//! Two clouds on one Postgres (issue 12 item 4): each state directory gets
//! a database of its own, so a second cloud leaves the first one's admin and
//! catalog alone; a database another cloud owns is refused with one line.
#![allow(clippy::unwrap_used)]

use tests::*;

#[tokio::test]
async fn two_clouds_side_by_side_keep_their_own_databases() {
    // No CIRRUS_DATABASE_URL: both use the local server, as a newcomer's would.
    let first = Cloud::up(&[]).await;
    let catalog_before = first.admin_ok(&["endpoint", "list", "-f", "json"]).await;
    let second = Cloud::up(&[]).await;

    let (a, b) = (
        first.own_database().unwrap(),
        second.own_database().unwrap(),
    );
    assert!(
        a.starts_with("cirrus_") && b.starts_with("cirrus_"),
        "{a} {b}"
    );
    assert_ne!(a, b, "two state directories share a database");

    // The first cloud's admin still logs in, and its catalog is as it was:
    // its endpoints name its own ports, none of the second cloud's.
    let token = first
        .admin_ok(&["token", "issue", "-f", "value", "-c", "token"])
        .await;
    assert!(token.starts_with("v4.public."), "{token}");
    let catalog_after = first.admin_ok(&["endpoint", "list", "-f", "json"]).await;
    assert_eq!(catalog_before, catalog_after);
    let second_public = format!("127.0.0.1:{}", second.ports("identity").2);
    let first_public = format!("127.0.0.1:{}", first.ports("identity").2);
    assert!(catalog_after.contains(&first_public), "{catalog_after}");
    assert!(!catalog_after.contains(&second_public), "{catalog_after}");

    // Through the first cloud's sidecars, image still resolves to the first cloud.
    let image = first
        .admin_ok(&["catalog", "-f", "value", "-c", "name", "-c", "url"])
        .await;
    let image_url = format!("image https://127.0.0.1:{}", first.ports("image").2);
    assert!(image.lines().any(|l| l == image_url), "{image}");

    // Each admin works only on its own cloud.
    first
        .admin_ok(&["user", "create", "only-in-first", "--password", "pw-1"])
        .await;
    let o = second.admin(&["user", "show", "only-in-first"]).await;
    assert!(
        !o.status.success(),
        "the second cloud sees the first one's user"
    );
    second.down().await;
    first.down().await;
}

#[tokio::test]
async fn a_database_owned_by_another_cloud_is_refused_in_one_line() {
    let db = runtime::db::TestDatabase::create().await.unwrap();
    let env = [("CIRRUS_DATABASE_URL", db.url.as_str())];
    let first = Cloud::up(&env).await;

    let intruder = Cloud::new(&env);
    let o = intruder.start().await;
    assert!(
        !o.status.success(),
        "a second cloud took over: {}",
        stdout(&o)
    );
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("belongs to another cloud"), "{err}");
    assert!(
        err.contains(first.dir()),
        "the owner's state dir is named: {err}"
    );

    // Nothing of the first cloud changed: its admin still works.
    first.admin_ok(&["token", "issue"]).await;
    first.down().await;
}
