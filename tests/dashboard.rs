//! The dashboard in a real browser: Debian's Chromium, headless, driven by
//! ChromeDriver, against a real server that decided real events. Every
//! number a page shows is checked against the API; screenshots of every
//! page go to `target/screenshots/`.

use std::path::PathBuf;
use std::time::Duration;

use nudge::config::{NamedToken, Role};
use nudge::event::now_ms;
use nudge_integration_tests::webdriver::Browser;
use nudge_integration_tests::*;
use serde_json::{json, Value};

const WRITE_KEY: &str = "wk_ui";
const OPERATOR: &str = "op-secret-1";
const VIEWER: &str = "viewer-secret-1";
const AGENT: &str = "agent-secret-1";

fn shots() -> PathBuf {
    root().join("target/screenshots")
}

fn token(name: &str, role: Role, secret: &str) -> NamedToken {
    NamedToken {
        name: name.into(),
        role,
        secret: secret.into(),
    }
}

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

fn login(b: &Browser, server: &Server, secret: &str) {
    b.goto(&server.url("/ui/"));
    assert!(
        b.url().contains("/ui/login"),
        "not sent to the login: {}",
        b.url()
    );
    b.type_into("#token", secret);
    b.click("form.login button[type=submit]");
    b.element("header .who");
}

fn logout(b: &Browser) {
    b.click("header form[action='/ui/logout'] button");
    b.wait_url("/ui/login");
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

#[test]
fn the_dashboard_shows_what_the_api_says_and_acts_for_the_right_roles() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = test_config(data.path());
    cfg.ingest.write_keys = vec![WRITE_KEY.into()];
    cfg.api.token = vec![
        token("ops", Role::Operator, OPERATOR),
        token("exec", Role::Viewer, VIEWER),
        token("agent-7", Role::Agent, AGENT),
    ];
    let server = Server::start(cfg);
    let auth = bearer(WRITE_KEY);
    // Real events: seed1 (March 2026; all matured by now), then a fresh
    // large deposit for the contact centre, and a customer whose id is
    // markup.
    let text = std::fs::read_to_string(fixture("seed1/events.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for chunk in lines.chunks(1000) {
        let r = server.post(
            "/v1/batch",
            Some(&auth),
            &[],
            serde_json::to_vec(&json!({ "batch": chunk })).unwrap(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let caller = (0..500)
        .map(|i| format!("c-ui-{i}"))
        .find(|c| nudge::decide::bucket(c, "large-deposit") >= 10)
        .unwrap();
    let evil = r#"<script>window.pwned=1</script>"#;
    let now = now_ms();
    let fresh = json!({"batch": [
        {"type": "track", "userId": caller, "messageId": "m-ui-1", "timestamp": nudge::event::format_ts(now),
         "event": "Deposit Made", "properties": {"amount": 80000.0}},
        {"type": "identify", "userId": evil, "messageId": "m-ui-2", "timestamp": nudge::event::format_ts(now),
         "traits": {"name": "<img src=x onerror=window.pwned=2>"}},
    ]});
    let r = server.post(
        "/v1/batch",
        Some(&auth),
        &[],
        serde_json::to_vec(&fresh).unwrap(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let total = lines.len() as f64 + 2.0;
    eventually(Duration::from_secs(60), "every event decided", || {
        (server.metric("nudge_events_processed_total") >= total).then_some(())
    });
    let action_path = format!("/v1/customers/{caller}/actions");
    eventually(Duration::from_secs(20), "the caller's action", || {
        let a = server.get(&action_path, Some(&bearer(OPERATOR))).json();
        (a["actions"].as_array().is_some_and(|a| a.len() == 1)).then_some(())
    });

    let b = Browser::start();
    // Nothing without a session: the login page, and refusals.
    b.goto(&server.url("/ui/campaigns"));
    assert!(b.url().contains("/ui/login"), "{}", b.url());
    b.screenshot(&shots().join("login.png"));

    // A viewer: results, no operations, no pause.
    login(&b, &server, VIEWER);
    b.wait_url("/ui/overview");
    b.screenshot(&shots().join("overview.png"));
    let api = server
        .get(
            &format!("/v1/reports?from={}", now - 30 * 86_400_000),
            Some(&bearer(VIEWER)),
        )
        .json();
    let campaigns = api["campaigns"].as_array().unwrap().clone();
    let with_ci: Vec<&Value> = campaigns
        .iter()
        .filter(|m| !m["incremental_conversions_ci95"].is_null())
        .collect();
    // Seed1 is older than 30 days: the default period has nothing...
    assert!(with_ci.is_empty(), "{with_ci:?}");
    // ...so look at all time, as the API does without a period.
    b.click("nav.periods a[href='/ui/overview?days=all']");
    b.wait_url("days=all");
    b.screenshot(&shots().join("overview-all.png"));
    let all = server.get("/v1/reports", Some(&bearer(VIEWER))).json();
    let all_rows = all["campaigns"].as_array().unwrap().clone();
    let sum = |field: &str| -> f64 {
        all_rows
            .iter()
            .filter(|m| !m["incremental_conversions_ci95"].is_null())
            .map(|m| num(&m[field]))
            .sum()
    };
    let shown = |id: &str| -> f64 {
        b.run(
            "return document.getElementById(arguments[0]).dataset.value;",
            json!([id]),
        )
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
    };
    for (id, field) in [
        ("total-conversions", "incremental_conversions"),
        ("total-value", "incremental_value"),
        ("total-net", "net_value"),
    ] {
        let (page, api) = (shown(id), sum(field));
        assert!(
            (page - api).abs() < 1e-6 * api.abs().max(1.0),
            "{id}: page {page}, API {api}"
        );
    }
    assert!(
        b.find("a[href='/ui/operations']").is_none(),
        "a viewer sees no Operations link"
    );

    // The leaderboard's order is net value's order.
    b.goto(&server.url("/ui/campaigns?days=all"));
    b.screenshot(&shots().join("campaigns.png"));
    let order: Vec<String> = serde_json::from_value(b.run(
        "return [...document.querySelectorAll('#leaderboard tbody tr')].map(r => r.dataset.campaign);",
        json!([]),
    ))
    .unwrap();
    let mut want = all_rows.clone();
    want.sort_by(
        |a, b| match (a["net_value"].as_f64(), b["net_value"].as_f64()) {
            (Some(x), Some(y)) => y.total_cmp(&x),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a["campaign"].as_str().cmp(&b["campaign"].as_str()),
        },
    );
    let want: Vec<String> = want
        .iter()
        .map(|m| m["campaign"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(order, want);

    // A campaign's funnel is the API's.
    let detail = server
        .get("/v1/reports/cart-abandon", Some(&bearer(VIEWER)))
        .json();
    b.goto(&server.url("/ui/campaigns/cart-abandon"));
    b.screenshot(&shots().join("campaign.png"));
    for step in [
        "fired",
        "qualified",
        "suppressed_consent",
        "suppressed_frequency",
        "suppressed_policy",
        "sent",
        "control",
    ] {
        let shown = b.text(&format!("#funnel tr[data-step='{step}'] td.num"));
        assert_eq!(
            shown,
            detail["funnel"][step].to_string(),
            "funnel step {step}"
        );
    }
    assert!(
        b.find("#campaign-pause").is_none(),
        "a viewer has no pause button"
    );
    // Nor may a viewer pause by hand-made request, even with the page's CSRF.
    let status = b.run_async(
        "const done = arguments[arguments.length - 1];
         const csrf = document.querySelector('input[name=csrf]').value;
         fetch('/ui/campaigns/cart-abandon/pause', {method: 'POST', body: new URLSearchParams({csrf})})
           .then(r => done(r.status)).catch(e => done(String(e)));",
        json!([]),
    );
    assert_eq!(status, json!(403));
    b.goto(&server.url("/ui/operations"));
    assert!(b.text("main h1").contains("Not for your role"));
    logout(&b);

    // An operator: pause from the campaign page; the next event is not
    // decided for it.
    login(&b, &server, OPERATOR);
    b.goto(&server.url("/ui/campaigns/welcome"));
    b.click("#campaign-pause");
    b.element("#campaign-resume");
    assert!(
        b.text("#campaign-state").contains("paused"),
        "{}",
        b.text("#campaign-state")
    );
    let listed = server.get("/v1/campaigns", Some(&bearer(OPERATOR))).json();
    let welcome = listed["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "welcome")
        .cloned()
        .unwrap();
    assert!(!welcome["paused"].is_null(), "{welcome}");
    let newcomer = json!({"type": "identify", "userId": "c-ui-new", "messageId": "m-ui-3",
        "timestamp": nudge::event::format_ts(now_ms()),
        "traits": {"email": "new@example.com", "consent_email": true}});
    let r = server.post(
        "/v1/identify",
        Some(&auth),
        &[],
        serde_json::to_vec(&newcomer).unwrap(),
    );
    assert_eq!(r.status, 200);
    eventually(Duration::from_secs(20), "the newcomer decided", || {
        (server.metric("nudge_events_processed_total") >= total + 1.0).then_some(())
    });
    let view = server
        .get("/v1/customers/c-ui-new", Some(&bearer(OPERATOR)))
        .json();
    assert_eq!(
        view["decisions"],
        json!([]),
        "a paused campaign decided: {view}"
    );
    b.click("#campaign-resume");
    b.element("#campaign-pause");
    assert!(b.text("#campaign-state").contains("deciding"));

    // Operations: live numbers, refreshed by the script without a reload.
    b.goto(&server.url("/ui/operations"));
    eventually(Duration::from_secs(20), "the live part to refresh", || {
        let r = b.run(
            "return document.getElementById('live').dataset.refreshed || null;",
            json!([]),
        );
        (!r.is_null()).then_some(())
    });
    assert!(b.find("#generations").is_some());
    b.screenshot(&shots().join("operations.png"));
    logout(&b);

    // An agent: the caller's pre-thought action; accept records it.
    login(&b, &server, AGENT);
    b.wait_url("/ui/contact");
    b.type_into("#id", &caller);
    b.click("form.search button");
    b.wait_url("?id=");
    assert!(b
        .text("article.action .script")
        .starts_with("Update client on new term deposit rates"));
    b.screenshot(&shots().join("contact.png"));
    b.click("article.action button.accept");
    b.element("#no-actions");
    let all_actions = server
        .get(&format!("{action_path}?all=true"), Some(&bearer(OPERATOR)))
        .json();
    assert_eq!(
        all_actions["actions"][0]["outcome"], "accepted",
        "{all_actions}"
    );
    // Results are not an agent's.
    b.goto(&server.url("/ui/overview"));
    assert!(b.text("main h1").contains("Not for your role"));

    // A customer whose id and traits are markup is shown as text.
    b.goto(&server.url(&format!("/ui/customer?id={}", urlencode(evil))));
    assert_eq!(b.text("#customer-id"), evil);
    assert!(b
        .text("#traits")
        .contains("<img src=x onerror=window.pwned=2>"));
    assert_eq!(
        b.run("return window.pwned === undefined;", json!([])),
        json!(true)
    );
    b.screenshot(&shots().join("customer.png"));
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
