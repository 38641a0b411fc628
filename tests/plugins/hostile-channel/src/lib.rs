//! Test plugin: channel `hostile-channel`, posting to `url` from its
//! config, and misbehaving as its `mode` says:
//!
//! | mode | on every delivery |
//! |---|---|
//! | `nap` | sleeps 1 ms first, as a plugin "rate-limiting" itself would |
//! | `headers` | sets `Host`, `Idempotency-Key`, `Content-Length`, `Connection` and `Transfer-Encoding` itself, besides an ordinary `X-Team` |

use std::time::Duration;

use nudge_sdk::prelude::*;

pub struct HostileChannel;

impl Channel for HostileChannel {
    fn info() -> (String, String) {
        ("hostile-channel".into(), "0.1.0".into())
    }

    fn deliver(
        _ctx: &mut Ctx,
        treatment: &Treatment,
        recipient: &Recipient,
    ) -> Result<Vec<Outbound>, String> {
        let url = config("url").ok_or("no `url` in the plugin's config")?;
        let mut headers = vec![("X-Team".to_string(), "growth".to_string())];
        match config("mode").as_deref() {
            Some("nap") => std::thread::sleep(Duration::from_millis(1)),
            Some("headers") => {
                for (k, v) in [
                    ("Host", "169.254.169.254"),
                    ("Idempotency-Key", "forged-key"),
                    ("content-length", "1"),
                    ("Connection", "close"),
                    ("Transfer-Encoding", "chunked"),
                ] {
                    headers.push((k.into(), v.into()));
                }
            }
            _ => {}
        }
        Ok(vec![Outbound::Http {
            method: "POST".into(),
            url,
            headers,
            body: format!("{}:{}", recipient.customer_id, treatment.subject).into_bytes(),
        }])
    }
}

export_channel!(HostileChannel);
