//! `nudge replay --sort`: an export's lines in (timestamp, messageId)
//! order, for inputs that are not in time order, with bounded memory.
//!
//! An external merge sort: lines are read and parsed once, buffered up to
//! [`RUN_BYTES`], sorted and written as run files; the runs are then
//! merged. Each line keeps its number in the file, so errors still name
//! it, and equal keys keep file order (the sort is stable). Lines that do
//! not parse have no timestamp to sort by: they are handed on at once, so
//! a replay without `--skip-invalid` stops before sorting the rest.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::intake::{self, Parsed};

/// Bytes of lines buffered before a run is written.
pub const RUN_BYTES: usize = 64 << 20;

struct Line {
    ts: i64,
    id: String,
    n: usize,
    raw: Vec<u8>,
}

impl Line {
    fn key(&self) -> (i64, &str, usize) {
        (self.ts, &self.id, self.n)
    }
}

fn write_run(dir: &Path, k: usize, lines: &mut Vec<Line>) -> std::io::Result<PathBuf> {
    lines.sort_by(|a, b| a.key().cmp(&b.key()));
    let path = dir.join(format!("sort-{k}"));
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&path)?);
    for l in lines.drain(..) {
        w.write_all(&l.ts.to_le_bytes())?;
        w.write_all(&(l.n as u64).to_le_bytes())?;
        w.write_all(&(l.id.len() as u32).to_le_bytes())?;
        w.write_all(l.id.as_bytes())?;
        w.write_all(&(l.raw.len() as u32).to_le_bytes())?;
        w.write_all(&l.raw)?;
    }
    w.flush()?;
    Ok(path)
}

fn read_line(r: &mut impl Read) -> std::io::Result<Option<Line>> {
    let mut b8 = [0; 8];
    match r.read_exact(&mut b8) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    let ts = i64::from_le_bytes(b8);
    r.read_exact(&mut b8)?;
    let n = u64::from_le_bytes(b8) as usize;
    let mut b4 = [0; 4];
    r.read_exact(&mut b4)?;
    let mut id = vec![0; u32::from_le_bytes(b4) as usize];
    r.read_exact(&mut id)?;
    r.read_exact(&mut b4)?;
    let mut raw = vec![0; u32::from_le_bytes(b4) as usize];
    r.read_exact(&mut raw)?;
    let id = String::from_utf8(id).map_err(std::io::Error::other)?;
    Ok(Some(Line { ts, id, n, raw }))
}

/// Reads `path` and calls `each` with its lines in (timestamp, messageId,
/// line) order, run files in `dir`. Lines that do not parse come first,
/// as they are read. Stops when `each` returns false.
pub fn sorted(
    path: &Path,
    dir: &Path,
    run_bytes: usize,
    mut each: impl FnMut(Parsed) -> bool,
) -> std::io::Result<()> {
    let (mut buf, mut bytes, mut runs) = (Vec::new(), 0, Vec::new());
    let mut failed = None;
    let mut stopped = false;
    intake::each_line(path, |n, raw, parsed| match parsed {
        Ok(ev) => {
            bytes += raw.len() + ev.message_id.len() + 64;
            buf.push(Line {
                ts: ev.ts,
                id: ev.message_id,
                n,
                raw: raw.to_vec(),
            });
            if bytes >= run_bytes {
                bytes = 0;
                match write_run(dir, runs.len(), &mut buf) {
                    Ok(p) => runs.push(p),
                    Err(e) => {
                        failed = Some(e);
                        return false;
                    }
                }
            }
            true
        }
        Err(e) => {
            stopped = !each((n, raw.len() as u64, Err(e)));
            !stopped
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    if stopped {
        return Ok(());
    }
    // Every run but the last is on disk; the last is merged from memory.
    buf.sort_by(|a, b| a.key().cmp(&b.key()));
    let mut sources: Vec<crate::spill::Sorted<'_, Line, std::io::Error>> = Vec::new();
    for p in &runs {
        let mut r = BufReader::with_capacity(256 << 10, File::open(p)?);
        sources.push(Box::new(std::iter::from_fn(move || {
            read_line(&mut r).transpose()
        })));
    }
    sources.push(Box::new(buf.into_iter().map(Ok)));
    let merged = crate::spill::kmerge(
        sources,
        |l| (l.ts, l.id.clone(), l.n),
        |l| {
            // Parsed again: keeping events rather than bytes in the runs
            // would need a second encoding of events. Blank lines were
            // never buffered.
            let parsed = intake::parse_line(&l.raw, l.n == 1)
                .unwrap_or_else(|| Err("blank line".to_owned()));
            Ok(each((l.n, l.raw.len() as u64, parsed)))
        },
    );
    for p in runs {
        let _ = std::fs::remove_file(p);
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::format_ts;

    #[test]
    fn lines_come_out_in_time_then_id_order_with_bad_lines_first() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        let line = |id: &str, ts: i64| {
            format!(
                r#"{{"type":"track","userId":"c","event":"e","messageId":"{id}","timestamp":"{}"}}"#,
                format_ts(ts)
            )
        };
        let mut text = String::new();
        let mut want = Vec::new();
        // 300 events in reverse time order, two per instant.
        for t in (0..150).rev() {
            for id in ["b", "a"] {
                text.push_str(&line(&format!("{id}{t:03}"), t * 1000));
                text.push('\n');
                want.push((t * 1000, format!("{id}{t:03}")));
            }
            if t == 70 {
                text.push_str("not json\n");
            }
        }
        std::fs::write(&input, text).unwrap();
        want.sort();
        // Runs of a few lines each: many files merged.
        for run_bytes in [1000, usize::MAX] {
            let mut got = Vec::new();
            let mut bad = Vec::new();
            sorted(&input, dir.path(), run_bytes, |(n, _, p)| {
                match p {
                    Ok(ev) => got.push((ev.ts, ev.message_id)),
                    Err(e) => bad.push((n, got.len(), e)),
                }
                true
            })
            .unwrap();
            assert_eq!(got, want);
            assert_eq!(bad.len(), 1);
            assert_eq!((bad[0].0, bad[0].1), (161, 0), "{bad:?}");
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(left.len(), 1, "only the input is left");
        }
    }
}
