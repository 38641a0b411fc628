//! Operator commands against a running server's API: `nudge status`,
//! `nudge rollback`, `nudge campaign pause|resume|list`, `nudge reload`.

use anyhow::{bail, Context};
use serde_json::Value;

/// Where the server is and how to authenticate.
#[derive(clap::Args, Clone, Debug)]
pub struct Remote {
    /// The server's base URL.
    #[arg(long, env = "NUDGE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An API token of the server (`[api] tokens`).
    #[arg(long, env = "NUDGE_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the server's JSON answer instead of a summary.
    #[arg(long)]
    pub json: bool,
}

impl Remote {
    /// Sends one request; an error status becomes an error naming the
    /// server's message.
    pub async fn call(&self, method: reqwest::Method, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let user = std::env::var("USER").unwrap_or_else(|_| "cli".into());
        let mut req = reqwest::Client::new()
            .request(method, &url)
            .header("x-nudge-user", user);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("reaching {url}"))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("reading the answer of {url}"))?;
        let body: Value =
            serde_json::from_slice(&bytes).with_context(|| format!("{url}: {status}: not JSON"))?;
        if !status.is_success() && status != reqwest::StatusCode::UNPROCESSABLE_ENTITY {
            let msg = body["error"].as_str().unwrap_or("no message");
            bail!("{url}: {status}: {msg}");
        }
        Ok(body)
    }

    fn print(&self, v: &Value, summary: impl FnOnce(&Value) -> String) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            print!("{}", summary(v));
        }
    }
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

/// One generation as a line, its errors below it.
fn generation_line(g: &Value) -> String {
    let plugins: Vec<String> = g["plugins"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| format!("{}@{}", s(p, "name"), s(p, "version")))
                .collect()
        })
        .unwrap_or_default();
    let campaigns = g["campaigns"].as_array().map_or(0, Vec::len);
    let mut line = format!(
        "{:>5}  {:<8}  {}  {:>5.0}ms  {}\n",
        g["number"],
        s(g, "status"),
        s(g, "created_at"),
        g["build_ms"].as_f64().unwrap_or(0.0),
        s(g, "cause"),
    );
    if s(g, "status") != "rejected" {
        line.push_str(&format!(
            "       {campaigns} campaigns; plugins {}\n",
            plugins.join(" ")
        ));
    }
    if let Some(a) = g["activated_at"].as_str() {
        line.push_str(&format!(
            "       last activated {a} ({})\n",
            s(g, "activated_by")
        ));
    }
    for e in g["errors"].as_array().into_iter().flatten() {
        line.push_str(&format!("       error: {}\n", e.as_str().unwrap_or("")));
    }
    line
}

pub fn status_text(v: &Value) -> String {
    let mut out = format!("active generation: {}\n", v["active"]);
    let gens = v["generations"].as_array().cloned().unwrap_or_default();
    out.push_str("    #  status    created                   build  cause\n");
    for g in &gens {
        out.push_str(&generation_line(g));
    }
    let total = v["total"].as_u64().unwrap_or(0) as usize;
    if total > gens.len() {
        out.push_str(&format!(
            "  … {} older (--all lists them)\n",
            total - gens.len()
        ));
    }
    match v["paused"].as_object() {
        Some(p) if !p.is_empty() => {
            for (id, r) in p {
                out.push_str(&format!(
                    "paused: {id} since {} by {}\n",
                    s(r, "since"),
                    s(r, "by")
                ));
            }
        }
        _ => out.push_str("paused: none\n"),
    }
    match v["quarantined"].as_object() {
        Some(q) if !q.is_empty() => {
            for (name, r) in q {
                out.push_str(&format!(
                    "quarantined: {name}@{} since {} after {} faults; last: {}\n",
                    s(r, "version"),
                    s(r, "since"),
                    r["faults"],
                    s(r, "last_fault")
                ));
            }
        }
        _ => out.push_str("quarantined: none\n"),
    }
    out
}

pub async fn status(remote: &Remote, all: bool) -> anyhow::Result<()> {
    let path = if all {
        "/v1/generations?limit=1000000"
    } else {
        "/v1/generations?limit=10"
    };
    let v = remote.call(reqwest::Method::GET, path).await?;
    remote.print(&v, status_text);
    // A cluster node also shows the cluster; a lone server answers 404.
    if let Ok(c) = remote.call(reqwest::Method::GET, "/v1/cluster").await {
        remote.print(&c, cluster_text);
    }
    Ok(())
}

/// The cluster as `GET /v1/cluster` describes it, for people.
pub fn cluster_text(v: &Value) -> String {
    let st = &v["status"];
    let mut out = format!(
        "\ncluster (asked {}): assigner {}\n",
        s(v, "node"),
        st["assigner"].as_str().unwrap_or("none")
    );
    let members = st["members"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!("members ({}):\n", members.len()));
    let slots = st["slots"].as_array().cloned().unwrap_or_default();
    for m in &members {
        let name = m[0].as_str().unwrap_or("");
        let held = slots
            .iter()
            .filter(|x| x["owner"].as_str() == Some(name))
            .count();
        out.push_str(&format!(
            "  {name:<20} {:<28} {held} slots\n",
            m[1].as_str().unwrap_or("")
        ));
    }
    for st in st["streams"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "stream {}: {} messages, {} bytes, leader {}\n",
            s(st, "name"),
            st["messages"],
            st["bytes"],
            st["leader"].as_str().unwrap_or("none")
        ));
    }
    out.push_str("slot  owner                 epoch       lag  snapshot (log position, taken)  (assigned to)\n");
    for x in &slots {
        let owner = x["owner"].as_str().unwrap_or("-");
        let assigned = x["assigned"].as_str().unwrap_or("-");
        let moving = if owner != assigned {
            format!("  (moving to {assigned})")
        } else {
            String::new()
        };
        let lag = x["lag"].as_u64().map_or("?".to_string(), |l| l.to_string());
        let snap = &x["snapshot"];
        let snapshot = match snap["position"].as_u64() {
            Some(p) => format!("{p} at {}", s(snap, "at")),
            None => "none".into(),
        };
        out.push_str(&format!(
            "{:>4}  {owner:<20} {:>6} {lag:>9}  {snapshot:<30}{moving}\n",
            x["slot"].as_u64().unwrap_or(0),
            x["epoch"].as_u64().map_or("-".into(), |e| e.to_string()),
        ));
    }
    out
}

pub async fn rollback(remote: &Remote, to: Option<u64>) -> anyhow::Result<()> {
    let path = match to {
        Some(n) => format!("/v1/generations/{n}/activate"),
        None => "/v1/generations/rollback".into(),
    };
    let v = remote.call(reqwest::Method::POST, &path).await?;
    remote.print(&v, |g| format!("active now:\n{}", generation_line(g)));
    Ok(())
}

pub async fn reload(remote: &Remote, force: bool) -> anyhow::Result<()> {
    let path = if force {
        "/v1/generations/reload?force=true"
    } else {
        "/v1/generations/reload"
    };
    let v = remote.call(reqwest::Method::POST, path).await?;
    remote.print(&v, |v| {
        let mut out = format!("{} (active: {})\n", s(v, "result"), v["active"]);
        if v["generation"].is_object() {
            out.push_str(&generation_line(&v["generation"]));
        }
        out
    });
    if s(&v, "result") == "rejected" {
        bail!("the new files were rejected; the active generation keeps running");
    }
    Ok(())
}

pub async fn campaign(remote: &Remote, action: &str, id: Option<&str>) -> anyhow::Result<()> {
    match (action, id) {
        ("list", _) => {
            let v = remote.call(reqwest::Method::GET, "/v1/campaigns").await?;
            remote.print(&v, |v| {
                let mut out = format!("generation {}\n", v["generation"]);
                for c in v["campaigns"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "  {:<28} {:<8} {:<30} {}\n",
                        s(c, "id"),
                        s(c, "channel"),
                        s(c, "trigger"),
                        c["blocked"].as_str().unwrap_or("active")
                    ));
                }
                out
            });
        }
        (action, Some(id)) => {
            let v = remote
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/campaigns/{id}/{action}"),
                )
                .await?;
            remote.print(&v, |_| format!("campaign {id}: {action}d\n"));
        }
        (_, None) => bail!("which campaign?"),
    }
    Ok(())
}

pub async fn release(remote: &Remote, plugin: &str) -> anyhow::Result<()> {
    let v = remote
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/plugins/{plugin}/quarantine"),
        )
        .await?;
    remote.print(&v, |_| {
        format!("plugin {plugin}: released from quarantine\n")
    });
    Ok(())
}
