//! The store's memory stays flat while the same customers are rewritten
//! batch after batch with a working set larger than sled's cache: the case
//! where sled's retired nodes used to outrun their collector (see
//! `store::reclaim`). A test binary of its own, so that no other test's
//! allocations move this process's resident memory.

use nudge::store::{Budget, Changes, Store};
use serde_json::{Map, Value};

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

#[test]
fn rewriting_customers_in_batches_keeps_memory_flat() {
    if !std::path::Path::new("/proc/self/status").exists() {
        eprintln!("no /proc: resident memory cannot be read here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 16 MiB: sled gets 4 MiB of cache for ~50 MiB of customers, so every
    // batch evicts and pages in.
    let store = Store::open_with(dir.path(), 1, Budget::mib(16)).unwrap();
    const CUSTOMERS: u64 = 120_000;
    const BATCH: u64 = 4_000;
    let padding = "x".repeat(400);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut write = |n: u64| {
        for i in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut traits = Map::new();
            traits.insert("pad".into(), Value::String(padding.clone()));
            traits.insert("n".into(), Value::from(i));
            let mut c = Changes::new();
            c.set_traits(&format!("customer-{}", x % CUSTOMERS), &traits);
            store.commit(c);
            if (i + 1) % BATCH == 0 {
                store.persist().unwrap();
            }
        }
    };
    // Warm up: every customer written, caches full.
    write(2 * CUSTOMERS);
    let before = rss_mib();
    write(5 * CUSTOMERS);
    let after = rss_mib();
    eprintln!(
        "RSS {before} MiB after warm-up, {after} MiB after {} more writes",
        5 * CUSTOMERS
    );
    // Without draining sled's garbage it grew by 76 MiB here (by GiBs
    // with larger caches and batches); with it, by about 1 MiB.
    assert!(
        after <= before + 40,
        "resident memory grew from {before} to {after} MiB while rewriting the same customers"
    );
}
