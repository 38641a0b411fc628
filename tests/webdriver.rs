//! A small W3C WebDriver client for the browser tests: Debian's Chromium
//! driven by its ChromeDriver over plain HTTP, headless. Only what the
//! tests use: navigate, find, click, type, read, run a script, screenshot.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Where Chromium and its driver are: `NUDGE_CHROMIUM` and
/// `NUDGE_CHROMEDRIVER`, else Debian's paths. When they are missing and
/// this runs as root with apt at hand, Debian's `chromium` and
/// `chromium-driver` are installed first (as `.ci/run` does).
pub fn browser_paths() -> (PathBuf, PathBuf) {
    let chromium = std::env::var_os("NUDGE_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    let driver = std::env::var_os("NUDGE_CHROMEDRIVER")
        .map_or_else(|| PathBuf::from("/usr/bin/chromedriver"), PathBuf::from);
    if !(chromium.exists() && driver.exists())
        && is_root()
        && Path::new("/usr/bin/apt-get").exists()
    {
        let ok = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "chromium",
                "chromium-driver",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("apt-get")
                .arg("update")
                .stdout(Stdio::null())
                .status();
            let _ = Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "--no-install-recommends",
                    "chromium",
                    "chromium-driver",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status();
        }
    }
    assert!(
        chromium.exists() && driver.exists(),
        "the browser tests need Chromium and ChromeDriver: Debian's packages `chromium` and `chromium-driver` (or NUDGE_CHROMIUM and NUDGE_CHROMEDRIVER); not found at {} and {}",
        chromium.display(),
        driver.display()
    );
    (chromium, driver)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A ChromeDriver process and one headless browser session in it.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Browser {
        let (chromium, driver_path) = browser_paths();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new(driver_path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            rt,
            client,
            _profile: profile,
        };
        let started = Instant::now();
        while b.raw("GET", "/status", None).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not answer"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,800",
                    format!("--user-data-dir={}", b._profile.path().display()),
                ],
            },
        }}});
        let v = b
            .raw("POST", "/session", Some(caps))
            .expect("a browser session");
        b.session = v["value"]["sessionId"]
            .as_str()
            .expect("session id")
            .to_owned();
        b
    }

    fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        self.rt.block_on(async {
            let req = match method {
                "GET" => self.client.get(&url),
                "DELETE" => self.client.delete(&url),
                _ => self
                    .client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.unwrap_or(json!({})).to_string()),
            };
            let resp = req
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(v)
            } else {
                Err(format!("{method} {path}: {status}: {v}"))
            }
        })
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let p = format!("/session/{}{path}", self.session);
        self.raw(method, &p, body).unwrap_or_else(|e| panic!("{e}"))["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn url(&self) -> String {
        self.cmd("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The first element matching `css`, if any.
    pub fn find(&self, css: &str) -> Option<String> {
        let p = format!("/session/{}/element", self.session);
        let v = self
            .raw(
                "POST",
                &p,
                Some(json!({"using": "css selector", "value": css})),
            )
            .ok()?;
        v["value"]
            .as_object()?
            .values()
            .next()?
            .as_str()
            .map(str::to_owned)
    }

    /// The first element matching `css`, waiting up to 10 s for it (a
    /// form's submission navigates after the click returns).
    pub fn element(&self, css: &str) -> String {
        let started = Instant::now();
        loop {
            if let Some(e) = self.find(css) {
                return e;
            }
            if started.elapsed() > Duration::from_secs(10) {
                panic!("no element {css:?} on {}:\n{}", self.url(), self.source());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to 10 s for the address to contain `part`.
    pub fn wait_url(&self, part: &str) -> String {
        let started = Instant::now();
        loop {
            let u = self.url();
            if u.contains(part) {
                return u;
            }
            if started.elapsed() > Duration::from_secs(10) {
                panic!("still at {u}, not {part}:\n{}", self.source());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn source(&self) -> String {
        self.cmd("GET", "/source", None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn click(&self, css: &str) {
        self.on_element(css, "POST", "/click", Some(json!({})));
    }

    pub fn type_into(&self, css: &str, text: &str) {
        self.on_element(css, "POST", "/value", Some(json!({ "text": text })));
    }

    /// `op` on the first element matching `css` (a WebDriver call under
    /// `/element/{id}`). An element found on a page that a navigation then
    /// replaced is looked up again.
    fn on_element(&self, css: &str, method: &str, op: &str, body: Option<Value>) -> Value {
        let started = Instant::now();
        loop {
            let e = self.element(css);
            let p = format!("/session/{}/element/{e}{op}", self.session);
            match self.raw(method, &p, body.clone()) {
                Ok(v) => return v["value"].clone(),
                Err(err)
                    if err.contains("stale element")
                        && started.elapsed() < Duration::from_secs(10) =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(err) => panic!("{err}"),
            }
        }
    }

    /// The text of the first element matching `css`.
    pub fn text(&self, css: &str) -> String {
        self.on_element(css, "GET", "/text", None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub fn run(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Runs `script`, which calls `arguments[arguments.length - 1]` with
    /// its result, and waits for it.
    pub fn run_async(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/async",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Saves a PNG of the page.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("base64 screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("screenshot written");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let p = format!("/session/{}", self.session);
            let _ = self.raw("DELETE", &p, None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
