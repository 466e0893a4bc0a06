//! Rate limits and quotas end to end: the shipped `rate-limit` policy (a real component run by
//! real wasmtime) charging the host's quota store (real sled) on live HTTPS requests with real
//! libtorch forwards, and the quota admin API.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{TestAppliance, preload, robot_request};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use vla_api::{QuotaList, RobotQuota};

fn header(r: &reqwest::Response, name: &str) -> u64 {
    r.headers().get(name).unwrap_or_else(|| panic!("no {name}")).to_str().unwrap().parse().unwrap()
}

async fn start(policy_config: Value) -> TestAppliance {
    TestAppliance::start(|config, _| {
        config.policy.preload = vec![preload("rate-limit", "admission", 0, policy_config)];
    })
    .await
}

async fn quota(app: &TestAppliance, robot: &str) -> RobotQuota {
    let r = app.admin(Method::GET, &format!("/admin/quotas/{robot}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

async fn put(app: &TestAppliance, robot: &str, body: Value) -> reqwest::Response {
    app.admin(Method::PUT, &format!("/admin/quotas/{robot}")).json(&body).send().await.unwrap()
}

#[tokio::test]
async fn a_robot_limited_to_ten_per_minute_gets_429_on_the_eleventh_with_a_retry_after_that_holds() {
    let app = start(json!({"robot": {"rate": "1000/min"}, "exempt_instructions": ["stop"]})).await;
    app.robot_key("arm-1").await;
    assert_eq!(put(&app, "arm-1", json!({"rate": "10/min"})).await.status(), StatusCode::OK);

    for i in 0..10u64 {
        let r = app.infer(robot_request(1)).await;
        assert_eq!(r.status(), StatusCode::OK, "request {}", i + 1);
        assert_eq!(header(&r, "ratelimit-limit"), 10);
        assert_eq!(header(&r, "ratelimit-remaining"), 9 - i);
        assert!(header(&r, "ratelimit-reset") <= 60);
    }
    let r = app.infer(robot_request(1)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after = header(&r, "retry-after");
    // One request comes back every 6 s, counted from the first of the ten.
    assert!((1..=6).contains(&retry_after), "Retry-After: {retry_after}");
    assert_eq!(header(&r, "ratelimit-remaining"), 0);
    assert_eq!(header(&r, "ratelimit-limit"), 10);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(body["denied_by"]["name"], "rate-limit");
    assert_eq!(body["denied_by"]["code"], "rate_limited");
    assert!(body["denied_by"]["reason"].as_str().unwrap().contains("arm-1"), "{body}");

    // A stop always gets through (here nothing is left to charge).
    let mut stop = robot_request(1);
    stop.instruction = "stop".into();
    assert_eq!(app.infer(stop).await.status(), StatusCode::OK);

    // The refusals were not charged either: after Retry-After exactly one more request fits.
    tokio::time::sleep(Duration::from_millis(retry_after * 1000 + 50)).await;
    assert_eq!(app.infer(robot_request(1)).await.status(), StatusCode::OK);
    assert_eq!(app.infer(robot_request(1)).await.status(), StatusCode::TOO_MANY_REQUESTS);

    let q = quota(&app, "arm-1").await;
    let rate = q.buckets.iter().find(|b| b.scope == "robot" && b.bucket == "rate").unwrap();
    assert_eq!((rate.limit, rate.remaining, rate.source.as_str()), (10, 0, "admin"));
    assert_eq!(q.overrides.rate.as_deref(), Some("10/min"));
}

#[tokio::test]
async fn a_stop_is_charged_like_any_request_but_never_refused_and_only_a_whole_stop_is_one() {
    let app =
        start(json!({"robot": {"rate": "1000/min"}, "exempt_instructions": ["stop", "halt", "emergency stop"]})).await;
    app.robot_key("arm-1").await;
    assert_eq!(put(&app, "arm-1", json!({"day": 2})).await.status(), StatusCode::OK);
    let with = |instruction: &str| {
        let mut r = robot_request(1);
        r.instruction = instruction.into();
        r
    };
    // While the day has room, a stop is charged like any request.
    let r = app.infer(with("stop")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "ratelimit-remaining"), 1);
    assert_eq!(app.infer(with("pick up the red block")).await.status(), StatusCode::OK);
    // The day is used up: a stop still gets through, whatever its case and spacing ...
    for stop in ["stop", "  STOP ", "Emergency Stop", "halt"] {
        assert_eq!(app.infer(with(stop)).await.status(), StatusCode::OK, "`{stop}`");
    }
    // ... but an instruction that merely starts like one is charged and refused.
    for other in ["stop and pick up the red block", "emergency stop then resume", "halt-and-catch-fire"] {
        let r = app.infer(with(other)).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "`{other}`");
        assert_eq!(r.json::<Value>().await.unwrap()["denied_by"]["code"], "quota_exhausted");
    }
    let day = quota(&app, "arm-1").await.buckets.into_iter().find(|b| b.scope == "robot" && b.bucket == "day").unwrap();
    assert_eq!((day.used, day.remaining), (2, 0));
}

#[tokio::test]
async fn sixty_four_concurrent_requests_of_one_robot_never_spend_a_request_twice() {
    let app = TestAppliance::start(|config, _| {
        config.policy.preload =
            vec![preload("rate-limit", "admission", 0, json!({"robot": {"rate": "1/h", "burst": 20}}))];
        // 64 calls at once on two cores (beside the other tests) can wait past the default
        // 20 ms wall-clock budget and fail closed; this test is about spending, not timing.
        config.policy.timeout_ms = 5_000;
        // All 64 in flight at once, past the per-robot bound (tests/hostile.rs covers that).
        config.limits.max_in_flight_per_robot = 64;
    })
    .await;
    app.robot_key("arm-2").await;
    let app = std::sync::Arc::new(app);
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let r = app.infer(robot_request(2)).await;
                (r.status(), r.text().await.unwrap())
            })
        })
        .collect();
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            (StatusCode::OK, _) => ok += 1,
            (StatusCode::TOO_MANY_REQUESTS, _) => limited += 1,
            (other, body) => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((ok, limited), (20, 44));
    let q = quota(&app, "arm-2").await;
    assert_eq!(q.buckets.iter().find(|b| b.bucket == "rate").unwrap().used, 20);
}

#[tokio::test]
async fn group_limits_from_the_configuration_bind_every_robot_of_the_group() {
    let app = TestAppliance::start(|config, _| {
        config.policy.preload = vec![preload("rate-limit", "admission", 0, json!({"robot": {"rate": "100/min"}}))];
        config.quota.groups.insert("line-a".into(), vla_api::QuotaLimits { day: Some(3), ..Default::default() });
    })
    .await;
    for robot in ["g-1", "g-2"] {
        app.register_in(robot, "line-a").await;
    }
    let mut request = robot_request(3);
    let mut statuses = Vec::new();
    for robot in ["g-1", "g-2", "g-1", "g-2"] {
        request.robot_id = robot.into();
        statuses.push(app.infer(request.clone()).await);
    }
    assert_eq!(statuses.iter().map(|r| r.status()).collect::<Vec<_>>()[..3], [StatusCode::OK; 3]);
    let refused = statuses.pop().unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    // Until the next UTC midnight.
    assert!(header(&refused, "retry-after") <= 86_400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["denied_by"]["code"], "quota_exhausted");
    let q = quota(&app, "g-2").await;
    let day = q.buckets.iter().find(|b| b.scope == "group" && b.bucket == "day").unwrap();
    assert_eq!((day.limit, day.used, day.source.as_str()), (3, 3, "config"));
}

#[tokio::test]
async fn the_rate_limit_policy_is_replaced_by_upload_without_a_restart() {
    let app = start(json!({"robot": {"rate": "2/min"}})).await;
    app.robot_key("arm-4").await;
    for _ in 0..2 {
        assert_eq!(app.infer(robot_request(4)).await.status(), StatusCode::OK);
    }
    assert_eq!(app.infer(robot_request(4)).await.status(), StatusCode::TOO_MANY_REQUESTS);
    let r = app
        .upload_policy(
            "rate-limit",
            &[("name", "rate-limit"), ("world", "admission"), ("config", r#"{"robot": {"rate": "100/min"}}"#)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    // The two requests used carry over to the new rate: 98 of 100 left after the next.
    let r = app.infer(robot_request(4)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "ratelimit-limit"), 100);
    assert_eq!(header(&r, "ratelimit-remaining"), 97);
}

#[tokio::test]
async fn a_shadow_rate_limit_policy_charges_nothing_and_refused_requests_are_given_back() {
    let app = TestAppliance::start(|config, _| {
        let mut shadow = preload("rate-limit", "admission", 0, json!({"robot": {"day": 1}}));
        shadow.mode = "shadow".into();
        config.policy.preload =
            vec![shadow, preload("instruction-filter", "admission", 10, json!({"deny": ["forbidden"]}))];
        config.quota.robots.insert("arm-5".into(), vla_api::QuotaLimits { day: Some(2), ..Default::default() });
    })
    .await;
    app.robot_key("arm-5").await;
    for _ in 0..3 {
        assert_eq!(app.infer(robot_request(5)).await.status(), StatusCode::OK);
    }
    let q = quota(&app, "arm-5").await;
    assert!(q.buckets.iter().all(|b| b.used == 0), "{q:?}");

    // Enforcing now: a request the next policy refuses is not charged.
    let r =
        app.admin(Method::PATCH, "/admin/policies/rate-limit").json(&json!({"mode": "enforce"})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut bad = robot_request(5);
    bad.instruction = "a forbidden move".into();
    assert_eq!(app.infer(bad).await.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let q = quota(&app, "arm-5").await;
    assert_eq!(q.buckets.iter().find(|b| b.bucket == "day").unwrap().used, 0, "{q:?}");
    assert_eq!(app.infer(robot_request(5)).await.status(), StatusCode::OK);
    assert_eq!(quota(&app, "arm-5").await.buckets.iter().find(|b| b.bucket == "day").unwrap().used, 1);
}

#[tokio::test]
async fn the_quota_admin_api_lists_sets_resets_and_names_bad_fields() {
    let app = start(json!({"robot": {"rate": "5/min"}})).await;
    app.robot_key("arm-6").await;
    assert_eq!(app.infer(robot_request(6)).await.status(), StatusCode::OK);

    let list: QuotaList = app.admin(Method::GET, "/admin/quotas").send().await.unwrap().json().await.unwrap();
    let arm = list.robots.iter().find(|r| r.robot_id == "arm-6").unwrap();
    let rate = &arm.buckets[0];
    assert_eq!((rate.bucket.as_str(), rate.limit, rate.used, rate.source.as_str()), ("rate", 5, 1, "policy"));

    for (body, field) in [
        (json!({"day": -1}), "day"),
        (json!({"rate": "10 per minute"}), "rate"),
        (json!({"rate": "10/fortnight"}), "rate"),
        (json!({"burst": 3}), "burst"),
        (json!({"rate": "10/min", "burst": 0}), "burst"),
        (json!({"daily": 5}), "daily"),
    ] {
        let r = put(&app, "arm-6", body.clone()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        let error: Value = r.json().await.unwrap();
        assert!(error["error"].as_str().unwrap().contains(&format!("`{field}`")), "{body}: {error}");
    }
    let r = put(&app, "nobody", json!({"day": 5})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("robot `nobody` is not registered"));
    let r = app.admin(Method::GET, "/admin/quotas/nobody").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = app.admin(Method::POST, "/admin/quotas/nobody/reset").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let r = put(&app, "arm-6", json!({"day": 7})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let q: RobotQuota = r.json().await.unwrap();
    let day = q.buckets.iter().find(|b| b.bucket == "day").unwrap();
    assert_eq!((day.limit, day.remaining, day.source.as_str()), (7, 7, "admin"));

    let r = app.admin(Method::POST, "/admin/quotas/arm-6/reset").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let q = quota(&app, "arm-6").await;
    assert!(q.buckets.iter().all(|b| b.used == 0), "{q:?}");
    // `{}` clears the override; robots cannot read quotas.
    assert_eq!(put(&app, "arm-6", json!({})).await.status(), StatusCode::OK);
    assert!(quota(&app, "arm-6").await.buckets.iter().all(|b| b.bucket != "day"));
    let r = app.as_robot("arm-6", Method::GET, "/admin/quotas").await.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}
