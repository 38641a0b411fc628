//! The cluster's JetStream layer against a real 3-node NATS JetStream
//! cluster (R3) on loopback: claims are compare-and-set, a replaced owner
//! can commit nothing, commits are all-or-nothing, a retried commit is
//! stored once, commits go on after the loss of a NATS node, and ingest
//! stores every acknowledged event once, on its slot's subject.

use std::time::{Duration, Instant};

use bytes::Bytes;
use nudge::cluster::log::{Epoch, LogError, SlotLog};
use nudge::cluster::slots::Layout;
use nudge::config::ClusterConfig;
use nudge_integration_tests::nats::NatsCluster;

/// One NATS cluster at a time: three at once on two cores turn leader
/// elections into timeouts.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn open(nats: &NatsCluster, prefix: &str) -> SlotLog {
    let cfg = ClusterConfig {
        servers: nats.urls(),
        node: "test".into(),
        prefix: prefix.into(),
        request_timeout: nudge::config::Dur(Duration::from_secs(2)),
        ..ClusterConfig::default()
    };
    let (client, js) = nudge::cluster::connect(&cfg, |_| None)
        .await
        .expect("connect to the NATS cluster");
    // The stream may take a moment while the cluster elects its meta leader.
    let start = Instant::now();
    loop {
        match SlotLog::open(client.clone(), js.clone(), Layout::new(prefix, 16), 3).await {
            Ok(log) => return log,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                eprintln!("log stream not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("log stream: {e}"),
        }
    }
}

fn records(tag: &str, n: usize) -> Vec<Bytes> {
    (0..n).map(|i| Bytes::from(format!("{tag}-{i}"))).collect()
}

fn payloads(rs: &[nudge::cluster::log::Record]) -> Vec<String> {
    rs.iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_current_epoch_commits() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = NatsCluster::start(3);
    let log = open(&nats, "fence").await;
    let slot = 5;
    assert_eq!(log.epoch(slot).await.unwrap(), None);

    // A claims the fresh slot and commits.
    let a = log.claim(slot, "a", None).await.unwrap();
    assert_eq!(log.epoch(slot).await.unwrap().as_ref(), Some(&a));
    let c = log.commit(&a, "a-1", &records("a1", 3)).await.unwrap();
    assert!(c.last_seq.is_some());

    // B takes the slot over from A's epoch; a second claim from the same
    // (now stale) epoch loses.
    let b = log.claim(slot, "b", Some(&a)).await.unwrap();
    assert!(b.seq > a.seq);
    match log.claim(slot, "c", Some(&a)).await {
        Err(LogError::Lost { slot: s }) => assert_eq!(s, slot),
        other => panic!("a claim from a replaced epoch must lose: {other:?}"),
    }

    // A, unaware (frozen, say), commits again: refused, nothing stored.
    match log.commit(&a, "a-2", &records("a2", 4)).await {
        Err(LogError::Fenced { slot: s, epoch }) => assert_eq!((s, epoch), (slot, a.seq)),
        other => panic!("a replaced owner's commit must be fenced: {other:?}"),
    }
    log.commit(&b, "b-1", &records("b1", 2)).await.unwrap();

    // A retry of B's commit (its acknowledgement lost) is not stored twice.
    let again = log.commit(&b, "b-1", &records("b1", 2)).await.unwrap();
    assert_eq!(again.last_seq, None, "a retried commit is a duplicate");

    let stored = log.commits(slot, 0, 100).await.unwrap();
    assert_eq!(
        payloads(&stored),
        ["a1-0", "a1-1", "a1-2", "b1-0", "b1-1"],
        "{stored:?}"
    );
    // Other slots are untouched.
    assert!(log.commits(slot + 1, 0, 100).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_claims_have_one_winner() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = NatsCluster::start(3);
    let log = open(&nats, "race").await;
    for slot in 0..8u16 {
        let current: Option<Epoch> = log.epoch(slot).await.unwrap();
        let tries = (0..4).map(|n| {
            let log = log.clone();
            let current = current.clone();
            tokio::spawn(async move { log.claim(slot, &format!("n{n}"), current.as_ref()).await })
        });
        let mut won = 0;
        for t in tries {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(LogError::Lost { .. }) => {}
                Err(e) => panic!("claim: {e}"),
            }
        }
        assert_eq!(won, 1, "slot {slot}: exactly one claim wins");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_go_on_after_a_nats_node_is_killed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut nats = NatsCluster::start(3);
    let log = open(&nats, "failover").await;
    let slot = 3;
    let owner = log.claim(slot, "a", None).await.unwrap();
    let mut committed = Vec::new();
    let mut longest = Duration::ZERO;
    for i in 0..40 {
        if i == 10 {
            // The stream's leader: the loss that costs an election.
            let leader = log.leader().await.unwrap().expect("a leader");
            nats.kill(nats.index_of(&leader).expect("the leader is one of ours"));
        }
        let id = format!("c-{i}");
        let rs = records(&id, 5);
        let started = Instant::now();
        // Retried with the same id until acknowledged, as an owner does.
        loop {
            match log.commit(&owner, &id, &rs).await {
                Ok(_) => break,
                Err(LogError::Nats(e)) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "commit {i} still failing after 30 s: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("commit {i}: {e}"),
            }
        }
        longest = longest.max(started.elapsed());
        committed.extend(rs.iter().map(|b| String::from_utf8_lossy(b).into_owned()));
    }
    eprintln!("longest commit across the NATS node's loss: {longest:?}");
    let stored = payloads(&log.commits(slot, 0, 1000).await.unwrap());
    assert_eq!(
        stored, committed,
        "every acknowledged commit once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_stores_every_acknowledged_event_once_on_its_slot() {
    use nudge::cluster::ingest::{Event, Publisher};
    let _one = ONE_AT_A_TIME.lock().await;
    let mut nats = NatsCluster::start(3);
    let cfg = ClusterConfig {
        servers: nats.urls(),
        node: "test".into(),
        prefix: "ingest".into(),
        ..ClusterConfig::default()
    };
    let (_client, js) = nudge::cluster::connect(&cfg, |_| None).await.unwrap();
    let layout = Layout::new("ingest", 16);
    let start = Instant::now();
    let publisher = loop {
        match Publisher::open(js.clone(), layout.clone(), 3).await {
            Ok(p) => break p,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                eprintln!("events stream not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("events stream: {e}"),
        }
    };
    // Customers whose ids could not be subject tokens, 600 events in
    // batches of 50, every tenth batch sent twice (a client's retry); the
    // stream's leader is killed halfway.
    let customers = ["a.b", "c*d", "e>f", "plain", "ünï", "x y"];
    let mut acknowledged = std::collections::BTreeMap::new();
    for batch in 0..12 {
        if batch == 6 {
            let info = js
                .get_stream(layout.events_stream())
                .await
                .unwrap()
                .cached_info()
                .clone();
            let leader = info.cluster.and_then(|c| c.leader).expect("a leader");
            nats.kill(nats.index_of(&leader).expect("one of ours"));
        }
        let ids: Vec<(String, &str)> = (0..50)
            .map(|i| {
                let n = batch * 50 + i;
                (format!("m-{n}"), customers[n % customers.len()])
            })
            .collect();
        let events: Vec<Event> = ids
            .iter()
            .map(|(id, c)| Event {
                customer: c,
                message_id: id,
                body: bytes::Bytes::from(format!("{{\"messageId\":\"{id}\"}}")),
            })
            .collect();
        // An election on two busy cores can outlast the publisher's 15 s:
        // ingest then answers 503 and the client sends the batch again,
        // with the same ids. So does this test, a few times at most.
        let mut attempts = 0;
        let stored = loop {
            match publisher.publish(&events).await {
                Ok(s) => break s,
                Err(e) if attempts < 3 => {
                    attempts += 1;
                    eprintln!("batch {batch}: {e}; sent again, as a client answered 503 would");
                }
                Err(e) => panic!("batch {batch}: {e}"),
            }
        };
        assert!(
            attempts > 0 || stored.iter().all(|s| !s.duplicate),
            "batch {batch}: first sending"
        );
        if batch % 10 == 0 {
            let again = publisher.publish(&events).await.unwrap();
            assert!(again.iter().all(|s| s.duplicate), "a repeat is a duplicate");
            assert_eq!(
                again.iter().map(|s| s.seq).collect::<Vec<_>>(),
                stored.iter().map(|s| s.seq).collect::<Vec<_>>(),
                "a repeat points at the first copy"
            );
        }
        for ((id, c), s) in ids.iter().zip(&stored) {
            acknowledged.insert(id.clone(), (c.to_string(), s.seq));
        }
    }
    // Every acknowledged event once, on its customer's slot and vshard.
    let mut found = std::collections::BTreeMap::new();
    for slot in 0..16 {
        for r in publisher.events(slot, 0, 10_000).await.unwrap() {
            let id = r.message_id.clone().expect("a message id");
            assert!(
                found.insert(id, (r.subject, r.seq)).is_none(),
                "stored twice"
            );
        }
    }
    assert_eq!(found.len(), 600);
    for (id, (customer, seq)) in &acknowledged {
        let (subject, at) = &found[id];
        assert_eq!(subject, &layout.event_subject(customer), "{id}");
        assert_eq!(at, seq, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_come_and_go_with_their_keys() {
    use nudge::cluster::members::{Member, MemberError, Members};
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = NatsCluster::start(3);
    let cfg = ClusterConfig {
        servers: nats.urls(),
        node: "test".into(),
        prefix: "members".into(),
        ..ClusterConfig::default()
    };
    let (_client, js) = nudge::cluster::connect(&cfg, |_| None).await.unwrap();
    let ttl = Duration::from_secs(2);
    let start = Instant::now();
    let members = loop {
        match Members::open(js.clone(), "members", 3, ttl).await {
            Ok(m) => break m,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                eprintln!("members bucket not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("members bucket: {e}"),
        }
    };
    let member = |n: &str| Member {
        node: n.into(),
        api: format!("http://{n}:8080"),
    };
    // A bucket just created can answer its first reads with "no
    // responders" until its replicas are up: joining is tried again
    // meanwhile, as `Node::open` does.
    let join = |m: Member| {
        let members = &members;
        async move {
            let start = Instant::now();
            loop {
                match members.join(m.clone()).await {
                    Ok(j) => break j,
                    Err(e) if start.elapsed() < Duration::from_secs(30) => {
                        eprintln!("joining, trying again: {e}");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => panic!("joining: {e}"),
                }
            }
        }
    };
    let mut a = join(member("a")).await;
    let mut b = join(member("b")).await;
    assert_eq!(members.list().await.unwrap(), [member("a"), member("b")]);

    // A second "a" while the first renews: waited out for a TTL, refused.
    let dup = {
        let members = members.clone();
        tokio::spawn(async move { members.join(member("a")).await })
    };
    while !dup.is_finished() {
        members.renew(&mut a).await.unwrap();
        members.renew(&mut b).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    match dup.await.unwrap() {
        Err(MemberError::NameTaken { node }) => assert_eq!(node, "a"),
        other => panic!("a duplicate name must be refused: {other:?}"),
    }

    // b stops renewing: gone within the TTL and a moment; a stays.
    members.renew(&mut b).await.unwrap();
    let stopped = Instant::now();
    loop {
        members.renew(&mut a).await.unwrap();
        let live = members.list().await.unwrap();
        if live == [member("a")] {
            assert!(stopped.elapsed() >= ttl / 2, "b left before its TTL");
            break;
        }
        assert!(
            stopped.elapsed() < ttl + Duration::from_secs(5),
            "b still listed: {live:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "a member that stopped renewing left after {:?}",
        stopped.elapsed()
    );
    // b wakes up: its renewal is refused, it must rejoin.
    match members.renew(&mut b).await {
        Err(MemberError::Expired { node }) => assert_eq!(node, "b"),
        other => panic!("an expired member's renewal must be refused: {other:?}"),
    }
    members.join(member("b")).await.unwrap();

    // A clean leave is seen at once.
    members.leave(&a).await.unwrap();
    assert_eq!(members.list().await.unwrap(), [member("b")]);
}
