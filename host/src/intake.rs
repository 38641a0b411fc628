//! What a replay admits from its file, line by line, before any worker
//! sees an event: text decoding, the clock, and duplicates.
//!
//! - A line is text: a UTF-8 byte-order mark at the start of the file is
//!   dropped, and a line that is not UTF-8 is an error of that line (so
//!   `--skip-invalid` skips it) rather than the end of the replay.
//! - The clock only moves forward, and one wild timestamp cannot move it:
//!   each event is held until the next one confirms it. An event that is
//!   later than the one after it, while that one is not earlier than the
//!   clock, stands out from both neighbours: it is the outlier and is
//!   refused (with `--skip-invalid`, skipped), never adopted as the clock.
//! - A `messageId` seen within the de-duplication window (event time) is
//!   dropped, as the live server acknowledges and drops it.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::event::{format_ts, Event};
use crate::seen::Spilled;

/// One input line as the reader hands it on: its number, its length in
/// bytes, the event or why not.
pub type Parsed = (usize, u64, Result<Event, String>);

/// One line as an event, or why not; `None` for a blank line.
pub fn parse_line(bytes: &[u8], first: bool) -> Option<Result<Event, String>> {
    match line_text(bytes, first) {
        Ok(text) if text.trim().is_empty() => None,
        Ok(text) => Some(Event::parse(text).map_err(|e| e.to_string())),
        Err(e) => Some(Err(e)),
    }
}

/// Reads `path` and calls `each` with every line that is not blank: its
/// number, its bytes (line break included) and [`parse_line`]'s answer.
/// Stops early when `each` returns false.
pub fn each_line(
    path: &Path,
    mut each: impl FnMut(usize, &[u8], Result<Event, String>) -> bool,
) -> std::io::Result<()> {
    let mut reader = BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut line = Vec::new();
    let mut n = 0;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        n += 1;
        if let Some(parsed) = parse_line(&line, n == 1) {
            if !each(n, &line, parsed) {
                return Ok(());
            }
        }
    }
}

/// The text of one line: without its line break, and without the
/// byte-order mark if it is the file's first line.
pub fn line_text(bytes: &[u8], first: bool) -> Result<&str, String> {
    let bytes = if first {
        bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes)
    } else {
        bytes
    };
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    std::str::from_utf8(&bytes[..end]).map_err(|e| {
        format!(
            "not UTF-8 text: invalid byte at column {}",
            e.valid_up_to() + 1
        )
    })
}

/// What became of an event offered to [`Clock::offer`].
#[derive(Debug)]
pub enum Admitted {
    /// Decide it: the clock is now its timestamp.
    Event(Event),
    /// Refused: (line, reason).
    Refused(usize, String),
}

/// The replay's clock, holding back one event until the next confirms it.
#[derive(Default)]
pub struct Clock {
    /// Timestamp of the last event admitted.
    now: Option<i64>,
    held: Option<(usize, Event)>,
    /// Before any event is admitted, two that disagree (the second
    /// earlier): the next event tells which one is out of line.
    conflict: Option<((usize, Event), (usize, Event))>,
}

impl Clock {
    /// Offers the event of `line`; whatever is settled by it is appended
    /// to `out` in order.
    pub fn offer(&mut self, line: usize, ev: Event, out: &mut Vec<Admitted>) {
        let behind_clock = |ts: i64, now: Option<i64>| now.is_some_and(|n| ts < n);
        if let Some(((fl, first), (sl, second))) = self.conflict.take() {
            if ev.ts >= first.ts {
                // The second was early.
                out.push(Admitted::Refused(sl, backwards(&second, first.ts)));
                self.now = Some(first.ts);
                out.push(Admitted::Event(first));
            } else {
                // The first was late.
                out.push(Admitted::Refused(fl, outlier(&first, &second)));
                self.now = Some(second.ts);
                out.push(Admitted::Event(second));
            }
            return self.offer(line, ev, out);
        }
        match self.held.take() {
            None if behind_clock(ev.ts, self.now) => {
                out.push(Admitted::Refused(line, self.backwards(&ev)));
            }
            None => self.held = Some((line, ev)),
            Some((_, held)) if ev.ts >= held.ts => {
                self.now = Some(held.ts);
                out.push(Admitted::Event(held));
                self.held = Some((line, ev));
            }
            Some(held) if self.now.is_none() => self.conflict = Some((held, (line, ev))),
            Some((hl, held)) if !behind_clock(ev.ts, self.now) => {
                // Later than the events on both sides of it.
                out.push(Admitted::Refused(hl, outlier(&held, &ev)));
                self.held = Some((line, ev));
            }
            Some(held) => {
                out.push(Admitted::Refused(line, self.backwards(&ev)));
                self.held = Some(held);
            }
        }
    }

    fn backwards(&self, ev: &Event) -> String {
        backwards(ev, self.now.unwrap_or(ev.ts))
    }

    /// What the end of the input settles: an unresolved disagreement goes
    /// by file order.
    pub fn finish(&mut self, out: &mut Vec<Admitted>) {
        if let Some(((_, first), (sl, second))) = self.conflict.take() {
            out.push(Admitted::Refused(sl, backwards(&second, first.ts)));
            self.now = Some(first.ts);
            out.push(Admitted::Event(first));
        }
        if let Some((_, ev)) = self.held.take() {
            self.now = Some(ev.ts);
            out.push(Admitted::Event(ev));
        }
    }
}

fn backwards(ev: &Event, clock: i64) -> String {
    format!(
        "field `timestamp`: {} is before the previous event's {}",
        format_ts(ev.ts),
        format_ts(clock)
    )
}

fn outlier(late: &Event, next: &Event) -> String {
    format!(
        "field `timestamp`: {} is later than the next event's {}: an outlier, not used as the clock",
        format_ts(late.ts),
        format_ts(next.ts)
    )
}

/// `messageId`s seen within a window of event time. Ids are kept as
/// 128-bit hashes, 56 bytes an id in memory; past three quarters of
/// `budget` the older half moves to disk ([`crate::seen`], behind a filter
/// of the last quarter) and ids not found in memory are looked up there,
/// so memory stays bounded however many ids the window holds (13M events
/// in 3 days of a million customers).
pub struct Dedupe {
    window_ms: i64,
    seen: HashMap<u128, i64>,
    order: VecDeque<(i64, u128)>,
    max_entries: usize,
    spilled: Option<Spilled>,
}

/// What one id costs in memory: the map's entry and control byte at its
/// load factor, and the queue's entry.
const ID_BYTES: usize = 56;

fn id_hash(id: &str) -> u128 {
    // SipHash with fixed keys, twice: stable across runs and platforms.
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    };
    (u128::from(half(0)) << 64) | u128::from(half(1))
}

impl Dedupe {
    /// A window held in memory only.
    pub fn new(window_ms: i64) -> Dedupe {
        Dedupe {
            window_ms,
            seen: HashMap::new(),
            order: VecDeque::new(),
            max_entries: usize::MAX,
            spilled: None,
        }
    }

    /// A window of about `budget` bytes in memory, the rest in files in
    /// `dir` (removed when it drops).
    pub fn spilling(window_ms: i64, budget: usize, dir: &Path) -> Dedupe {
        Dedupe {
            max_entries: (budget / 4 * 3 / ID_BYTES).max(16),
            spilled: Some(Spilled::new(dir, budget / 4)),
            ..Dedupe::new(window_ms)
        }
    }

    /// True the first time `id` is seen within the window before `ts`.
    pub fn first(&mut self, id: &str, ts: i64) -> std::io::Result<bool> {
        let cutoff = ts.saturating_sub(self.window_ms);
        while let Some(&(t, h)) = self.order.front() {
            if t >= cutoff {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&h) == Some(&t) {
                self.seen.remove(&h);
            }
        }
        let h = id_hash(id);
        if self.seen.contains_key(&h) {
            return Ok(false);
        }
        if let Some(spilled) = &self.spilled {
            // Spilled ids are never deleted; one outside the window is
            // simply not a duplicate.
            if spilled.get(h)?.is_some_and(|t| t >= cutoff) {
                return Ok(false);
            }
        }
        self.seen.insert(h, ts);
        self.order.push_back((ts, h));
        if self.seen.len() > self.max_entries {
            self.spill()?;
        }
        Ok(true)
    }

    /// Moves the older half of the ids in memory to disk.
    fn spill(&mut self) -> std::io::Result<()> {
        let Some(spilled) = &mut self.spilled else {
            return Ok(());
        };
        let mut out = Vec::with_capacity(self.seen.len() / 2);
        while self.seen.len() > self.max_entries / 2 {
            let Some((t, h)) = self.order.pop_front() else {
                break;
            };
            if self.seen.get(&h) == Some(&t) {
                self.seen.remove(&h);
                out.push((h, t));
            }
        }
        spilled.add(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: usize, ts: i64) -> Event {
        Event::parse(&format!(
            r#"{{"type":"track","userId":"c","event":"e","messageId":"m{n}","timestamp":"{}"}}"#,
            format_ts(ts)
        ))
        .expect("test event")
    }

    /// Feeds (line, ts) pairs; returns the admitted timestamps and the
    /// refused lines.
    fn run(input: &[i64]) -> (Vec<i64>, Vec<usize>) {
        let mut clock = Clock::default();
        let mut out = Vec::new();
        for (i, &ts) in input.iter().enumerate() {
            clock.offer(i + 1, ev(i + 1, ts), &mut out);
        }
        clock.finish(&mut out);
        let mut admitted = Vec::new();
        let mut refused = Vec::new();
        for a in out {
            match a {
                Admitted::Event(e) => admitted.push(e.ts),
                Admitted::Refused(l, _) => refused.push(l),
            }
        }
        (admitted, refused)
    }

    const FAR: i64 = 253_402_300_799_000; // 9999-12-31

    #[test]
    fn ordered_input_is_admitted_whole() {
        assert_eq!(run(&[1, 2, 2, 5, 9]), (vec![1, 2, 2, 5, 9], vec![]));
    }

    #[test]
    fn one_wild_timestamp_is_the_outlier_not_the_clock() {
        assert_eq!(run(&[1, 2, FAR, 3, 4]), (vec![1, 2, 3, 4], vec![3]));
        assert_eq!(run(&[FAR, 1, 2]), (vec![1, 2], vec![1]));
        // At the start, the third event settles which of two is wrong.
        assert_eq!(run(&[5, 1, 6]), (vec![5, 6], vec![2]));
        assert_eq!(run(&[5, 1]), (vec![5], vec![2]));
        assert_eq!(run(&[1, 2, 3, FAR]), (vec![1, 2, 3, FAR], vec![]));
    }

    #[test]
    fn an_early_event_is_refused_as_going_backwards() {
        assert_eq!(run(&[5, 6, 1, 7]), (vec![5, 6, 7], vec![3]));
        assert_eq!(run(&[5, 6, 7, 1, 8]), (vec![5, 6, 7, 8], vec![4]));
    }

    #[test]
    fn a_real_gap_is_confirmed_by_the_next_event() {
        assert_eq!(
            run(&[1, 1000, 1001, 1002]),
            (vec![1, 1000, 1001, 1002], vec![])
        );
    }

    #[test]
    fn text_of_a_line() {
        assert_eq!(line_text(b"\xef\xbb\xbf{}\r\n", true), Ok("{}"));
        // Only the file's first line can start with the mark.
        assert_eq!(line_text(b"\xef\xbb\xbf{}", false), Ok("\u{feff}{}"));
        assert!(line_text(b"{\"a\":\"\xff\"}\n", false)
            .unwrap_err()
            .contains("column 7"));
    }

    #[test]
    fn duplicates_within_the_window_are_dropped() {
        let mut d = Dedupe::new(100);
        assert!(d.first_ok("a", 0));
        assert!(!d.first_ok("a", 50));
        assert!(d.first_ok("b", 60));
        assert!(!d.first_ok("a", 100));
        // Past the window, an id counts as new again (as in the server).
        assert!(d.first_ok("a", 201));
        assert!(!d.first_ok("a", 202));
        assert!(d.first_ok("b", 202));
    }

    impl Dedupe {
        fn first_ok(&mut self, id: &str, ts: i64) -> bool {
            self.first(id, ts).expect("spilled ids readable")
        }
    }

    #[test]
    fn ids_spilled_to_disk_are_still_duplicates_within_the_window() {
        let dir = tempfile::tempdir().unwrap();
        // 16 ids in memory at most: the rest goes to disk.
        let mut d = Dedupe::spilling(1000, 0, dir.path());
        for n in 0..200 {
            assert!(d.first_ok(&format!("m{n}"), n));
        }
        assert!(d.seen.len() <= 16, "{} ids in memory", d.seen.len());
        for n in 0..200 {
            assert!(!d.first_ok(&format!("m{n}"), 300), "m{n} is a duplicate");
        }
        // Outside the window, spilled or not, an id is new again.
        assert!(d.first_ok("m0", 1001));
        assert!(d.first_ok("m150", 1151));
        assert!(!d.first_ok("m199", 1151));
        drop(d);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "files left"
        );
    }
}
