//! Campaigns and contact policies, loaded from TOML files with Rhai
//! expressions where a value must be computed.
//!
//! A rules folder holds one campaign per `*.toml` file and the channel and
//! contact policies in `policies.toml`. Expressions are compiled once, at
//! load, and run sandboxed: expressions only (no statements or loops), an
//! operation budget, size limits, no `eval`, no modules.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{Dynamic, Scope, AST};
use serde::Deserialize;
use serde_json::{Map, Value};
use toml::Spanned;

use crate::event::Event;

/// The name of the policies file in a rules folder.
pub const POLICIES_FILE: &str = "policies.toml";

/// One problem in one rule file: where, which field, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a rules folder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RulesError(pub Vec<RuleError>);

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// What makes a campaign fire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerRef {
    /// A firing of a trigger plugin.
    Plugin { plugin: String, firing: String },
    /// A `track` event by name (`identify` for identifies), no plugin needed.
    Event { name: String },
}

/// A compiled expression and where it came from.
#[derive(Debug, Clone)]
pub struct Expr {
    pub source: String,
    pub line: usize,
    ast: AST,
}

#[derive(Debug, Clone)]
pub enum Priority {
    Fixed(i64),
    Expr(Expr),
}

#[derive(Debug, Clone)]
pub struct Goal {
    pub event: String,
    pub window_ms: i64,
    /// What a conversion is worth: an expression over the goal event
    /// (`event.properties.total`) or a constant (`"250.0"`); none: 0.
    pub value: Option<Expr>,
}

/// One campaign, validated and compiled.
#[derive(Debug, Clone)]
pub struct Campaign {
    pub id: String,
    pub owner: String,
    pub description: String,
    pub file: PathBuf,
    /// Content hash of the file (hex SHA-256), for generation listings.
    pub hash: String,
    pub trigger: TriggerRef,
    /// Line of `trigger` and of `response`, for errors found when the rules
    /// are checked against the plugins.
    pub trigger_line: usize,
    pub response_line: Option<usize>,
    pub when: Option<Expr>,
    pub response: Option<String>,
    pub channel: String,
    pub priority: Priority,
    pub frequency_ms: i64,
    pub holdout_pct: u32,
    pub goal: Option<Goal>,
    /// How long a pre-thought action stays valid (agent queue).
    pub expires_ms: Option<i64>,
}

/// What a channel needs before anyone is contacted on it, and what a
/// contact costs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChannelPolicy {
    /// The trait that must be the JSON value `true`; none means no consent
    /// is needed (e.g. an agent's call list).
    pub consent_trait: Option<String>,
    /// The channel plugin that delivers on this channel (live server); none:
    /// decisions are made and recorded, nothing is sent.
    pub plugin: Option<String>,
    /// What one `sent` contact costs (in the unit of the goals' values),
    /// for net value; 0 when unset.
    pub cost: f64,
}

/// At most `limit` `sent` decisions on `channels` together within `window`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactPolicy {
    pub name: String,
    pub channels: Vec<String>,
    pub limit: usize,
    pub window_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policies {
    pub channels: BTreeMap<String, ChannelPolicy>,
    pub contact: Vec<ContactPolicy>,
}

impl Policies {
    /// The longest contact-policy window: history older than this is never
    /// read again.
    pub fn max_window_ms(&self) -> i64 {
        self.contact.iter().map(|p| p.window_ms).max().unwrap_or(0)
    }

    /// The most `sent` times any policy needs to look at per channel.
    pub fn max_limit(&self) -> usize {
        self.contact.iter().map(|p| p.limit).max().unwrap_or(0)
    }
}

/// The loaded rules folder.
#[derive(Clone)]
pub struct RuleSet {
    pub dir: PathBuf,
    pub campaigns: Vec<Campaign>,
    pub policies: Policies,
    engine: Arc<rhai::Engine>,
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleSet")
            .field("dir", &self.dir)
            .field("campaigns", &self.campaigns.len())
            .finish()
    }
}

/// Parses `30d`, `24h`, `30m`, `45s`, `500ms` into milliseconds.
/// A window must be longer than nothing: a contact policy over `0s` would
/// never count a message, a goal window of `0s` never see a conversion.
fn positive(ms: i64) -> Result<i64, String> {
    if ms > 0 {
        Ok(ms)
    } else {
        Err("a window must be longer than 0s".into())
    }
}

pub fn parse_duration(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit (ms, s, m, h, d)"))?;
    let (num, unit) = s.split_at(split);
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?} does not start with a whole number"))?;
    let mult = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h, d)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CampaignFile {
    id: Spanned<String>,
    #[serde(default)]
    owner: String,
    #[serde(default)]
    description: String,
    trigger: Spanned<TriggerFile>,
    when: Option<Spanned<String>>,
    response: Option<Spanned<String>>,
    channel: Spanned<String>,
    priority: Spanned<PriorityFile>,
    frequency: Spanned<String>,
    holdout: Option<Spanned<u32>>,
    goal: Option<GoalFile>,
    expires: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerFile {
    plugin: Option<String>,
    firing: Option<String>,
    event: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PriorityFile {
    Fixed(i64),
    Expr(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GoalFile {
    event: String,
    window: Spanned<String>,
    value: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoliciesFile {
    #[serde(default)]
    channels: BTreeMap<String, ChannelFile>,
    #[serde(default)]
    contact: Vec<ContactFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelFile {
    consent_trait: Option<String>,
    plugin: Option<String>,
    cost: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContactFile {
    name: String,
    channels: Vec<String>,
    limit: usize,
    window: Spanned<String>,
}

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The sandboxed expression engine shared by every campaign.
pub fn new_engine() -> rhai::Engine {
    let mut e = rhai::Engine::new();
    e.set_max_operations(100_000);
    e.set_max_expr_depths(64, 32);
    e.set_max_call_levels(16);
    e.set_max_string_size(64 * 1024);
    e.set_max_array_size(10_000);
    e.set_max_map_size(10_000);
    e.set_strict_variables(true);
    e.disable_symbol("eval");
    e.on_print(|s| tracing::info!(target: "nudge::rules", "{s}"));
    e.on_debug(|s, _, pos| tracing::debug!(target: "nudge::rules", "{pos:?}: {s}"));
    // Helpers that make the usual conditions one call and never fail on a
    // missing or mistyped value.
    e.register_fn("nonempty", |v: Dynamic| {
        v.clone()
            .into_immutable_string()
            .map(|s| !s.is_empty())
            .unwrap_or(false)
    });
    e.register_fn("has", |list: Dynamic, item: Dynamic| -> bool {
        match list.try_cast::<rhai::Array>() {
            Some(a) => {
                let s = item.to_string();
                a.iter()
                    .any(|x| x.type_id() == item.type_id() && x.to_string() == s)
            }
            None => false,
        }
    });
    e.register_fn("is_true", |v: Dynamic| v.as_bool().unwrap_or(false));
    e.register_fn("starts", |v: Dynamic, prefix: &str| {
        v.into_immutable_string()
            .map(|s| s.starts_with(prefix))
            .unwrap_or(false)
    });
    e
}

/// The variables every expression sees, so they can be checked at compile.
/// Pushed as variables, not constants: Rhai would fold constants into the
/// compiled expression.
fn template_scope() -> Scope<'static> {
    let mut s = Scope::new();
    s.push("event", rhai::Map::new());
    s.push("properties", rhai::Map::new());
    s.push("traits", rhai::Map::new());
    s.push("firing", rhai::Map::new());
    s.push("customer_id", String::new());
    s.push("now", 0_i64);
    s
}

/// Converts JSON to a Rhai value: integers stay integers, other numbers are
/// doubles, objects are maps.
pub fn to_dynamic(v: &Value) -> Dynamic {
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Array(a) => Dynamic::from_array(a.iter().map(to_dynamic).collect()),
        Value::Object(m) => Dynamic::from_map(map_to_rhai(m)),
    }
}

fn map_to_rhai(m: &Map<String, Value>) -> rhai::Map {
    m.iter()
        .map(|(k, v)| (k.as_str().into(), to_dynamic(v)))
        .collect()
}

/// What an expression can see for one firing.
pub struct Facts<'a> {
    pub customer: &'a str,
    pub now: i64,
    /// The event being handled; `None` for a timer.
    pub event: Option<&'a Event>,
    pub traits: &'a Map<String, Value>,
    pub firing: &'a Map<String, Value>,
}

/// A scope built once per firing and shared by the campaigns it reaches.
pub struct EvalScope {
    scope: Scope<'static>,
}

impl EvalScope {
    pub fn new(f: &Facts<'_>) -> EvalScope {
        let mut s = Scope::new();
        let (event, props) = match f.event {
            Some(e) => {
                let props = map_to_rhai(&e.properties);
                let mut m = rhai::Map::new();
                m.insert("name".into(), e.name.clone().into());
                m.insert("message_id".into(), e.message_id.clone().into());
                m.insert("ts".into(), Dynamic::from_int(e.ts));
                m.insert(
                    "kind".into(),
                    match e.kind {
                        crate::event::Kind::Identify => "identify",
                        crate::event::Kind::Track => "track",
                    }
                    .into(),
                );
                m.insert("properties".into(), Dynamic::from_map(props.clone()));
                (m, props)
            }
            None => (rhai::Map::new(), rhai::Map::new()),
        };
        s.push_constant("event", event);
        s.push_constant("properties", props);
        s.push_constant("traits", map_to_rhai(f.traits));
        s.push_constant("firing", map_to_rhai(f.firing));
        s.push_constant("customer_id", f.customer.to_owned());
        s.push_constant("now", f.now);
        EvalScope { scope: s }
    }
}

impl RuleSet {
    /// Loads and validates every campaign and the policies in `dir`.
    pub fn load(dir: &Path) -> Result<RuleSet, RulesError> {
        let files = rule_files(dir)?
            .into_iter()
            .map(|f| {
                let text = std::fs::read(&f).map_err(|e| format!("cannot read: {e}"));
                (f, text)
            })
            .collect();
        RuleSet::from_files(dir, files)
    }

    /// Validates campaigns and policies already read: `files` are the
    /// `*.toml` of `dir` with their contents (or why they could not be
    /// read). The hot reloader reads each file once, hashes those bytes and
    /// parses the same bytes, so a generation's hashes are what it runs.
    pub fn from_files(
        dir: &Path,
        files: Vec<(PathBuf, Result<Vec<u8>, String>)>,
    ) -> Result<RuleSet, RulesError> {
        let engine = new_engine();
        let mut errors = Vec::new();
        let mut campaigns = Vec::new();
        let policies_path = dir.join(POLICIES_FILE);
        let mut policies = Policies::default();
        if let Some((_, bytes)) = files.iter().find(|(f, _)| *f == policies_path) {
            match text(&policies_path, bytes).and_then(|t| parse_policies(&policies_path, t)) {
                Ok(p) => policies = p,
                Err(e) => errors.extend(e),
            }
        }
        for (file, bytes) in files.iter().filter(|(f, _)| *f != policies_path) {
            match text(file, bytes).and_then(|t| parse_campaign(&engine, file, t, &policies)) {
                Ok(c) => campaigns.push(c),
                Err(e) => errors.extend(e),
            }
        }
        let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
        for c in &campaigns {
            if let Some(other) = seen.insert(&c.id, &c.file) {
                errors.push(RuleError {
                    file: c.file.clone(),
                    line: None,
                    field: Some("id".into()),
                    message: format!("campaign {:?} is also defined in {}", c.id, other.display()),
                });
            }
        }
        if !errors.is_empty() {
            return Err(RulesError(errors));
        }
        campaigns.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(RuleSet {
            dir: dir.to_owned(),
            campaigns,
            policies,
            engine: Arc::new(engine),
        })
    }

    /// Evaluates a campaign's `when` (true when absent). An error (a wrong
    /// type, the operation budget) is returned so the caller can report it.
    pub fn qualifies(&self, c: &Campaign, scope: &mut EvalScope) -> Result<bool, String> {
        match &c.when {
            None => Ok(true),
            Some(e) => self
                .engine
                .eval_ast_with_scope::<bool>(&mut scope.scope, &e.ast)
                .map_err(|err| format!("{}:{}: `when`: {err}", c.file.display(), e.line)),
        }
    }

    pub fn priority(&self, c: &Campaign, scope: &mut EvalScope) -> Result<i64, String> {
        match &c.priority {
            Priority::Fixed(p) => Ok(*p),
            Priority::Expr(e) => self
                .engine
                .eval_ast_with_scope::<i64>(&mut scope.scope, &e.ast)
                .map_err(|err| format!("{}:{}: `priority`: {err}", c.file.display(), e.line)),
        }
    }

    /// The campaign `id` (campaigns are kept sorted by id).
    pub fn campaign(&self, id: &str) -> Option<&Campaign> {
        self.campaigns
            .binary_search_by(|c| c.id.as_str().cmp(id))
            .ok()
            .map(|i| &self.campaigns[i])
    }

    /// What the goal event in `scope` is worth to campaign `c` (0 without
    /// a `goal.value`). An error (a wrong type at run time, the operation
    /// budget) is returned so the caller can report it.
    pub fn goal_value(&self, c: &Campaign, scope: &mut EvalScope) -> Result<f64, String> {
        let Some(e) = c.goal.as_ref().and_then(|g| g.value.as_ref()) else {
            return Ok(0.0);
        };
        let v = self
            .engine
            .eval_ast_with_scope::<Dynamic>(&mut scope.scope, &e.ast)
            .map_err(|err| format!("{}:{}: `goal.value`: {err}", c.file.display(), e.line))?;
        match (v.as_float(), v.as_int()) {
            (Ok(f), _) => Ok(f),
            (_, Ok(i)) => Ok(i as f64),
            _ if v.is_unit() => Ok(0.0),
            _ => Err(format!(
                "{}:{}: `goal.value` must give a number, but gave {}",
                c.file.display(),
                e.line,
                v.type_name()
            )),
        }
    }

    /// Goal event names of all campaigns.
    pub fn goal_events(&self) -> BTreeSet<String> {
        self.campaigns
            .iter()
            .filter_map(|c| c.goal.as_ref().map(|g| g.event.clone()))
            .collect()
    }
}

/// A rule file's text, read in place (or why it could not be read).
fn text<'a>(file: &Path, bytes: &'a Result<Vec<u8>, String>) -> Result<&'a str, Vec<RuleError>> {
    let error = |message: String| {
        vec![RuleError {
            file: file.to_owned(),
            line: None,
            field: None,
            message,
        }]
    };
    match bytes {
        Ok(b) => std::str::from_utf8(b).map_err(|e| error(format!("not UTF-8: {e}"))),
        Err(message) => Err(error(message.clone())),
    }
}

/// The `*.toml` files of a rules folder, sorted.
pub fn rule_files(dir: &Path) -> Result<Vec<PathBuf>, RulesError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        RulesError(vec![RuleError {
            file: dir.to_owned(),
            line: None,
            field: None,
            message: format!("cannot read the rules folder: {e}"),
        }])
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn toml_error(file: &Path, text: &str, e: toml::de::Error) -> Vec<RuleError> {
    let line = e.span().map(|s| line_of(text, s.start));
    vec![RuleError {
        file: file.to_owned(),
        line,
        field: None,
        message: e.message().trim().to_string(),
    }]
}

fn parse_policies(file: &Path, text: &str) -> Result<Policies, Vec<RuleError>> {
    let p: PoliciesFile = toml::from_str(text).map_err(|e| toml_error(file, text, e))?;
    let mut errors = Vec::new();
    let mut channels = BTreeMap::new();
    for (name, ch) in p.channels {
        let cost = match ch.cost {
            Some(c) if !(c.get_ref().is_finite() && *c.get_ref() >= 0.0) => {
                errors.push(RuleError {
                    file: file.to_owned(),
                    line: Some(line_of(text, c.span().start)),
                    field: Some(format!("channels.{name}.cost")),
                    message: "a cost per contact: a number, 0 or more".into(),
                });
                0.0
            }
            Some(c) => c.into_inner(),
            None => 0.0,
        };
        channels.insert(
            name,
            ChannelPolicy {
                consent_trait: ch.consent_trait,
                plugin: ch.plugin,
                cost,
            },
        );
    }
    let mut contact = Vec::new();
    for c in p.contact {
        for ch in &c.channels {
            if !channels.contains_key(ch) {
                errors.push(RuleError {
                    file: file.to_owned(),
                    line: Some(line_of(text, c.window.span().start)),
                    field: Some(format!("contact.{}.channels", c.name)),
                    message: format!("channel {ch:?} is not defined under [channels]"),
                });
            }
        }
        match parse_duration(c.window.get_ref()).and_then(positive) {
            Ok(w) => contact.push(ContactPolicy {
                name: c.name,
                channels: c.channels,
                limit: c.limit,
                window_ms: w,
            }),
            Err(m) => errors.push(RuleError {
                file: file.to_owned(),
                line: Some(line_of(text, c.window.span().start)),
                field: Some(format!("contact.{}.window", c.name)),
                message: m,
            }),
        }
    }
    if errors.is_empty() {
        Ok(Policies { channels, contact })
    } else {
        Err(errors)
    }
}

fn parse_campaign(
    engine: &rhai::Engine,
    file: &Path,
    text: &str,
    policies: &Policies,
) -> Result<Campaign, Vec<RuleError>> {
    use sha2::Digest;
    let f: CampaignFile = toml::from_str(text).map_err(|e| toml_error(file, text, e))?;
    let mut errors = Vec::new();
    let err = |span: std::ops::Range<usize>, field: &str, message: String| RuleError {
        file: file.to_owned(),
        line: Some(line_of(text, span.start)),
        field: Some(field.to_owned()),
        message,
    };
    let id = f.id.get_ref().clone();
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        errors.push(err(
            f.id.span(),
            "id",
            format!("{id:?}: use letters, digits, '-' and '_'"),
        ));
    }
    let t = f.trigger.get_ref();
    let trigger = match (&t.plugin, &t.firing, &t.event) {
        (Some(p), Some(fi), None) => Some(TriggerRef::Plugin {
            plugin: p.clone(),
            firing: fi.clone(),
        }),
        (None, None, Some(e)) => Some(TriggerRef::Event { name: e.clone() }),
        _ => {
            errors.push(err(
                f.trigger.span(),
                "trigger",
                "give either `plugin` and `firing`, or `event`".into(),
            ));
            None
        }
    };
    let scope = template_scope();
    let compile = |s: &Spanned<String>, field: &str| -> Result<Expr, RuleError> {
        // The expression's own line inside the file; Rhai's position is
        // relative to the expression.
        let line = line_of(text, s.span().start);
        engine
            .compile_expression_with_scope(&scope, s.get_ref())
            .map(|ast| Expr {
                source: s.get_ref().clone(),
                line,
                ast,
            })
            .map_err(|e| RuleError {
                file: file.to_owned(),
                line: Some(line + e.1.line().unwrap_or(1) - 1),
                field: Some(field.to_owned()),
                message: format!("{} (in {:?})", e.0, s.get_ref()),
            })
    };
    // Rhai is typed at run time: each expression is evaluated once on
    // empty data, and a result of the wrong type (a quoted `"high"` as a
    // priority, a number as a condition) is an error of the file now, not
    // a warning on every event later. A result that depends on the data
    // (nothing yet, or an evaluation error) is left to run time.
    let typed = |e: Expr, field: &str, want: &str| -> Result<Expr, RuleError> {
        let got = engine.eval_ast_with_scope::<Dynamic>(&mut scope.clone(), &e.ast);
        let wrong = match &got {
            Ok(v) if v.is_unit() => None,
            Ok(v) if want == "bool" && !v.is_bool() => Some(v.type_name()),
            Ok(v) if want == "integer" && !v.is_int() => Some(v.type_name()),
            Ok(v) if want == "number" && !(v.is_int() || v.is_float()) => Some(v.type_name()),
            _ => None,
        };
        match wrong {
            None => Ok(e),
            Some(t) => Err(RuleError {
                file: file.to_owned(),
                line: Some(e.line),
                field: Some(field.to_owned()),
                message: format!(
                    "must give {}, but {:?} gives {}",
                    match want {
                        "bool" => "true or false",
                        "integer" => "an integer",
                        _ => "a number",
                    },
                    e.source,
                    t.rsplit("::").next().unwrap_or(t)
                ),
            }),
        }
    };
    let when = match &f.when {
        Some(w) => match compile(w, "when").and_then(|e| typed(e, "when", "bool")) {
            Ok(e) => Some(e),
            Err(e) => {
                errors.push(e);
                None
            }
        },
        None => None,
    };
    let priority = match f.priority.get_ref() {
        PriorityFile::Fixed(p) => Some(Priority::Fixed(*p)),
        PriorityFile::Expr(s) => {
            let spanned = Spanned::new(f.priority.span(), s.clone());
            match compile(&spanned, "priority").and_then(|e| typed(e, "priority", "integer")) {
                Ok(e) => Some(Priority::Expr(e)),
                Err(e) => {
                    errors.push(e);
                    None
                }
            }
        }
    };
    let channel = f.channel.get_ref().clone();
    if !policies.channels.contains_key(&channel) {
        errors.push(err(
            f.channel.span(),
            "channel",
            format!(
                "channel {channel:?} is not defined in {POLICIES_FILE} (defined: {})",
                policies
                    .channels
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let frequency_ms = parse_duration(f.frequency.get_ref())
        .map_err(|m| errors.push(err(f.frequency.span(), "frequency", m)))
        .ok();
    let holdout_pct = f.holdout.as_ref().map_or(0, |h| *h.get_ref());
    if let Some(h) = f.holdout.as_ref().filter(|h| *h.get_ref() > 100) {
        errors.push(err(h.span(), "holdout", "a percentage: 0 to 100".into()));
    }
    let goal = match f.goal {
        Some(g) => match parse_duration(g.window.get_ref()).and_then(positive) {
            Ok(w) => Some(Goal {
                event: g.event,
                window_ms: w,
                value: match &g.value {
                    Some(v) => match compile(v, "goal.value")
                        .and_then(|e| typed(e, "goal.value", "number"))
                    {
                        Ok(e) => Some(e),
                        Err(e) => {
                            errors.push(e);
                            None
                        }
                    },
                    None => None,
                },
            }),
            Err(m) => {
                errors.push(err(g.window.span(), "goal.window", m));
                None
            }
        },
        None => None,
    };
    let expires_ms = match &f.expires {
        Some(e) => match parse_duration(e.get_ref()) {
            Ok(v) => Some(v),
            Err(m) => {
                errors.push(err(e.span(), "expires", m));
                None
            }
        },
        None => None,
    };
    match (trigger, priority, frequency_ms) {
        (Some(trigger), Some(priority), Some(frequency_ms)) if errors.is_empty() => Ok(Campaign {
            id,
            owner: f.owner,
            description: f.description,
            file: file.to_owned(),
            hash: format!("{:x}", sha2::Sha256::digest(text.as_bytes())),
            trigger,
            trigger_line: line_of(text, f.trigger.span().start),
            response_line: f.response.as_ref().map(|r| line_of(text, r.span().start)),
            when,
            response: f.response.map(|r| r.into_inner()),
            channel,
            priority,
            frequency_ms,
            holdout_pct,
            goal,
            expires_ms,
        }),
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICIES: &str = r#"
[channels.email]
consent_trait = "consent_email"
[channels.agent]
"#;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    const GOOD: &str = r#"
id = "big"
trigger = { event = "Deposit Made" }
when = "properties.amount >= 20000"
channel = "email"
priority = 60
frequency = "30d"
holdout = 10
goal = { event = "Advisor Meeting Booked", window = "14d" }
"#;

    #[test]
    fn loads_a_campaign() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), POLICIES_FILE, POLICIES);
        write(d.path(), "big.toml", GOOD);
        let r = RuleSet::load(d.path()).unwrap();
        assert_eq!(r.campaigns.len(), 1);
        let c = &r.campaigns[0];
        assert_eq!(c.frequency_ms, 30 * 86_400_000);
        let goal = c.goal.as_ref().unwrap();
        assert_eq!(goal.event, "Advisor Meeting Booked");
        assert_eq!(goal.window_ms, 14 * 86_400_000);
        assert!(goal.value.is_none());
        let ev = Event::parse(r#"{"messageId":"m","type":"track","userId":"u","timestamp":"2026-03-01T00:00:00Z","event":"Deposit Made","properties":{"amount":20000.0}}"#).unwrap();
        let traits = Map::new();
        let firing = Map::new();
        let mut s = EvalScope::new(&Facts {
            customer: "u",
            now: 0,
            event: Some(&ev),
            traits: &traits,
            firing: &firing,
        });
        assert_eq!(r.qualifies(c, &mut s), Ok(true));
    }

    #[test]
    fn a_window_of_nothing_is_refused() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), POLICIES_FILE, POLICIES);
        write(
            d.path(),
            "bad.toml",
            &GOOD.replace("window = \"14d\"", "window = \"0s\""),
        );
        let e = RuleSet::load(d.path()).unwrap_err();
        assert_eq!(e.0[0].field.as_deref(), Some("goal.window"), "{e}");
        assert!(e.0[0].message.contains("longer than 0s"), "{e}");
    }

    #[test]
    fn expressions_of_the_wrong_type_are_refused_at_load() {
        for (from, to, field, says) in [
            (
                "priority = 60",
                "priority = '\"high\"'",
                "priority",
                "gives string",
            ),
            (
                "priority = 60",
                "priority = \"1.5 * 2.0\"",
                "priority",
                "gives f64",
            ),
            (
                "when = \"properties.amount >= 20000\"",
                "when = \"42\"",
                "when",
                "gives i64",
            ),
        ] {
            let d = tempfile::tempdir().unwrap();
            write(d.path(), POLICIES_FILE, POLICIES);
            assert!(GOOD.contains(from), "{from}");
            write(d.path(), "bad.toml", &GOOD.replace(from, to));
            let e = RuleSet::load(d.path()).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!(e.0[0].field.as_deref(), Some(field), "{e}");
            assert!(e.0[0].line.is_some(), "{e}");
            assert!(e.0[0].message.contains(says), "{e}");
        }
        // One that depends on the data is left to run time.
        let d = tempfile::tempdir().unwrap();
        write(d.path(), POLICIES_FILE, POLICIES);
        write(
            d.path(),
            "ok.toml",
            &GOOD.replace("priority = 60", "priority = \"firing.rank\""),
        );
        assert!(RuleSet::load(d.path()).is_ok());
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), POLICIES_FILE, POLICIES);
        write(
            d.path(),
            "bad.toml",
            &GOOD.replace("properties.amount >= 20000", "properties.amount >= "),
        );
        let e = RuleSet::load(d.path()).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].line, Some(4), "{e}");
        assert_eq!(e.0[0].field.as_deref(), Some("when"));

        write(
            d.path(),
            "bad.toml",
            &GOOD.replace("\"30d\"", "\"30 days\""),
        );
        let e = RuleSet::load(d.path()).unwrap_err();
        assert_eq!(e.0[0].line, Some(7), "{e}");
        assert_eq!(e.0[0].field.as_deref(), Some("frequency"));

        write(
            d.path(),
            "bad.toml",
            &GOOD.replace("channel = \"email\"", "channel = \"fax\""),
        );
        let e = RuleSet::load(d.path()).unwrap_err();
        assert_eq!(e.0[0].field.as_deref(), Some("channel"), "{e}");
        assert!(e.to_string().contains("bad.toml:5"), "{e}");

        write(
            d.path(),
            "bad.toml",
            &GOOD.replace("holdout = 10", "holdot = 10"),
        );
        let e = RuleSet::load(d.path()).unwrap_err();
        assert!(e.to_string().contains("holdot"), "{e}");
        assert_eq!(e.0[0].line, Some(8), "{e}");

        write(
            d.path(),
            "bad.toml",
            &GOOD.replace("properties.amount", "propertis.amount"),
        );
        let e = RuleSet::load(d.path()).unwrap_err();
        assert!(e.to_string().contains("propertis"), "{e}");
    }

    #[test]
    fn helpers_never_fail_on_missing_values() {
        let e = new_engine();
        let mut s = template_scope();
        for (expr, want) in [
            ("nonempty(traits.email)", false),
            ("has(traits.products, \"x\")", false),
            ("is_true(traits.consent)", false),
            ("starts(properties.path, \"/m\")", false),
        ] {
            let ast = e.compile_expression_with_scope(&s, expr).unwrap();
            assert_eq!(
                e.eval_ast_with_scope::<bool>(&mut s, &ast).unwrap(),
                want,
                "{expr}"
            );
        }
    }

    #[test]
    fn runaway_expressions_hit_the_budget() {
        let e = new_engine();
        let mut s = template_scope();
        let ast = e
            .compile_expression_with_scope(&s, "(0..100000000).map(|x| x * 2).len() > 0")
            .unwrap();
        assert!(e.eval_ast_with_scope::<bool>(&mut s, &ast).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(86_400_000));
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5w").is_err());
    }
}
