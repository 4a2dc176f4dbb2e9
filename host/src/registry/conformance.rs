//! The registry's conformance suite, on SQLite and on a real PostgreSQL (a fresh database next
//! to `DATABASE_URL`'s).

use super::{
    ABORTED, RUNNING, Registry, RegistryError, RolloutChange, RolloutRow, Shadow, Spec, VersionRow,
    Weighted,
};
use crate::capabilities::db::Db;
use crate::capabilities::db::conformance::fresh_postgres;
use crate::deploy::{Figures, Sample, Tally, Verdict};

async fn open(url: &str) -> Registry {
    Registry::open(Db::connect(url).await.expect("db").backend().clone())
        .await
        .expect("registry tables")
}

fn version(label: &str, sha256: &str) -> VersionRow {
    VersionRow {
        function: "users".into(),
        label: label.into(),
        sha256: sha256.into(),
        settings: "{}".into(),
        created_by: "ops".into(),
        created_at: 1,
        surface: "{}".into(),
        widens: Vec::new(),
        approved_by: String::new(),
    }
}

fn split(weights: &[(&str, u32)]) -> Spec {
    Spec {
        versions: weights
            .iter()
            .map(|(l, w)| Weighted {
                label: (*l).into(),
                weight: *w,
            })
            .collect(),
        sticky: None,
        shadow: None,
    }
}

async fn suite(r: Registry) {
    // Modules: content-addressed, stored once, read back byte for byte.
    let a = r.put_module(b"\0asm-v1").await.expect("put");
    assert_eq!(r.put_module(b"\0asm-v1").await.expect("again"), a);
    let b = r.put_module(b"\0asm-v2").await.expect("put");
    assert_eq!(
        r.module(&a).await.expect("get").as_deref(),
        Some(&b"\0asm-v1"[..])
    );
    assert_eq!(r.module("nope").await.expect("get"), None);

    // Versions: need their module, labels are never reused.
    r.create_version(&version("v1", &a)).await.expect("v1");
    r.create_version(&version("v2", &b)).await.expect("v2");
    assert!(matches!(
        r.create_version(&version("v1", &b)).await,
        Err(RegistryError::Exists(_))
    ));
    assert!(matches!(
        r.create_version(&version("v3", "missing")).await,
        Err(RegistryError::NotFound(_))
    ));
    assert!(matches!(
        r.create_version(&version("a b", &a)).await,
        Err(RegistryError::Invalid(_))
    ));
    let labels: Vec<String> = r
        .versions("users")
        .await
        .expect("list")
        .into_iter()
        .map(|v| v.label)
        .collect();
    assert_eq!(labels, ["v1", "v2"]);

    // Deployments: generations, stale changes refused, bad splits refused.
    assert_eq!(r.deployment("users").await.expect("none"), None);
    let g1 = r
        .set_deployment("users", None, &split(&[("v1", 100)]), "ops", "first")
        .await
        .expect("deploy");
    assert_eq!(g1, 1);
    assert!(matches!(
        r.set_deployment("users", None, &split(&[("v2", 100)]), "ops", "racing")
            .await,
        Err(RegistryError::Stale {
            expected: None,
            actual: Some(1)
        })
    ));
    let g2 = r
        .set_deployment(
            "users",
            Some(1),
            &split(&[("v1", 90), ("v2", 10)]),
            "ops",
            "canary",
        )
        .await
        .expect("canary");
    assert_eq!(g2, 2);
    assert!(matches!(
        r.set_deployment("users", Some(1), &split(&[("v2", 100)]), "bob", "late")
            .await,
        Err(RegistryError::Stale {
            expected: Some(1),
            actual: Some(2)
        })
    ));
    for bad in [
        split(&[("v1", 90)]),
        split(&[("v1", 50), ("v1", 50)]),
        split(&[("v9", 100)]),
    ] {
        assert!(
            r.set_deployment("users", Some(2), &bad, "ops", "bad")
                .await
                .is_err(),
            "{bad:?}"
        );
    }
    let mut sticky = split(&[("v1", 50), ("v2", 50)]);
    sticky.sticky = Some("teapot".into());
    assert!(matches!(
        r.set_deployment("users", Some(2), &sticky, "ops", "bad")
            .await,
        Err(RegistryError::Invalid(_))
    ));
    let live = r.deployment("users").await.expect("get").expect("live");
    assert_eq!(
        (live.generation, live.spec.clone()),
        (2, split(&[("v1", 90), ("v2", 10)]))
    );

    // Rollback: the previous split, as a new generation; the history keeps every change.
    assert_eq!(
        r.rollback("users", "ops", "errors up")
            .await
            .expect("rollback"),
        3
    );
    assert_eq!(
        r.deployment("users")
            .await
            .expect("get")
            .expect("live")
            .spec,
        split(&[("v1", 100)])
    );
    let history = r.history("users").await.expect("history");
    let reasons: Vec<&str> = history.iter().map(|h| h.reason.as_str()).collect();
    assert_eq!(
        reasons,
        ["rollback to generation 1: errors up", "canary", "first"]
    );
    assert!(matches!(
        r.rollback("other", "ops", "x").await,
        Err(RegistryError::NotFound(_))
    ));
    assert_eq!(r.deployments(None).await.expect("all").len(), 1);

    // A reserved label.
    assert!(matches!(
        r.create_version(&version("manifest", &a)).await,
        Err(RegistryError::Invalid(_))
    ));

    figures(&r).await;
    comparisons(&r).await;
    approval(&r, &a).await;
    shadows(&r, &a).await;
    rollouts(&r).await;
}

/// A shadow is part of the deployment: on one of its versions, 1 to 100 percent, never on a
/// version held for approval.
async fn shadows(r: &Registry, module: &str) {
    let live = r.deployment("users").await.expect("get").expect("live");
    let with_shadow = |label: &str, percent| Spec {
        shadow: Some(Shadow {
            label: label.into(),
            percent,
            since: 1,
        }),
        ..split(&[("v1", 90), ("wide", 10), ("v2", 0)])
    };
    for (label, percent) in [("v3", 10), ("v2", 0), ("v2", 101)] {
        let refused = r
            .set_deployment(
                "users",
                Some(live.generation),
                &with_shadow(label, percent),
                "ops",
                "x",
            )
            .await;
        assert!(
            matches!(refused, Err(RegistryError::Invalid(_))),
            "{label} at {percent}%: {refused:?}"
        );
    }
    let g = r
        .set_deployment(
            "users",
            Some(live.generation),
            &with_shadow("v2", 20),
            "ops",
            "shadow",
        )
        .await
        .expect("shadow on a 0% version");
    let d = r.deployment("users").await.expect("get").expect("live");
    assert_eq!(
        d.spec.shadow.map(|s| (s.label, s.percent)),
        Some(("v2".into(), 20))
    );
    assert_eq!(
        r.history("users").await.expect("history")[0].spec.shadow,
        with_shadow("v2", 20).shadow
    );

    // A version held for approval may not run copies of live requests either.
    let held = VersionRow {
        widens: vec!["imports the `lock` capability".into()],
        ..version("held", module)
    };
    r.create_version(&held).await.expect("create");
    let refused = r
        .set_deployment(
            "users",
            Some(g),
            &Spec {
                versions: [("v1", 100), ("wide", 0), ("held", 0)]
                    .iter()
                    .map(|(l, w)| Weighted {
                        label: (*l).into(),
                        weight: *w,
                    })
                    .collect(),
                ..with_shadow("held", 5)
            },
            "ops",
            "x",
        )
        .await;
    assert!(
        matches!(&refused, Err(RegistryError::Refused(why)) if why.contains("lock")),
        "{refused:?}"
    );
}

/// Shadow comparisons: rows of several processes add up per route, with the newest mismatches;
/// a window and pruning leave out the old ones.
async fn comparisons(r: &Registry) {
    let sample = |n: u16| Sample {
        request_id: format!("r{n}"),
        verdict: Verdict::Body,
        live_status: 200,
        shadow_status: 200,
    };
    let tally = |matched, body: u16| Tally {
        matched,
        body: u64::from(body),
        samples: (0..body).map(sample).collect(),
        ..Tally::default()
    };
    let add = |route, process, flush, at, t: Tally| async move {
        r.add_comparisons(("users", "v2", route), (process, flush), at, &t)
            .await
            .expect("add");
    };
    add("/users/{id}", "a", 0, 100, tally(10, 1)).await;
    add("/users/{id}", "b", 0, 101, tally(5, 12)).await;
    add("/users", "a", 1, 101, tally(3, 0)).await;
    let all = r.comparisons("users", "v2", 0).await.expect("read");
    let one = &all["/users/{id}"];
    assert_eq!((one.matched, one.body, one.compared()), (15, 13, 28));
    assert_eq!(one.samples.len(), crate::deploy::SAMPLES);
    assert_eq!(
        one.samples.last().map(|s| s.request_id.as_str()),
        Some("r11")
    );
    assert_eq!(all["/users"].match_percent(), Some(100.0));
    assert!(
        r.comparisons("users", "v3", 0)
            .await
            .expect("read")
            .is_empty()
    );
    assert_eq!(
        r.comparisons("users", "v2", 101).await.expect("read")["/users/{id}"].matched,
        5
    );
    assert_eq!(r.prune_comparisons(101).await.expect("prune"), 1);
    assert_eq!(
        r.comparisons("users", "v2", 0).await.expect("read")["/users/{id}"].matched,
        5
    );
}

/// Rollouts: one running per function, started with its first step in one transaction; a
/// driver's change needs its fence and the step it judged, so a driver that was taken over
/// changes nothing, and a step is never applied twice.
async fn rollouts(r: &Registry) {
    let live = r.deployment("users").await.expect("get").expect("live");
    let row = |id: &str| RolloutRow {
        id: id.into(),
        function: "users".into(),
        candidate: "wide".into(),
        baseline: "v1".into(),
        plan: "{}".into(),
        state: RUNNING.into(),
        step: 0,
        step_started_at: 1,
        fence: 0,
        generation: 0,
        last: "started".into(),
        created_by: "ops".into(),
        created_at: 1,
        updated_at: 1,
    };
    let g = r
        .start_rollout(
            &row("r1"),
            live.generation,
            &split(&[("v1", 95), ("wide", 5)]),
            "rollout r1",
        )
        .await
        .expect("start");
    assert!(matches!(
        r.start_rollout(
            &row("r2"),
            g,
            &split(&[("v1", 95), ("wide", 5)]),
            "rollout r2"
        )
        .await,
        Err(RegistryError::Refused(_))
    ));
    assert_eq!(
        r.deployment("users")
            .await
            .expect("get")
            .expect("live")
            .generation,
        g,
        "the refused start changed nothing"
    );
    let running = r.running_rollouts().await.expect("running");
    assert_eq!(running.len(), 1);
    let seen = running[0].clone();
    assert_eq!(seen.generation, g);

    // Driver A takes it over, then driver B: A's judgement of step 0 is refused.
    let a = r
        .claim_rollout("r1", seen.fence)
        .await
        .expect("claim")
        .expect("a");
    assert_eq!(
        r.claim_rollout("r1", seen.fence).await.expect("claim"),
        None,
        "one claim per fence"
    );
    let b = r.claim_rollout("r1", a).await.expect("claim").expect("b");
    let next = RolloutChange {
        state: RUNNING,
        step: 1,
        step_started_at: 2,
        last: "step 1 passed".into(),
        deployment: Some((
            split(&[("v1", 50), ("wide", 50)]),
            "rollout r1: step 2".into(),
        )),
    };
    assert!(matches!(
        r.advance_rollout(&seen, a, &next, "driver a").await,
        Err(RegistryError::Refused(_))
    ));
    let g2 = r
        .advance_rollout(&seen, b, &next, "driver b")
        .await
        .expect("b advances");
    assert_eq!(g2, g + 1);
    // The same judgement again (a retry, or a second driver with a stale read): refused.
    assert!(matches!(
        r.advance_rollout(&seen, b, &next, "driver b").await,
        Err(RegistryError::Refused(_))
    ));
    let now = r.running_rollouts().await.expect("running").remove(0);
    assert_eq!(
        (now.step, now.generation, now.last.as_str()),
        (1, g2, "step 1 passed")
    );
    assert_eq!(
        r.history("users").await.expect("history")[0].actor,
        "driver b"
    );

    // An operator's abort ends it and fences every driver out.
    let ended = r
        .end_rollout("users", ABORTED, "aborted by ops")
        .await
        .expect("end");
    assert_eq!(ended.map(|e| e.id), Some("r1".to_string()));
    assert!(r.running_rollouts().await.expect("running").is_empty());
    assert!(matches!(
        r.advance_rollout(&now, b, &RolloutChange { step: 2, ..next }, "driver b")
            .await,
        Err(RegistryError::Refused(_))
    ));
    assert_eq!(r.rollouts("users").await.expect("all")[0].state, ABORTED);
}

/// A version that widens what its function may do takes no traffic until approved.
async fn approval(r: &Registry, module: &str) {
    let wide = VersionRow {
        widens: vec!["imports the `db` capability".into()],
        ..version("wide", module)
    };
    r.create_version(&wide).await.expect("create");
    let live = r.deployment("users").await.expect("get").expect("live");
    let refused = r
        .set_deployment(
            "users",
            Some(live.generation),
            &split(&[("v1", 90), ("wide", 10)]),
            "ops",
            "x",
        )
        .await;
    assert!(
        matches!(&refused, Err(RegistryError::Refused(why)) if why.contains("imports the `db` capability")),
        "{refused:?}"
    );
    // At 0% it may be deployed (for previews).
    let g = r
        .set_deployment(
            "users",
            Some(live.generation),
            &split(&[("v1", 100), ("wide", 0)]),
            "ops",
            "x",
        )
        .await
        .expect("held at 0%");
    assert!(matches!(
        r.approve_version("users", "v1", "ops").await,
        Err(RegistryError::Invalid(_))
    ));
    let approved = r
        .approve_version("users", "wide", "lead")
        .await
        .expect("approve");
    assert_eq!(
        (approved.approved_by.as_str(), approved.held()),
        ("lead", false)
    );
    r.set_deployment(
        "users",
        Some(g),
        &split(&[("v1", 90), ("wide", 10)]),
        "ops",
        "x",
    )
    .await
    .expect("approved: takes traffic");
}

/// Per-version figures: rows of several processes and flushes add up; a window and pruning
/// leave out the old ones.
async fn figures(r: &Registry) {
    let figures = |requests, failed, latency: &[u64]| Figures {
        requests,
        failed,
        refused: 1,
        latency: latency.to_vec(),
    };
    let add = |label, process, flush, at, f: Figures| async move {
        r.add_figures(("users", label), (process, flush), at, &f)
            .await
            .expect("add");
    };
    add("v1", "a", 0, 100, figures(10, 1, &[10])).await;
    add("v1", "a", 1, 100, figures(5, 0, &[0, 5])).await;
    add("v1", "b", 0, 101, figures(20, 2, &[0, 0, 20])).await;
    add("v2", "b", 0, 50, figures(7, 7, &[7])).await;
    let all = r.figures("users", 0).await.expect("read");
    let v1 = &all["v1"];
    assert_eq!((v1.requests, v1.failed, v1.refused), (35, 3, 3));
    assert_eq!(v1.latency, [10, 5, 20]);
    assert_eq!(all["v2"].requests, 7);
    let recent = r.figures("users", 100).await.expect("read");
    assert_eq!(recent.keys().collect::<Vec<_>>(), ["v1"]);
    assert!(r.figures("other", 0).await.expect("read").is_empty());
    assert_eq!(r.prune_figures(101).await.expect("prune"), 3);
    assert_eq!(
        r.figures("users", 0).await.expect("read")["v1"].requests,
        20
    );
}

#[tokio::test]
async fn sqlite_conforms() {
    let dir = tempfile::tempdir().expect("tmp");
    suite(
        open(&format!(
            "sqlite://{}",
            dir.path().join("registry.db").display()
        ))
        .await,
    )
    .await;
}

#[tokio::test]
async fn postgres_conforms() {
    suite(open(&fresh_postgres().await).await).await;
}

#[tokio::test]
async fn concurrent_changes_from_one_generation_let_exactly_one_through() {
    let url = fresh_postgres().await;
    let r = open(&url).await;
    let a = r.put_module(b"m").await.expect("put");
    r.create_version(&version("v1", &a)).await.expect("v1");
    r.create_version(&version("v2", &a)).await.expect("v2");
    r.set_deployment("users", None, &split(&[("v1", 100)]), "ops", "first")
        .await
        .expect("deploy");
    // Eight "processes", each with its own pool, all based on generation 1.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let r = open(&url).await;
        tasks.push(tokio::spawn(async move {
            r.set_deployment(
                "users",
                Some(1),
                &split(&[("v1", 100 - i), ("v2", i)]),
                "ops",
                "race",
            )
            .await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(2) => won += 1,
            Err(RegistryError::Stale { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(won, 1);
}
