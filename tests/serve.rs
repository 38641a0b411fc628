//! `nudge serve` end to end, with real peers on loopback: a real Segment SDK
//! sending events, a real SMTP server (aiosmtpd) receiving email, a real
//! HTTP receiver for webhooks, sled on disk.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use nudge::event::now_ms;
use nudge_integration_tests::*;
use serde_json::{json, Value};

const WRITE_KEY: &str = "wk_test";
const AUTH: &str = "Bearer wk_test";
const API_TOKEN: &str = "Bearer api_test";

fn ts(ms: i64) -> String {
    nudge::event::format_ts(ms)
}

fn config(data: &Path) -> nudge::config::Config {
    let mut cfg = test_config(data);
    cfg.ingest.write_keys = vec![WRITE_KEY.into()];
    cfg.api.tokens = vec!["api_test".into()];
    cfg
}

fn batch(events: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({ "batch": events })).unwrap()
}

fn wait_processed(server: &Server, n: f64) {
    eventually(Duration::from_secs(30), "events to be decided", || {
        (server.metric("nudge_events_processed_total") >= n).then_some(())
    });
}

#[test]
fn serve_and_replay_decide_identically() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    // Event time drives the timers, as in replay.
    cfg.server.clock = nudge::config::Clock::Event;
    let server = Server::start(cfg);
    let text = std::fs::read_to_string(fixture("seed1/events.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for chunk in lines.chunks(400) {
        // In order: each batch is acknowledged before the next is sent.
        let r = server.post("/v1/batch", Some(AUTH), &[], batch(chunk));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["accepted"], chunk.len());
    }
    wait_processed(&server, lines.len() as f64);
    explains_one_decision_of_each_outcome(&server);
    exports_the_decision_log_in_pages(&server);
    reports_what_replay_measures(&server);
    server.stop().unwrap();
    assert_decides_as_replay(data.path(), "batches in order");
}

/// `GET /v1/customers/{id}` shows, for one decision of each outcome of
/// seed1, the check that decided it and evidence consistent with the rest
/// of the decision log.
fn explains_one_decision_of_each_outcome(server: &Server) {
    let text = std::fs::read_to_string(fixture("seed1/decisions.jsonl")).unwrap();
    let all: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ms = |v: &Value| nudge::event::parse_ts(v.as_str().unwrap()).unwrap();
    for outcome in nudge::decide::Outcome::ALL.map(|o| o.as_str()) {
        let d = all
            .iter()
            .find(|d| d["outcome"] == outcome)
            .unwrap_or_else(|| panic!("seed1 has no {outcome} decision"));
        let customer = d["customer"].as_str().unwrap();
        let r = server.get(
            &format!("/v1/customers/{customer}?limit=1000"),
            Some(API_TOKEN),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let view = r.json();
        assert_eq!(view["customer"], customer);
        assert!(view["traits"].is_object());
        let shown = view["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["ts"] == d["ts"] && e["campaign"] == d["campaign"])
            .unwrap_or_else(|| panic!("{outcome}: {d} is not in {view}"));
        assert_eq!(shown["outcome"], outcome);
        assert!(
            shown["reason"].as_str().unwrap().starts_with(outcome),
            "{shown}"
        );
        let why = &shown["why"];
        let t = ms(&d["ts"]);
        match outcome {
            "sent" | "control" => {
                assert_eq!(why["check"], "holdout", "{why}");
                let control =
                    why["bucket"].as_u64().unwrap() < why["holdout_pct"].as_u64().unwrap();
                assert_eq!(control, outcome == "control", "{why}");
            }
            "suppressed_consent" => {
                assert_eq!(why["check"], "consent", "{why}");
                assert!(why["consent_trait"].is_string(), "{why}");
                assert_ne!(why["value"], json!(true), "{why}");
            }
            "suppressed_frequency" => {
                assert_eq!(why["check"], "frequency", "{why}");
                let previous = why["previous"].as_i64().unwrap();
                assert!(
                    previous <= t && t - previous < why["frequency_ms"].as_i64().unwrap(),
                    "{why}"
                );
                // The earlier decision it counted is in the log.
                assert!(
                    all.iter().any(|e| e["customer"] == customer
                        && e["campaign"] == d["campaign"]
                        && ms(&e["ts"]) == previous
                        && (e["outcome"] == "sent" || e["outcome"] == "control")),
                    "{why}"
                );
            }
            "suppressed_policy" => {
                assert_eq!(why["check"], "policy", "{why}");
                assert!(!why["policy"].as_str().unwrap().is_empty(), "{why}");
                let counted = why["counted"].as_array().unwrap();
                assert!(
                    counted.len() as u64 >= why["limit"].as_u64().unwrap(),
                    "{why}"
                );
                let window = why["window_ms"].as_i64().unwrap();
                for c in counted {
                    assert!((t - c.as_i64().unwrap()).abs() < window, "{why}");
                }
            }
            "suppressed_arbitration" => {
                assert_eq!(why["check"], "arbitration", "{why}");
                assert!(
                    why["winner_priority"].as_i64() >= why["priority"].as_i64(),
                    "{why}"
                );
                assert!(
                    all.iter().any(|e| e["customer"] == customer
                        && e["campaign"] == why["winner"]
                        && e["ts"] == d["ts"]
                        && (e["outcome"] == "sent" || e["outcome"] == "control")),
                    "the winner {why} has no decision at {}",
                    d["ts"]
                );
            }
            _ => unreachable!(),
        }
    }
    // Without a token, nothing.
    assert_eq!(server.get("/v1/customers/c-000001", None).status, 401);
}

/// `GET /v1/reports` on the event clock gives exactly the numbers of
/// `nudge replay --measure` over the same events, from the server's tallies
/// (never reading the decision log); `GET /v1/reports/{campaign}` adds the
/// days.
fn reports_what_replay_measures(server: &Server) {
    let out = tempfile::tempdir().unwrap();
    let opts = nudge::replay::Options {
        measure: Some(out.path().join("measure.jsonl")),
        ..replay_options(fixture("seed1/events.jsonl"), out.path())
    };
    let summary = nudge::replay::run(&opts).unwrap();
    let as_of = summary.measures[0].as_of.clone();
    // Only the live server counts deliveries, agents' answers and who won
    // an arbitration; the replay keeps days apart.
    let strip = |mut m: Value| {
        let f = m["funnel"].as_object_mut().unwrap();
        for k in [
            "arbitration_lost_to",
            "delivered",
            "delivery_failed",
            "dead_lettered",
            "accepted",
            "declined",
        ] {
            f.remove(k);
        }
        m.as_object_mut().unwrap().remove("daily");
        m
    };
    let want: Vec<Value> = summary
        .measures
        .iter()
        .map(|m| strip(serde_json::to_value(m).unwrap()))
        .collect();
    let r = server.get(&format!("/v1/reports?as_of={as_of}"), Some(API_TOKEN));
    assert_eq!(r.status, 200, "{}", r.body);
    let listing = r.json();
    assert_eq!(listing["as_of"], as_of.as_str());
    let got: Vec<Value> = listing["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .cloned()
        .map(strip)
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w, "{}", w["campaign"]);
    }
    assert!(
        want.iter()
            .any(|m| m["converted_treated"].as_u64() > Some(50)),
        "seed1 has conversions to compare"
    );
    // `nudge report --url` reads the same answer.
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_nudge-under-test"))
        .args([
            "report",
            "--url",
            &server.url(""),
            "--json",
            "--as-of",
            &as_of,
        ])
        .env("NUDGE_API_TOKEN", "api_test")
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let printed: Vec<Value> = String::from_utf8(cli.stdout)
        .unwrap()
        .lines()
        .map(|l| strip(serde_json::from_str(l).unwrap()))
        .collect();
    assert_eq!(printed, want);
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_nudge-under-test"))
        .args(["report", "--url", &server.url(""), "--token", "wrong"])
        .output()
        .unwrap();
    assert!(!cli.status.success());
    assert!(
        String::from_utf8_lossy(&cli.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    // Without as_of, the event clock's now is the last event: the same.
    let r = server.get("/v1/reports", Some(API_TOKEN));
    assert_eq!(r.json()["as_of"], as_of.as_str());
    // One campaign, with its days: the days' decisions add up.
    let one = &summary.measures[0];
    let r = server.get(
        &format!("/v1/reports/{}?as_of={as_of}", one.campaign),
        Some(API_TOKEN),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let detail = r.json();
    let days = detail["daily"].as_array().unwrap();
    let sent: u64 = days.iter().map(|d| d["sent"].as_u64().unwrap()).sum();
    assert_eq!(sent, one.funnel.sent);
    for d in &one.daily {
        let live = days.iter().find(|l| l["day"] == d.day.as_str()).unwrap();
        assert_eq!(live["sent"], d.funnel.sent, "{}", d.day);
        assert_eq!(
            live["converted_treated"], d.funnel.converted_treated,
            "{}",
            d.day
        );
    }
    // A period selects whole days of decisions.
    let first = &one.daily[0].day;
    let r = server.get(
        &format!(
            "/v1/reports?as_of={as_of}&campaign={}&from={first}T00:00:00Z&to={first}T23:59:59.999Z",
            one.campaign
        ),
        Some(API_TOKEN),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let period = &r.json()["campaigns"][0];
    assert_eq!(period["funnel"]["sent"], one.daily[0].funnel.sent);
    // Refusals name what is wrong.
    assert_eq!(server.get("/v1/reports", None).status, 401);
    let r = server.get("/v1/reports/no-such-campaign", Some(API_TOKEN));
    assert_eq!(r.status, 404, "{}", r.body);
    let r = server.get("/v1/reports?as_of=soon", Some(API_TOKEN));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("as_of"), "{}", r.body);
    let r = server.get("/v1/reports?as_of=2020-01-01T00:00:00Z", Some(API_TOKEN));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("latest maturity"), "{}", r.body);
}

/// Decision rows older than `[measure] retention` go (soon after a
/// start-up, then hourly); the reports, from their tallies, do not change.
#[test]
fn old_decision_rows_go_and_the_reports_stay() {
    // Goal windows of at most 3 days, so that seed1's month has rows older
    // than the longest window.
    let rules = rules_copy();
    for e in std::fs::read_dir(rules.path()).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        let short = text
            .replace(r#"window = "30d""#, r#"window = "3d""#)
            .replace(r#"window = "14d""#, r#"window = "3d""#);
        std::fs::write(e.path(), short).unwrap();
    }
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.server.clock = nudge::config::Clock::Event;
    cfg.server.rules = rules.path().to_owned();
    let server = Server::start(cfg.clone());
    let text = std::fs::read_to_string(fixture("seed1/events.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for chunk in lines.chunks(1000) {
        let r = server.post("/v1/batch", Some(AUTH), &[], batch(chunk));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    wait_processed(&server, lines.len() as f64);
    // Deliveries (no SMTP server here) go on failing in the background:
    // what is compared is what the decisions made.
    let report = |server: &Server, as_of: &str| {
        let mut r = server
            .get(&format!("/v1/reports?as_of={as_of}"), Some(API_TOKEN))
            .json();
        for c in r["campaigns"].as_array_mut().unwrap() {
            let f = c["funnel"].as_object_mut().unwrap();
            for k in ["delivered", "delivery_failed", "dead_lettered"] {
                f.remove(k);
            }
        }
        r
    };
    let as_of = server.get("/v1/reports", Some(API_TOKEN)).json()["as_of"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = report(&server, &as_of);
    let all_rows = server
        .get("/v1/decisions?limit=10000", Some(API_TOKEN))
        .body
        .lines()
        .count();
    server.stop().unwrap();
    // A day of retention: the longest goal window (3 days) plus a day
    // stands instead.
    cfg.measure.retention = nudge::config::Dur(Duration::from_secs(86_400));
    let server = Server::start(cfg);
    // After a restart on the event clock, now is the last decision.
    let last = std::fs::read_to_string(fixture("seed1/decisions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let d: Value = serde_json::from_str(l).unwrap();
            nudge::event::parse_ts(d["ts"].as_str().unwrap()).unwrap()
        })
        .max()
        .unwrap();
    let cutoff = last - 4 * 86_400_000;
    let kept: Vec<Value> = eventually(Duration::from_secs(30), "the retention sweep", || {
        let r = server.get("/v1/decisions?limit=10000", Some(API_TOKEN));
        let rows: Vec<Value> = r
            .body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        rows.iter()
            .all(|d| nudge::event::parse_ts(d["ts"].as_str().unwrap()).unwrap() >= cutoff)
            .then_some(rows)
    });
    let want: Vec<&str> = std::fs::read_to_string(fixture("seed1/decisions.jsonl"))
        .unwrap()
        .leak()
        .lines()
        .filter(|l| {
            let d: Value = serde_json::from_str(l).unwrap();
            nudge::event::parse_ts(d["ts"].as_str().unwrap()).unwrap() >= cutoff
        })
        .collect();
    assert!(
        !want.is_empty() && want.len() < all_rows / 2,
        "{} of {all_rows}",
        want.len()
    );
    assert_eq!(kept.len(), want.len(), "the rows since the cutoff stay");
    // The reports are what they were.
    assert_eq!(report(&server, &as_of), before);
    server.stop().unwrap();
}

/// `GET /v1/decisions`, paged by its cursor, is the decision log exactly;
/// a filter keeps only what it names.
fn exports_the_decision_log_in_pages(server: &Server) {
    let want = std::fs::read_to_string(fixture("seed1/decisions.jsonl")).unwrap();
    let fetch_all = |query: &str| {
        let mut got = String::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/decisions?limit=500&{query}&cursor={c}"),
                None => format!("/v1/decisions?limit=500&{query}"),
            };
            let r = server.get(&path, Some(API_TOKEN));
            assert_eq!(r.status, 200, "{}", r.body);
            got.push_str(&r.body);
            pages += 1;
            match r.headers.get("nudge-next-cursor") {
                Some(c) => cursor = Some(c.to_str().unwrap().to_owned()),
                None => return (got, pages),
            }
        }
    };
    // Decided is not yet persisted: the log reaches sled within a persist.
    let (got, pages) = eventually(
        Duration::from_secs(10),
        "the decision log to be persisted",
        || {
            let (got, pages) = fetch_all("");
            (got == want).then_some((got, pages))
        },
    );
    assert!(
        pages >= 3,
        "{} decisions in {pages} pages of 500",
        got.lines().count()
    );
    let (welcome, _) = fetch_all("campaign=welcome&from=2026-01-01T00:00:00Z");
    let expected: Vec<&str> = want
        .lines()
        .filter(|l| l.contains(r#""campaign":"welcome""#))
        .collect();
    assert_eq!(welcome.lines().collect::<Vec<_>>(), expected);
    let r = server.get("/v1/decisions?from=yesterday", Some(API_TOKEN));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("from"), "{}", r.body);
}

#[test]
fn segment_python_sdk_is_accepted_and_decided() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(config(data.path()));
    let out = python()
        .arg(root().join("tests/servers/segment_client.py"))
        .arg(server.url(""))
        .arg(WRITE_KEY)
        .arg("c-sdk-1")
        .output()
        .expect("python3 segment_client.py");
    assert!(
        out.status.success(),
        "segment client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["errors"], json!([]), "the SDK reported errors");
    wait_processed(&server, 2.0);
    assert_eq!(server.metric("nudge_events_accepted_total"), 2.0);
    assert_eq!(server.metric("nudge_events_unattributed_total"), 1.0);
    server.stop().unwrap();
    let d = decisions(data.path());
    let sdk_ids: Vec<&str> = report["message_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // The identify welcomes the customer; the deposit is large and first.
    let mine: Vec<(&str, &str)> = d
        .iter()
        .filter(|d| d["customer"] == "c-sdk-1")
        .map(|d| {
            (
                d["campaign"].as_str().unwrap(),
                d["trigger"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        mine.contains(&("welcome", sdk_ids[0])),
        "no welcome decision for the SDK's identify: {mine:?}"
    );
    assert!(
        mine.contains(&("large-deposit", sdk_ids[1])),
        "no large-deposit decision for the SDK's track: {mine:?}"
    );
}

#[test]
fn email_reaches_the_smtp_server_once_with_its_idempotency_key() {
    let smtp = SmtpServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.smtp.port = smtp.port;
    let server = Server::start(cfg);
    let now = now_ms();
    let ev = json!({"type": "identify", "userId": "c-mail-1", "messageId": "m-mail-1",
        "timestamp": ts(now), "traits": {"email": "c-mail-1@example.com", "consent_email": true, "name": "Ada"}});
    let r = server.post(
        "/v1/identify",
        Some(AUTH),
        &[],
        serde_json::to_vec(&ev).unwrap(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // The same message again: acknowledged, not processed twice.
    let r = server.post(
        "/v1/identify",
        Some(AUTH),
        &[],
        serde_json::to_vec(&ev).unwrap(),
    );
    assert_eq!(r.json()["duplicates"], 1);
    let mail = eventually(Duration::from_secs(20), "the welcome email", || {
        smtp.messages()
            .into_iter()
            .find(|m| m.to.contains("c-mail-1@example.com"))
    });
    assert_eq!(mail.subject, "Welcome!");
    assert!(mail.body.contains("Hi Ada"), "{}", mail.body);
    assert!(
        mail.message_id.starts_with("<nd-") && mail.message_id.ends_with("@nudge.localhost>"),
        "{}",
        mail.message_id
    );
    eventually(
        Duration::from_secs(10),
        "the delivery to be counted",
        || {
            let m = server.get("/metrics", None).body;
            m.contains("nudge_deliveries_total{channel=\"email\",result=\"ok\"} 1")
                .then_some(())
        },
    );
    let funnel = server.get("/v1/reports/welcome", Some(API_TOKEN)).json()["funnel"].clone();
    assert_eq!(funnel["sent"], 1, "{funnel}");
    assert_eq!(funnel["delivered"], 1, "{funnel}");
    assert_eq!(funnel["dead_lettered"], 0, "{funnel}");
    server.stop().unwrap();
    assert_eq!(smtp.messages().len(), 1, "exactly one message");
    let d = decisions(data.path());
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["outcome"], "sent");
}

#[test]
fn agent_action_is_visible_answerable_and_expires() {
    let rules = rules_copy();
    let file = rules.path().join("large-deposit.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("expires = \"7d\"", "expires = \"4s\"")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.server.rules = rules.path().to_owned();
    let server = Server::start(cfg);
    // Customers outside the 10% holdout of large-deposit.
    let customers: Vec<String> = (0..200)
        .map(|i| format!("c-agent-{i}"))
        .filter(|c| nudge::decide::bucket(c, "large-deposit") >= 10)
        .take(2)
        .collect();
    let now = now_ms();
    let events: Vec<Value> = customers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"type": "track", "userId": c, "messageId": format!("m-agent-{i}"),
                "timestamp": ts(now), "event": "Deposit Made", "properties": {"amount": 50000.0}})
        })
        .collect();
    let r = server.post("/v1/batch", Some(AUTH), &[], batch(&events));
    assert_eq!(r.status, 200, "{}", r.body);
    let path = format!("/v1/customers/{}/actions", customers[0]);
    let actions = eventually(Duration::from_secs(20), "the agent action", || {
        let r = server.get(&path, Some(API_TOKEN));
        assert_eq!(r.status, 200, "{}", r.body);
        let a = r.json()["actions"].as_array().cloned().unwrap_or_default();
        (!a.is_empty()).then_some(a)
    });
    assert_eq!(actions.len(), 1);
    let a = &actions[0];
    assert_eq!(a["campaign"], "large-deposit");
    assert!(
        a["script"]
            .as_str()
            .unwrap()
            .starts_with("Update client on new term deposit rates"),
        "{a}"
    );
    assert!(a["why"].as_str().unwrap().contains("large deposit"), "{a}");
    assert_eq!(a["trigger"], "m-agent-0");
    // Without a token: refused.
    assert_eq!(server.get(&path, None).status, 401);
    // An agent records the outcome, once.
    let id = a["id"].as_str().unwrap();
    let outcome = format!("/v1/customers/{}/actions/{id}/outcome", customers[0]);
    let r = server.post(
        &outcome,
        Some(API_TOKEN),
        &[],
        br#"{"outcome":"accepted","note":"booked"}"#.to_vec(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["outcome"], "accepted");
    let r = server.post(
        &outcome,
        Some(API_TOKEN),
        &[],
        br#"{"outcome":"declined"}"#.to_vec(),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    let r = server.post(
        &outcome,
        Some(API_TOKEN),
        &[],
        br#"{"outcome":"maybe"}"#.to_vec(),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    // The campaign's funnel counts both deliveries to the agents' queue and
    // the one answer.
    let r = server.get("/v1/reports/large-deposit", Some(API_TOKEN));
    assert_eq!(r.status, 200, "{}", r.body);
    let funnel = &r.json()["funnel"];
    assert_eq!(funnel["sent"], 2, "{funnel}");
    assert_eq!(funnel["delivered"], 2, "{funnel}");
    assert_eq!(funnel["accepted"], 1, "{funnel}");
    assert_eq!(funnel["declined"], 0, "{funnel}");
    // Answered: no longer pending.
    assert_eq!(
        server.get(&path, Some(API_TOKEN)).json()["actions"],
        json!([])
    );
    // The other customer's action expires after 4 s.
    let path2 = format!("/v1/customers/{}/actions", customers[1]);
    eventually(Duration::from_secs(20), "the second action", || {
        let a = server.get(&path2, Some(API_TOKEN)).json()["actions"].clone();
        (a.as_array().is_some_and(|a| a.len() == 1)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(
        server.get(&path2, Some(API_TOKEN)).json()["actions"],
        json!([])
    );
    let all = server
        .get(&format!("{path2}?all=true"), Some(API_TOKEN))
        .json();
    assert_eq!(all["actions"].as_array().unwrap().len(), 1, "{all}");
    server.stop().unwrap();
}

#[test]
fn webhook_gets_its_idempotency_key_and_an_unknown_host_is_refused() {
    let receiver = HttpReceiver::start();
    let rules = rules_copy();
    let mut policies = std::fs::read_to_string(rules.path().join("policies.toml")).unwrap();
    policies.push_str("\n[channels.webhook]\nplugin = \"webhook\"\n");
    std::fs::write(rules.path().join("policies.toml"), policies).unwrap();
    std::fs::write(
        rules.path().join("partner-hook.toml"),
        r#"id = "partner-hook"
description = "A loan application: tell the partner system."
trigger = { event = "Loan Applied" }
channel = "webhook"
priority = 10
frequency = "1d"
holdout = 0
"#,
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.server.rules = rules.path().to_owned();
    let granted = format!("127.0.0.1:{}", receiver.port);
    cfg.plugins.insert(
        "webhook".into(),
        nudge::config::PluginGrant {
            http: Some(vec![granted.clone()]),
            config: [("url".to_string(), format!("http://{granted}/hook"))].into(),
        },
    );
    // The SMS plugin is pointed at a host it is not granted.
    cfg.plugins.insert(
        "sms".into(),
        nudge::config::PluginGrant {
            http: Some(vec![granted.clone()]),
            config: [(
                "url".to_string(),
                format!("http://127.0.0.2:{}/sms", receiver.port),
            )]
            .into(),
        },
    );
    let server = Server::start(cfg);
    let now = now_ms();
    let sms_customer = (0..200)
        .map(|i| format!("c-sms-{i}"))
        .find(|c| nudge::decide::bucket(c, "low-balance") >= 20)
        .unwrap();
    let events = vec![
        json!({"type": "track", "userId": "c-hook-1", "messageId": "m-hook-1", "timestamp": ts(now),
            "event": "Loan Applied", "properties": {"amount": 1000}}),
        json!({"type": "identify", "userId": sms_customer, "messageId": "m-sms-0", "timestamp": ts(now),
            "traits": {"phone": "+61400000001", "consent_sms": true}}),
        json!({"type": "track", "userId": sms_customer, "messageId": "m-sms-1", "timestamp": ts(now),
            "event": "Card Declined", "properties": {"reason": "insufficient_funds"}}),
    ];
    let r = server.post("/v1/batch", Some(AUTH), &[], batch(&events));
    assert_eq!(r.status, 200, "{}", r.body);
    let hook = eventually(Duration::from_secs(20), "the webhook", || {
        receiver
            .requests()
            .into_iter()
            .find(|r| r["path"] == "/hook")
    });
    let key = hook["headers"]["idempotency-key"].as_str().unwrap();
    assert!(key.starts_with("nd-"), "{hook}");
    let body: Value = serde_json::from_str(hook["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["customer"], "c-hook-1");
    assert_eq!(
        body["subject"],
        "A loan application: tell the partner system."
    );
    // The SMS went nowhere: refused before any connection, dead-lettered.
    let dead = eventually(
        Duration::from_secs(20),
        "the refused SMS in the dead letters",
        || {
            let r = server.get("/v1/dead-letters", Some(API_TOKEN));
            r.json()["dead_letters"]
                .as_array()
                .and_then(|l| l.iter().find(|d| d["channel"] == "sms").cloned())
        },
    );
    let error = dead["last_error"].as_str().unwrap();
    assert!(
        error.contains("may not send HTTP to 127.0.0.2") && error.contains(&granted),
        "{error}"
    );
    assert_eq!(dead["customer"], sms_customer.as_str());
    assert!(receiver.requests().iter().all(|r| r["path"] != "/sms"));
    let m = server.get("/metrics", None).body;
    assert!(
        m.contains("nudge_deliveries_total{channel=\"sms\",result=\"dead\"} 1"),
        "{m}"
    );
    // The funnel: one SMS sent, not delivered, dead-lettered; one webhook
    // delivered.
    let funnel = |campaign: &str| {
        server
            .get(&format!("/v1/reports/{campaign}"), Some(API_TOKEN))
            .json()["funnel"]
            .clone()
    };
    let sms = funnel("low-balance");
    assert_eq!(
        (&sms["sent"], &sms["delivered"], &sms["dead_lettered"]),
        (&json!(1), &json!(0), &json!(1)),
        "{sms}"
    );
    assert_eq!(funnel("partner-hook")["delivered"], 1);
    // An operator retry goes through the same check, and fails the same way.
    let r = server.post(
        &format!("/v1/dead-letters/{}/retry", dead["id"].as_str().unwrap()),
        Some(API_TOKEN),
        &[],
        vec![],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(
        Duration::from_secs(20),
        "the retried SMS to be refused again",
        || {
            let m = server.get("/metrics", None).body;
            m.contains("nudge_deliveries_total{channel=\"sms\",result=\"dead\"} 2")
                .then_some(())
        },
    );
    server.stop().unwrap();
}

#[test]
fn bad_requests_get_the_right_status_and_a_named_error() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(config(data.path()));
    let good = |id: &str| {
        json!({"type": "track", "userId": "c-bad", "messageId": id,
            "timestamp": "2026-03-01T08:15:02.123456+02:00", "event": "Page Viewed"})
    };
    let body = |v: &Value| serde_json::to_vec(v).unwrap();
    // Authentication.
    let r = server.post("/v1/track", None, &[], body(&good("a")));
    assert_eq!(r.status, 401);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("Authorization"));
    assert_eq!(
        server
            .post("/v1/track", Some("Bearer nope"), &[], body(&good("a")))
            .status,
        401
    );
    // Basic auth with the key as user name, as Segment's SDKs send it.
    let basic = "Basic d2tfdGVzdDo="; // "wk_test:"
    assert_eq!(
        server
            .post("/v1/track", Some(basic), &[], body(&good("a")))
            .status,
        200
    );
    // Malformed.
    let r = server.post("/v1/track", Some(AUTH), &[], b"{not json".to_vec());
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let mut no_user = good("b");
    no_user.as_object_mut().unwrap().remove("userId");
    let r = server.post("/v1/batch", Some(AUTH), &[], batch(&[good("c"), no_user]));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "batch[1]: field `userId`: missing");
    let mut bad_ts = good("d");
    bad_ts["timestamp"] = json!("yesterday");
    let r = server.post("/v1/track", Some(AUTH), &[], body(&bad_ts));
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("timestamp"),
        "{}",
        r.body
    );
    let r = server.post("/v1/track", Some(AUTH), &[], body(&good(&"x".repeat(101))));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("messageId"));
    // Too large: one event over 32 KB, a batch over 500 KB.
    let mut big = good("e");
    big["properties"] = json!({"blob": "y".repeat(33 << 10)});
    let r = server.post("/v1/batch", Some(AUTH), &[], batch(&[big]));
    assert_eq!(r.status, 413, "{}", r.body);
    let many: Vec<Value> = (0..40)
        .map(|i| {
            let mut e = good(&format!("f{i}"));
            e["properties"] = json!({"blob": "z".repeat(15 << 10)});
            e
        })
        .collect();
    let r = server.post("/v1/batch", Some(AUTH), &[], batch(&many));
    assert_eq!(r.status, 413, "{}", r.body);
    // Unknown encoding; gzip accepted.
    let r = server.post(
        "/v1/track",
        Some(AUTH),
        &[("Content-Encoding", "br")],
        body(&good("g")),
    );
    assert_eq!(r.status, 415);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&batch(&[good("h"), good("i")])).unwrap();
    let r = server.post(
        "/v1/batch",
        Some(AUTH),
        &[("Content-Encoding", "gzip")],
        gz.finish().unwrap(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["accepted"], 2);
    // Nothing refused was stored: three events accepted in all.
    wait_processed(&server, 3.0);
    assert_eq!(server.metric("nudge_events_accepted_total"), 3.0);
    let m = server.get("/metrics", None).body;
    assert!(
        m.contains("nudge_ingest_rejected_requests_total{status=\"413\"} 2"),
        "{m}"
    );
    // Every error is JSON, the router's own too.
    let r = server.get("/v1/nowhere", None);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["status"], 404);
    let r = server.get("/v1/track", None);
    assert_eq!(r.status, 405);
    assert!(r.json()["error"].is_string(), "{}", r.body);
    let r = server.get("/v1/customers/c-1/actions?all=maybe", Some(API_TOKEN));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("all"),
        "{}",
        r.body
    );
    // A future timestamp: refused, naming the field.
    let mut future = good("j");
    future["timestamp"] = json!("9999-01-01T00:00:00Z");
    let r = server.post("/v1/track", Some(AUTH), &[], body(&future));
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("event.timestamp: 9999-01-01"),
        "{}",
        r.body
    );
    // Segment's other calls, acknowledged and not decided.
    for call in ["page", "screen", "group", "alias"] {
        let r = server.post(
            &format!("/v1/{call}"),
            Some(AUTH),
            &[],
            body(&json!({"userId": "c-bad", "messageId": format!("p-{call}")})),
        );
        assert_eq!(r.status, 200, "/v1/{call}: {}", r.body);
        assert_eq!(r.json()["ignored"], 1);
    }
    assert_eq!(server.metric("nudge_events_accepted_total"), 3.0);
    server.stop().unwrap();
}

#[test]
fn a_timer_due_while_the_server_was_down_fires_at_start_up_marked_late() {
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path());
    let server = Server::start(cfg.clone());
    // cart-timer sets its timer 30 minutes after the product: due in 1 s.
    let added = now_ms() - 30 * 60_000 + 1000;
    let events = [
        json!({"type": "identify", "userId": "c-cart-1", "messageId": "m-cart-0",
            "timestamp": ts(added - 1000), "traits": {"email": "cart@example.com"}}),
        json!({"type": "track", "userId": "c-cart-1", "messageId": "m-cart-1",
            "timestamp": ts(added), "event": "Product Added"}),
    ];
    let r = server.post("/v1/batch", Some(AUTH), &[], batch(&events));
    assert_eq!(r.status, 200);
    wait_processed(&server, 2.0);
    server.stop().unwrap();
    let before = decisions(data.path());
    assert!(
        before.iter().all(|d| d["campaign"] != "cart-abandon"),
        "decided before the timer fell due: {before:?}"
    );
    std::thread::sleep(Duration::from_millis(2500));
    let server = Server::start(cfg);
    eventually(Duration::from_secs(10), "the late timer", || {
        (server.metric("nudge_timers_late_total") >= 1.0).then_some(())
    });
    assert_eq!(server.metric("nudge_timers_fired_total"), 1.0);
    server.stop().unwrap();
    let d: Vec<Value> = decisions(data.path())
        .into_iter()
        .filter(|d| d["campaign"] == "cart-abandon")
        .collect();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0]["trigger"], "m-cart-1");
    assert_eq!(d[0]["ts"], ts(added + 30 * 60_000));
}
