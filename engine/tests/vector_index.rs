//! The vector index against exact search, and its bookkeeping of keys.

use sluice_engine::vector::{Query, VectorIndex, VectorUpdate};
use sluice_sql::vector::{Distance, VectorIndexPlan};

/// xorshift64*: deterministic vectors without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vector(&mut self, dims: usize) -> Vec<f32> {
        (0..dims).map(|_| self.unit()).collect()
    }
}

fn plan(dims: usize, distance: Distance) -> VectorIndexPlan {
    VectorIndexPlan {
        column: "v".into(),
        dims,
        distance,
        trees: None,
        search_k: None,
        filter_columns: Vec::new(),
    }
}

fn upsert(key: String, vector: Vec<f32>, valid_until: Option<i64>) -> VectorUpdate {
    VectorUpdate {
        key,
        vector: Some(vector),
        valid_until,
        attrs: Vec::new(),
    }
}

/// Uniform random vectors are the worst case for trees: recall grows with
/// `search_k`, and where the trees would read more than a sixteenth of the
/// index the exact scan answers instead.
#[test]
fn recall_at_10_on_100k_random_64d_vectors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let idx = VectorIndex::open(dir.path(), "items", &plan(64, Distance::Cosine)).expect("open");
    let mut rng = Rng(0x5eed);
    let n = 100_000;
    let updates: Vec<VectorUpdate> = (0..n)
        .map(|i| upsert(format!("item{i}"), rng.vector(64), None))
        .collect();
    idx.apply(1, &updates, None, false).expect("apply");
    assert_eq!(idx.len().expect("len"), n as u64);
    let queries: Vec<Vec<f32>> = (0..100).map(|_| rng.vector(64)).collect();
    let exact: Vec<Vec<sluice_engine::vector::Neighbour>> = queries
        .iter()
        .map(|q| {
            let e = idx
                .nearest_exact(Query::Vector(q), 10)
                .expect("exact")
                .expect("some");
            assert_eq!(e.len(), 10);
            assert!(e.windows(2).all(|w| w[0].distance <= w[1].distance));
            e
        })
        .collect();
    let mut last = 0.0;
    for search_k in [2, 10, 20, 400] {
        let mut hits = 0;
        let mut scanned = true;
        for (q, e) in queries.iter().zip(&exact) {
            let s = sluice_engine::vector::Search {
                search_k: Some(search_k),
                ..sluice_engine::vector::Search::one(Query::Vector(q), 10)
            };
            let found = idx.search(&s).expect("search");
            scanned &= found.exact;
            let approx = found.results[0].clone().expect("some");
            hits += approx
                .iter()
                .filter(|a| e.iter().any(|x| x.key == a.key))
                .count();
        }
        let recall = hits as f64 / (queries.len() * 10) as f64;
        eprintln!("search_k {search_k}: recall@10 = {recall:.3}, exact {scanned}");
        assert!(
            recall >= last,
            "recall fell from {last} to {recall} at {search_k}"
        );
        last = recall;
        // The trees read k × trees × search_k candidates: 400 is more
        // than a sixteenth of 100k, 2 is not.
        assert_eq!(scanned, search_k == 400, "search_k {search_k}");
    }
    assert!(last > 0.999, "the exact fallback has recall {last}");
}

#[test]
fn distances_match_exact_scan_for_each_metric() {
    for d in [Distance::Cosine, Distance::Euclidean, Distance::Dot] {
        let dir = tempfile::tempdir().expect("tempdir");
        let idx = VectorIndex::open(dir.path(), "v", &plan(8, d)).expect("open");
        let mut rng = Rng(7);
        let updates: Vec<VectorUpdate> = (0..300)
            .map(|i| upsert(format!("k{i}"), rng.vector(8), None))
            .collect();
        idx.apply(1, &updates, None, false).expect("apply");
        let q = rng.vector(8);
        // Small index: the trees are searched whole, so the result is exact.
        let a = idx
            .nearest(Query::Vector(&q), 5, Some(1000))
            .expect("nearest")
            .expect("some");
        let e = idx
            .nearest_exact(Query::Vector(&q), 5)
            .expect("exact")
            .expect("some");
        let keys = |v: &[sluice_engine::vector::Neighbour]| {
            v.iter().map(|n| n.key.clone()).collect::<Vec<_>>()
        };
        assert_eq!(keys(&a), keys(&e), "{d:?}");
        for (x, y) in a.iter().zip(&e) {
            assert!(
                (x.distance - y.distance).abs() < 1e-4,
                "{d:?}: {x:?} vs {y:?}"
            );
        }
    }
}

#[test]
fn updates_removals_expiry_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = plan(4, Distance::Euclidean);
    {
        let idx = VectorIndex::open(dir.path(), "users", &p).expect("open");
        let ups = vec![
            upsert("a".into(), vec![0.0, 0.0, 0.0, 1.0], Some(100)),
            upsert("b".into(), vec![0.0, 0.0, 1.0, 0.0], Some(200)),
            upsert("c".into(), vec![0.0, 1.0, 0.0, 0.0], None),
            // a changes: later rows win.
            upsert("a".into(), vec![1.0, 0.0, 0.0, 0.0], Some(150)),
        ];
        let st = idx.apply(1, &ups, Some(0), false).expect("apply");
        assert_eq!(st.upserts, 4);
        assert_eq!(idx.vector("a").expect("a"), Some(vec![1.0, 0.0, 0.0, 0.0]));
        // The watermark passes a's valid-until: a expires, b stays.
        let st = idx.apply(2, &[], Some(150), false).expect("apply");
        assert_eq!(st.expired, 1);
        let keys: Vec<String> = idx
            .dump()
            .expect("dump")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec!["b", "c"]);
        // c's value turns NULL; d reuses a freed id.
        let ups = vec![
            VectorUpdate {
                key: "c".into(),
                vector: None,
                valid_until: None,
                attrs: Vec::new(),
            },
            upsert("d".into(), vec![0.5, 0.5, 0.0, 0.0], Some(400)),
        ];
        let st = idx.apply(3, &ups, Some(160), false).expect("apply");
        assert_eq!((st.upserts, st.removals), (1, 1));
        let n = idx
            .nearest(Query::Key("d"), 5, None)
            .expect("nearest")
            .expect("d is indexed");
        assert_eq!(
            n.iter().map(|n| n.key.as_str()).collect::<Vec<_>>(),
            vec!["b"]
        );
        assert!(idx.nearest(Query::Key("a"), 5, None).expect("q").is_none());
        assert_eq!(idx.epoch().expect("epoch"), Some(3));
    }
    // Reopened: same content, and expiry still known (b at 200).
    let idx = VectorIndex::open(dir.path(), "users", &p).expect("reopen");
    assert_eq!(idx.epoch().expect("epoch"), Some(3));
    assert_eq!(idx.len().expect("len"), 2);
    idx.apply(4, &[], Some(250), false).expect("apply");
    let keys: Vec<String> = idx
        .dump()
        .expect("dump")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec!["d"]);
    // A reader opened from the settings it recorded.
    drop(idx);
    let r = VectorIndex::open_existing(dir.path(), "users").expect("open existing");
    assert_eq!(r.plan(), &p);
    assert_eq!(r.vector("d").expect("d"), Some(vec![0.5, 0.5, 0.0, 0.0]));
    // A wrong query length is the client's error.
    assert!(matches!(
        r.nearest(Query::Vector(&[1.0]), 3, None),
        Err(sluice_engine::EngineError::BadRequest(_))
    ));
}
